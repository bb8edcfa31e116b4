"""Designing with a trained model: constraints (fixed, tied, bias, omit), decoding (mask-predict,
autoregressive), scoring and mutation scans."""

from .constraints import DesignOptions, DesignPlan, describe_plan, format_plan, plan_design
from .decoding import DECODINGS, decode, log_probs_with_hidden
from .designer import Design, DesignResult, design_plan, design_sequences, load_model, write_fasta
from .positions import DesignError, ResidueIndex, parse_fix
from .scoring import MutationScan, SequenceScore, mutation_scan, ranked_log_probs, score_sequences

__all__ = ["DECODINGS", "Design", "DesignError", "DesignOptions", "DesignPlan", "DesignResult", "MutationScan",
           "ResidueIndex", "SequenceScore", "decode", "describe_plan", "design_plan", "design_sequences", "format_plan",
           "load_model", "log_probs_with_hidden", "mutation_scan", "parse_fix", "plan_design", "ranked_log_probs",
           "score_sequences", "write_fasta"]
