"""Position-specific profiles (PSSMs) as ProteinMPNN uses them in design, and built from an alignment.

ProteinMPNN's semantics (`protein_mpnn_run.py --pssm_jsonl --pssm_multi --pssm_threshold --pssm_bias_flag
--pssm_log_odds_flag`), applied to each residue's distribution after bias, omit and temperature:

- ``--pssm_bias_flag``: p ← (1 − m·c) p + m·c·f, with m = ``--pssm_multi``, c the residue's ``pssm_coef``
  (how far to trust the profile there) and f its ``pssm_bias`` (the profile's letter frequencies);
- ``--pssm_log_odds_flag``: letters whose ``pssm_log_odds`` is at or below ``--pssm_threshold`` keep 0.1 % of
  their probability: p ← p (1[odds > threshold] + 0.001), renormalised.

protmask designs over the 20 amino acids: the profile's X column is dropped and f renormalised, and an
omitted letter stays omitted after the mixing (ProteinMPNN can give a globally omitted letter profile mass).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..residues import AMINO_ACIDS
from .positions import DesignError

#: A profile built from an alignment: Laplace pseudocounts, one per amino acid and column.
PSEUDOCOUNT = 1.0
#: Its log-odds are against a uniform background over the 20 amino acids.
BACKGROUND = 1.0 / len(AMINO_ACIDS)
#: A residue aligned to the alignment's query counts when the chain and the query are this identical.
MIN_QUERY_IDENTITY = 0.9


@dataclass
class Profile:
    """Per position of a structure: ``coef`` [L] (× --pssm_multi), ``frequencies`` [L, 20] (rows sum to 1
    where coef > 0), ``allowed`` [L, 20] (1 where the log-odds pass the threshold, else 0.001)."""

    coef: np.ndarray
    frequencies: np.ndarray
    allowed: np.ndarray


def build_profile(length: int, rows: dict, multi: float, threshold: float, bias_flag: bool, odds_flag: bool):
    """``rows``: {position: (coef, bias over 21 letters, log-odds over 21 letters)} → a `Profile`, or None
    when neither flag is on (ProteinMPNN then ignores the PSSM)."""
    if not rows or not (bias_flag or odds_flag):
        return None
    coef = np.zeros(length, np.float32)
    frequencies = np.zeros((length, len(AMINO_ACIDS)), np.float32)
    allowed = np.ones((length, len(AMINO_ACIDS)), np.float32)
    for position, (c, bias, odds) in rows.items():
        bias, odds = np.asarray(bias, np.float64)[:20], np.asarray(odds, np.float64)[:20]
        if bias_flag and bias.sum() > 0:
            coef[position] = multi * float(c)
            frequencies[position] = bias / bias.sum()
        if odds_flag:
            allowed[position] = np.where(odds > threshold, 1.001, 0.001)
    return Profile(coef, frequencies, allowed)


def read_alignment(path) -> list[str]:
    """The aligned sequences of an a3m or FASTA file, the query first: upper-case letters and ``-`` are the
    query's columns (a3m insertions, lower case and ``.``, are dropped)."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise DesignError(f"--pssm {path}: cannot read it ({error.strerror or error})") from None
    records, current = [], None
    for line in text.splitlines():
        if line.startswith(">"):
            current = []
            records.append(current)
        elif line.strip() and not line.startswith("#") and current is not None:
            current.append(line.strip())
    sequences = ["".join(c for c in "".join(r) if c.isupper() or c == "-") for r in records]
    if not sequences or not sequences[0]:
        raise DesignError(f"--pssm {path}: no sequences (FASTA or a3m records starting with >)")
    wrong = [i + 1 for i, s in enumerate(sequences) if len(s) != len(sequences[0])]
    if wrong:
        raise DesignError(f"--pssm {path}: record {wrong[0]} has {len(sequences[wrong[0] - 1])} aligned columns, the "
                          f"query {len(sequences[0])}: not an alignment")
    return sequences


def alignment_profile(sequences: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(frequencies [columns, 21], log-odds [columns, 21]) in ProteinMPNN's alphabet: per column the 20
    amino acids' counts plus `PSEUDOCOUNT` each, gaps and unknown letters not counted, X given 0; log-odds
    against `BACKGROUND` (X: -inf, never designed)."""
    columns = len(sequences[0])
    counts = np.zeros((columns, len(AMINO_ACIDS)))
    for sequence in sequences:
        for column, letter in enumerate(sequence):
            at = AMINO_ACIDS.find(letter)
            if at >= 0:
                counts[column, at] += 1
    frequencies = (counts + PSEUDOCOUNT) / (counts.sum(1, keepdims=True) + PSEUDOCOUNT * len(AMINO_ACIDS))
    odds = np.log(frequencies / BACKGROUND)
    return (np.concatenate([frequencies, np.zeros((columns, 1))], 1),
            np.concatenate([odds, np.full((columns, 1), -np.inf)], 1))


def query_to_chain(query: str, sequence: str) -> dict[int, int] | None:
    """Alignment column → chain position, by a global alignment of the query (gaps removed) to the chain;
    None when they are less than `MIN_QUERY_IDENTITY` identical over the aligned residues."""
    from Bio import Align

    columns = [i for i, c in enumerate(query) if c != "-"]
    ungapped = "".join(query[i] for i in columns)
    aligner = Align.PairwiseAligner(mode="global", match_score=2, mismatch_score=-1, open_gap_score=-3,
                                    extend_gap_score=-0.5)
    alignment = aligner.align(ungapped, sequence)[0]
    mapping, same = {}, 0
    for (q0, q1), (s0, s1) in zip(*alignment.aligned):
        for offset in range(q1 - q0):
            mapping[columns[q0 + offset]] = s0 + offset
            same += ungapped[q0 + offset] == sequence[s0 + offset]
    if not mapping or same / len(mapping) < MIN_QUERY_IDENTITY:
        return None
    return mapping
