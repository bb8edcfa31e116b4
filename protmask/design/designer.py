"""Designing sequences for structures with a trained model: `design_plan` for one planned structure,
`design_sequences` for the Python API, `write_fasta` / `write_probabilities` for the outputs."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..residues import AMINO_ACIDS
from .constraints import DesignOptions, DesignPlan, plan_design
from .decoding import decode, encode
from .scoring import ALWAYS_HIDDEN, CONTEXT, ranked_log_probs
from ..structure import ParsedEntry, parse_entry, parse_structure

#: The residues that are not designed are scored for the global score in this many seeded blocks, each
#: seeing the blocks before it (ProteinMPNN decodes them one at a time; blocks keep it to a few passes).
GLOBAL_SCORE_BLOCKS = 10


@dataclass
class Design:
    sequence: str            # the designed chains, joined with "/"
    recovery: float          # identity to the native residues at designed positions
    mean_probability: float  # mean model probability of the chosen residues
    seed: int
    temperature: float
    positions: list = field(default_factory=list)  # (chain, residue id, native, designed, probability)
    score: float = float("nan")         # mean negative log-likelihood of the designed residues
    global_score: float = float("nan")  # the same over every residue with a backbone
    decoding: str = "mask_predict"
    sampled: np.ndarray | None = None   # [designed positions, 20]: the distributions the residues were drawn from
    letters: np.ndarray | None = None   # [L] the residue at every position of the structure after design
    step: np.ndarray | None = None      # [L] the round or step each designed position was decoded at (-1: not)


@dataclass
class DesignResult:
    name: str
    chain_ids: list[str]
    native: str              # the native sequence of the designed chains, joined with "/"
    designs: list[Design]
    designed_positions: int
    model_name: str = ""


def load_model(path, device=None, say=None):
    """A saved model folder, a run's resumable ``checkpoint-N`` folder, or a hub id → (model in eval mode,
    processor masking at the model's training ratio)."""
    import protmask  # noqa: F401  (registers the Auto classes)
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from ..data.collator import ProtMaskProcessor

    transformers_logging.disable_progress_bar()
    folder, checkpoint = resolve_model_folder(path)
    model = AutoModelForMaskedLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    if checkpoint is not None:
        model.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
        if say:
            say(f"{path} is a resumable checkpoint: using its weights with the configuration and tokenizer of {folder}")
    if device is not None:
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    processor = ProtMaskProcessor(tokenizer, mask_ratio=model.config.mask_ratio, backbone=model.config.backbone,
                                  with_context=model.config.context_atoms > 0)
    return model, processor


def resolve_model_folder(path) -> tuple[str, Path | None]:
    """(folder or hub id to load the configuration from, checkpoint folder whose weights replace its own).

    A training run's ``checkpoint-N`` holds weights but no configuration: that comes from the run's
    ``final/`` or ``best/``. A local-looking path that does not exist is an error here, not a hub lookup.
    """
    local = Path(path).expanduser()
    if local.is_dir():
        if (local / "config.json").is_file():
            return str(local), None
        if (local / "model.safetensors").is_file() and (local / "trainer_state.json").is_file():
            for sibling in ("final", "best"):
                if (local.parent / sibling / "config.json").is_file():
                    return str(local.parent / sibling), local
            raise ValueError(f"{path} is a resumable checkpoint, and its run has no final/ or best/ folder to take "
                             "the configuration from; resume the run to the end, or give a final/ or best/ folder")
        raise ValueError(f"{path} is a folder without config.json: give a save_pretrained folder (final/ or best/ "
                         "of a run, or the output of convert-proteinmpnn)")
    if local.is_absolute() or str(path).startswith((".", "~")) or local.parent.is_dir() and str(local.parent) != ".":
        raise ValueError(f"{path}: no such folder")
    return str(path), None  # a hub id


