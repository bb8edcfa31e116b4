"""ProteinMPNN's output layout, written from protmask's designs, for the pipelines that parse it:
``OUT/seqs/NAME.fa`` (the native sequence, then each sample, with `protein_mpnn_run.py`'s header fields),
``OUT/scores/NAME.npz`` (``--save_score``) and ``OUT/probs/NAME.npz`` (``--save_probs``).

Its conventions: sequences are the designed chains in chain-letter order joined with ``/``; scores are mean
negative log-likelihoods (natural log) over the designed residues (``score``) and over every residue with
a backbone (``global_score``), the native's along one random decoding order with the residues that are not
designed first; arrays run over the structure's positions in the order ``chain_order`` gives and over the
21 letters ``ACDEFGHIKLMNPQRSTVWYX``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..residues import AMINO_ACIDS
from .constraints import DesignPlan
from .decoding import is_causal
from .designer import GLOBAL_SCORE_BLOCKS, DesignResult, structure_stem
from .proteinmpnn_inputs import PROTEINMPNN_ALPHABET
from .scoring import CONTEXT, ranked_log_probs


def letter_log_probs(model, processor, plan: DesignPlan, letters, designed_rank, seed: int) -> np.ndarray:
    """``[L, 21]`` log-probabilities over ProteinMPNN's 21 letters with ``letters`` in place: the residues
    that are not designed first (a random order on a causal model, `GLOBAL_SCORE_BLOCKS` random blocks on
    a masked one), then the designed ones by ``designed_rank`` (their decoding step). NaN where no backbone."""
    device = next(model.parameters()).device
    tokenizer = processor.tokenizer
    letters21 = torch.tensor(tokenizer.convert_tokens_to_ids(list(PROTEINMPNN_ALPHABET)), device=device)
    batch = {k: v.to(device) for k, v in processor([plan.example]).items()}
    length = len(plan.index)
    batch["input_ids"][0, :length] = torch.from_numpy(processor.encode_sequence("".join(letters)))
    has_backbone = plan.has_backbone
    given = has_backbone & ~plan.designed
    rng = np.random.default_rng(seed)
    first = rng.permutation(int(given.sum())) if is_causal(model) else rng.integers(0, GLOBAL_SCORE_BLOCKS, int(given.sum()))
    rank = np.full(length, CONTEXT)
    rank[given] = first
    offset = int(first.max()) + 1 if len(first) else 0
    rank[plan.designed & has_backbone] = offset + np.asarray(designed_rank)[plan.designed & has_backbone]
    return ranked_log_probs(model, batch, torch.from_numpy(rank), tokenizer.mask_token_id, letters21).cpu().numpy()


def native_scores(model, processor, plan: DesignPlan, seed: int) -> tuple[float, float]:
    """(score, global_score) of the native sequence, ProteinMPNN's definition: one random decoding order."""
    rng = np.random.default_rng((seed, 1))
    designed_rank = np.zeros(len(plan.index), dtype=np.int64)
    designed_rank[plan.designed] = (rng.permutation(int(plan.designed.sum())) if is_causal(model)
                                    else rng.integers(0, GLOBAL_SCORE_BLOCKS, int(plan.designed.sum())))
    log_probs = letter_log_probs(model, processor, plan, plan.example.sequence, designed_rank, seed)
    return scores_of(log_probs, plan.example.sequence, plan)


def scores_of(log_probs: np.ndarray, letters, plan: DesignPlan) -> tuple[float, float]:
    """ProteinMPNN's (score, global_score): the mean negative log-likelihood of ``letters`` over the designed
    residues, and over every residue with a backbone."""
    index = np.array([PROTEINMPNN_ALPHABET.find(c) if c in AMINO_ACIDS else 20 for c in letters])
    picked = log_probs[np.arange(len(index)), index]
    scored = np.isfinite(picked)
    designed = scored & plan.scoring
    mean = lambda keep: float(-picked[keep].mean()) if keep.any() else float("nan")  # noqa: E731
    return mean(designed), mean(scored)


