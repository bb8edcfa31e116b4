"""Residues named the way structure files number them (``A12``, ``A52A``, ``A1-10``) ↔ positions of the
concatenated chains that the model sees."""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from ..structure import ProteinChain

_ITEM = re.compile(r"([A-Za-z0-9]+?)(-?\d+)([A-Za-z]?)(?:-(-?\d+)([A-Za-z]?))?")


class DesignError(ValueError):
    """A design request that cannot be met; says which option and why."""


class ResidueIndex:
    """Flat positions of a structure's chains, in file order, addressed by chain id and residue label."""

    def __init__(self, chains: Sequence[ProteinChain]):
        self.chains = list(chains)
        self.chain_ids = [c.chain_id for c in self.chains]
        self.chain_of = np.repeat(np.arange(len(self.chains)), [len(c) for c in self.chains])
        self.offsets = np.concatenate([[0], np.cumsum([len(c) for c in self.chains])]).astype(int)
        self.labels = [f"{c.chain_id}{label}" for c in self.chains for label in c.residue_ids]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def chain_positions(self, chain_id: str) -> np.ndarray:
        index = self.chain_ids.index(chain_id)
        return np.arange(self.offsets[index], self.offsets[index + 1])

    def chain_and_residue(self, position: int) -> tuple[str, str]:
        """``("A", "52A")`` for a position."""
        chain_id = self.chain_ids[self.chain_of[position]]
        return chain_id, self.labels[position][len(chain_id):]

    def resolve(self, item: str, flag: str) -> list[int]:
        """``"A12"`` → [position]; ``"A1-10"`` → the positions numbered 1 to 10 of chain A, in chain order."""
        match = _ITEM.fullmatch(item.strip())
        if not match or match.group(1) not in self.chain_ids:
            raise DesignError(f"{flag} {item!r}: write CHAIN+NUMBER or CHAIN+FIRST-LAST, e.g. A12 or A1-10 "
                              f"(chains in this file: {', '.join(self.chain_ids)})")
        chain_index = self.chain_ids.index(match.group(1))
        chain = self.chains[chain_index]
        first, icode = int(match.group(2)), match.group(3)
        last = int(match.group(4)) if match.group(4) else None
        found = []
        for position, (number, code) in enumerate(zip(chain.residue_numbers.tolist(), chain.insertion_codes)):
            hit = (first <= number <= last) if last is not None else (number == first and code.strip() == icode)
            if hit:
                found.append(int(self.offsets[chain_index]) + position)
        if not found:
            raise DesignError(f"{flag} {item!r}: no such residue in chain {match.group(1)}")
        return found

    def resolve_list(self, text: str | None, flag: str) -> list[int]:
        """``"A1-10,A45,B52A"`` → positions, in the order written."""
        if not text:
            return []
        return [p for item in text.split(",") if item.strip() for p in self.resolve(item, flag)]

    def format(self, positions) -> str:
        """Positions → ``"A1-10,A12,B3"``: runs of consecutive residues of one chain as ranges."""
        positions = sorted(int(p) for p in positions)
        if not positions:
            return "-"
        runs, start = [], positions[0]
        for previous, current in zip(positions, positions[1:] + [None]):
            if current is not None and current == previous + 1 and self.chain_of[current] == self.chain_of[previous]:
                continue
            first, last = self.labels[start], self.labels[previous]
            chain_id = self.chain_ids[self.chain_of[start]]
            runs.append(first if start == previous else f"{first}-{last[len(chain_id):]}")
            start = current
        return ",".join(runs)


def parse_fix(text: str | None, chains: Sequence[ProteinChain]) -> set[tuple[int, int]]:
    """``"A1-10,A45,B52A"`` → {(chain index, position in chain)}: residues kept native. Numbers are the file's."""
    index = ResidueIndex(chains)
    return {(int(index.chain_of[p]), p - int(index.offsets[index.chain_of[p]]))
            for p in index.resolve_list(text, "--fix")}