def design_sequences(model, processor, pdb, chains=None, fix=None, fill=None, num_samples: int = 1,
                     temperature: float = 0.1, seed: int = 0, rounds: int = 10, decoding: str = "mask_predict",
                     **controls) -> DesignResult:
    """Design sequences for chains of a structure file (or a list of `ProteinChain`, or a `ParsedEntry`).

    ``chains`` picks the chains to design (default all; the others stay visible as context). ``fix`` keeps
    native residues (``"A1-10,A45"``). ``fill`` is a sequence for the designed chains (joined with "/",
    or without separators) where ``_`` marks the positions to fill. ``controls`` are the other fields of
    `DesignOptions`: ``tie``, ``homo_oligomer``, ``omit_aa``, ``bias_aa``, ``bias``, ``omit``,
    ``side_chain_context``. Residues without a complete backbone cannot be designed and keep their native
    letter unless tied to one that can.
    ``decoding`` is ``mask_predict`` (``rounds`` rounds) or ``autoregressive``. Deterministic for a seed.
    """
    if isinstance(pdb, (str, Path)):  # a context model reads the file's other atoms (and side chains if asked)
        structure = (parse_entry(pdb, side_chains=bool(controls.get("side_chain_context")))
                     if model.config.context_atoms else parse_structure(pdb))
    else:
        structure = pdb if isinstance(pdb, ParsedEntry) else list(pdb)
    plan = plan_design(structure, DesignOptions(chains=chains, fix=fix, fill=fill, backbone=model.config.backbone,
                                                **controls))
    return design_plan(model, processor, plan, num_samples, temperature, seed, rounds, decoding)


def design_plan(model, processor, plan: DesignPlan, num_samples: int = 1, temperature: float = 0.1, seed: int = 0,
                rounds: int = 10, decoding: str = "mask_predict") -> DesignResult:
    """``num_samples`` designs of one planned structure; sample i is drawn with seed ``seed + i``."""
    device = next(model.parameters()).device
    tokenizer = processor.tokenizer
    allowed = torch.tensor(tokenizer.amino_acid_ids, device=device)
    batch = {k: v.to(device) for k, v in processor([plan.example]).items()}
    width = batch["input_ids"].shape[1]
    length = len(plan.index)
    batch["input_ids"][0, :length] = torch.from_numpy(processor.encode_sequence("".join(plan.tokens)))
    padded = lambda array, fill: torch.nn.functional.pad(torch.as_tensor(array), (0, width - length), value=fill)  # noqa: E731
    unit_of = padded(plan.unit_of, -1)[None]
    scoring = padded(plan.scoring, False)[None]
    bias = torch.from_numpy(plan.bias)[None]
    bias = torch.nn.functional.pad(bias, (0, 0, 0, width - length))
    native = np.array(list(plan.example.sequence))
    recovered = plan.scoring & np.isin(native, list(AMINO_ACIDS))
    designed = np.flatnonzero(plan.designed)
    weight = padded(plan.weight, 1.0)[None] if plan.weight is not None else None
    profile = None
    if plan.profile is not None:
        rows = lambda array: torch.nn.functional.pad(torch.from_numpy(array), (0, 0, 0, width - length))[None]  # noqa: E731
        profile = (padded(plan.profile.coef, 0.0)[None], rows(plan.profile.frequencies), rows(plan.profile.allowed))
    encoding = encode(model, batch)
    designs = []
    for sample in range(num_samples):
        generator = torch.Generator().manual_seed(seed + sample)
        result = decode(model, batch, unit_of, scoring, allowed, tokenizer.mask_token_id, bias, decoding,
                        temperature, rounds, generator, encoding, weight=weight, profile=profile)
        letters = np.array(tokenizer.convert_ids_to_tokens(result.tokens[0, :length].tolist()))
        log_prob = result.log_prob[0, :length].cpu().numpy()
        designed_nll = -log_prob[plan.scoring]
        others = _global_score_terms(model, batch, encoding, plan, letters, allowed, tokenizer.mask_token_id,
                                     seed + sample)
        probability = np.exp(log_prob)
        positions = [(*plan.index.chain_and_residue(p), native[p], letters[p], float(probability[p]))
                     for p in designed]
        designs.append(Design(
            sequence=plan.sequence_of(letters),
            recovery=float((letters[recovered] == native[recovered]).mean()) if recovered.any() else float("nan"),
            mean_probability=float(np.nanmean(probability[plan.scoring])),
            seed=seed + sample, temperature=temperature, positions=positions,
            score=float(designed_nll.mean()),
            global_score=float(np.concatenate([designed_nll, others]).mean()),
            decoding=decoding, sampled=result.sampled[0, designed].cpu().numpy(), letters=letters,
            step=result.step[0, :length].cpu().numpy()))
    return DesignResult(plan.name, plan.chosen, plan.sequence_of(native), designs, int(plan.designed.sum()),
                        str(getattr(model, "name_or_path", "") or ""))


