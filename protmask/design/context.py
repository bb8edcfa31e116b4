"""Which of a structure's non-protein atoms a model with atomic context reads (``--context``,
``--context_chains``, ``--context_residues``), and how the dry run lists them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..structure import ATOM_CLASSES, ContextAtoms
from .positions import DesignError


@dataclass
class ContextChoice:
    """``enabled`` False: no atoms (a context model then designs as if the structure had none). ``chains``:
    keep atoms of these chains only. ``residues``: keep only these groups, by residue name (``HEM``, ``ZN``)
    or by chain and number (``A301``)."""

    enabled: bool = True
    chains: Sequence[str] | None = None
    residues: Sequence[str] | None = None

    @classmethod
    def from_args(cls, args) -> "ContextChoice":
        split = lambda text: [t.strip() for t in text.split(",") if t.strip()] if text else None  # noqa: E731
        return cls(getattr(args, "context", "on") != "off", split(getattr(args, "context_chains", None)),
                   split(getattr(args, "context_residues", None)))

    @property
    def filtered(self) -> bool:
        return bool(self.chains or self.residues)


def choose_context_atoms(atoms: ContextAtoms, choice: ContextChoice, source="the structure") -> ContextAtoms:
    """The atoms ``choice`` keeps. A chain or residue named but absent is an error naming what there is."""
    from ..data.collator import subset_atoms

    if not choice.enabled:
        return subset_atoms(atoms, np.zeros(len(atoms), dtype=bool))
    keep = np.ones(len(atoms), dtype=bool)
    if choice.chains:
        missing = sorted(set(choice.chains) - set(atoms.chain_ids))
        if missing:
            raise DesignError(f"--context_chains {','.join(missing)}: {source} has no non-protein atoms in that chain "
                              f"(its context chains: {', '.join(sorted(set(atoms.chain_ids))) or 'none'})")
        keep &= np.isin(atoms.chain_ids, list(choice.chains))
    if choice.residues:
        labels = np.array([f"{c}{n}" for c, n in zip(atoms.chain_ids, atoms.residue_numbers.tolist())])
        names = np.array(atoms.residue_names)
        wanted = np.zeros(len(atoms), dtype=bool)
        for token in choice.residues:
            match = (labels == token) if re.search(r"\d", token) else (names == token.upper())
            if not match.any():
                raise DesignError(f"--context_residues {token}: not among {source}'s non-protein groups "
                                  f"({', '.join(group_names(atoms)) or 'none'})")
            wanted |= match
        keep &= wanted
    return subset_atoms(atoms, keep)


def group_names(atoms: ContextAtoms) -> list[str]:
    """Each group once, in file order: ``HEM A142``."""
    seen = dict.fromkeys(f"{n} {c}{r}" for n, c, r in zip(atoms.residue_names, atoms.chain_ids,
                                                           atoms.residue_numbers.tolist()))
    return list(seen)


def describe_context(atoms: ContextAtoms | None, limit: int = 12) -> str:
    """One line for the dry run: how many atoms of each class, and which groups."""
    if atoms is None or len(atoms) == 0:
        return "context: no non-protein atoms"
    counts = np.bincount(atoms.classes.astype(int), minlength=len(ATOM_CLASSES))
    classes = ", ".join(f"{ATOM_CLASSES[i].replace('_', ' ')} {n}" for i, n in enumerate(counts) if n)
    groups = group_names(atoms)
    shown = ", ".join(groups[:limit]) + (f", … {len(groups) - limit} more" if len(groups) > limit else "")
    return f"context: {len(atoms)} atoms ({classes}) in {len(groups)} groups: {shown}"