def _number(value: float) -> str:
    return np.format_float_positional(np.float32(value), unique=False, precision=4)


def _sorted_sequence(plan: DesignPlan, letters) -> str:
    letters = np.asarray(list(letters))
    return "/".join("".join(letters[plan.index.chain_positions(c)]) for c in sorted(plan.chosen))


def write_proteinmpnn_outputs(model, processor, plan: DesignPlan, result: DesignResult, output_dir, seed: int,
                              save_score: bool = False, save_probs: bool = False) -> list[Path]:
    """OUT/seqs/NAME.fa, and with the flags OUT/scores/NAME.npz and OUT/probs/NAME.npz. Returns the paths.
    Every score is ProteinMPNN's: from the 21-letter log-probabilities with the sequence in place, each
    sample along the order it was decoded in (so the headers and probs.npz agree)."""
    out = Path(output_dir)
    name = structure_stem(result.name)
    score, global_score = native_scores(model, processor, plan, seed)
    fixed_chains = sorted(c for c in plan.index.chain_ids if c not in plan.chosen)
    lines = [f">{name}, score={_number(score)}, global_score={_number(global_score)}, fixed_chains={fixed_chains}, "
             f"designed_chains={sorted(plan.chosen)}, model_name={Path(result.model_name).name or 'protmask'}, "
             f"git_hash=unknown, seed={seed}", _sorted_sequence(plan, plan.example.sequence)]
    native = np.array(list(plan.example.sequence))
    samples = []
    for number, design in enumerate(result.designs, 1):
        log_probs = letter_log_probs(model, processor, plan, design.letters, design.step, design.seed)
        sample_score, sample_global = scores_of(log_probs, design.letters, plan)
        recovery = float((design.letters[plan.scoring] == native[plan.scoring]).mean())
        samples.append((log_probs, sample_score, sample_global))
        lines += [f">T={design.temperature}, sample={number}, score={_number(sample_score)}, global_score="
                  f"{_number(sample_global)}, seq_recovery={_number(recovery)}", _sorted_sequence(plan, design.letters)]
    written = [_folder(out, "seqs") / f"{name}.fa"]
    written[0].write_text("\n".join(lines) + "\n")
    if save_score:
        written.append(_folder(out, "scores") / f"{name}.npz")
        np.savez(written[-1], score=np.array([s for _, s, _ in samples], np.float32),
                 global_score=np.array([g for _, _, g in samples], np.float32))
    if save_probs:
        written.append(_folder(out, "probs") / f"{name}.npz")
        np.savez(written[-1], **_probability_arrays(plan, result, [lp for lp, _, _ in samples]))
    return written


def _folder(out: Path, name: str) -> Path:
    (out / name).mkdir(parents=True, exist_ok=True)
    return out / name


def _probability_arrays(plan: DesignPlan, result: DesignResult, log_probs: list[np.ndarray]) -> dict:
    """ProteinMPNN's probs.npz: per sample the distributions drawn from (zero where not designed), the
    model's log-probabilities with the sample in place along its decoding order (0 where no backbone),
    the sample as indices, the designed positions, the chain order."""
    length, designed = len(plan.index), np.flatnonzero(plan.designed)
    probs, samples = [], []
    for design in result.designs:
        drawn = np.zeros((length, 21), np.float32)
        drawn[designed, :20] = design.sampled  # AMINO_ACIDS is ProteinMPNN's order without X
        probs.append(drawn)
        samples.append([PROTEINMPNN_ALPHABET.find(c) if c in AMINO_ACIDS else 20 for c in design.letters])
    # mask and chain_order: one row, as protein_mpnn_run.py writes them at --batch_size 1
    return {"probs": np.array(probs, np.float32), "log_probs": np.nan_to_num(np.array(log_probs, np.float32), nan=0.0),
            "S": np.array(samples, np.int32), "mask": plan.scoring[None].astype(np.float32),
            "chain_order": np.array([plan.index.chain_ids])}