def _global_score_terms(model, batch, encoding, plan: DesignPlan, letters, allowed, mask_token_id: int,
                        seed: int) -> np.ndarray:
    """Negative log-likelihoods of the residues that were not designed, decoded before the designed ones in
    `GLOBAL_SCORE_BLOCKS` seeded blocks (the designed residues stay hidden, as they were when drawn)."""
    scored = plan.has_backbone & ~plan.designed & np.isin(letters, list(AMINO_ACIDS))
    if not scored.any():
        return np.zeros(0)
    rank = np.full(len(letters), CONTEXT)
    rank[plan.designed] = ALWAYS_HIDDEN
    rank[scored] = np.random.default_rng(seed).integers(0, GLOBAL_SCORE_BLOCKS, int(scored.sum()))
    # ``batch`` holds the plan's residues at every position that was not designed; the designed stay hidden.
    log_probs = ranked_log_probs(model, batch, torch.from_numpy(rank), mask_token_id, allowed,
                                 structure=encoding).cpu().numpy()
    letter_index = np.array([AMINO_ACIDS.index(c) for c in letters[scored]])
    return -log_probs[np.flatnonzero(scored), letter_index]


def structure_stem(name: str) -> str:
    return re.sub(r"\.(pdb|ent|cif|mmcif)(\.gz)?$", "", Path(name).name)


def fasta_records(result: DesignResult) -> list[str]:
    """FASTA lines: the native sequence, then each design with the fields ProteinMPNN users look for."""
    stem = structure_stem(result.name)
    model = f" model={result.model_name}" if result.model_name else ""
    lines = [f">{stem}_native chains={','.join(result.chain_ids)} designed_positions={result.designed_positions}"
             f"{model}", result.native]
    for number, item in enumerate(result.designs, 1):
        lines.append(f">{stem}_design_{number} score={item.score:.4f} global_score={item.global_score:.4f} "
                     f"recovery={item.recovery:.4f} temperature={item.temperature:g} seed={item.seed} "
                     f"decoding={item.decoding} mean_probability={item.mean_probability:.4f}{model}")
        lines.append(item.sequence)
    return lines


def write_fasta(result: DesignResult, path) -> None:
    Path(path).write_text("\n".join(fasta_records(result)) + "\n")


def probability_rows(result: DesignResult, header: bool = True) -> list[str]:
    """TSV rows per designed position: the chosen residue, the model's probability of it, and the
    distribution it was drawn from (after ties, bias, omit and temperature), one column per amino acid."""
    lines = ["structure\tsample\tchain\tresidue\tnative\tdesigned\tprobability\t" +
             "\t".join(f"p_{a}" for a in AMINO_ACIDS)] if header else []
    stem = structure_stem(result.name)
    for number, item in enumerate(result.designs, 1):
        for (chain, residue, native, designed, probability), distribution in zip(item.positions, item.sampled):
            lines.append(f"{stem}\t{number}\t{chain}\t{residue}\t{native}\t{designed}\t{probability:.4f}\t" +
                         "\t".join(f"{p:.4f}" for p in distribution))
    return lines
