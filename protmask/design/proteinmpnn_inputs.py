"""ProteinMPNN's design inputs, as its helper scripts write them, translated into protmask's plan.

`protein_mpnn_run.py` takes structures as the JSONL of ``parse_multiple_chains.py`` (``--jsonl_path``: one
object per line with ``name``, ``seq_chain_X`` and ``coords_chain_X``) and its controls as JSON dictionaries
keyed by structure name (``--chain_id_jsonl``, ``--fixed_positions_jsonl``, ``--tied_positions_jsonl``,
``--bias_by_res_jsonl``, ``--omit_AA_jsonl``) or global (``--bias_AA_jsonl``). Positions there are 1-based
indices along each chain's sequence *as ProteinMPNN parses it*: from the chain's lowest residue number to its
highest, a gap in the numbering counting as one unknown residue and each insertion code as one more. Here
every index becomes the residue label protmask addresses (``A12``, ``A52A``), so the dry run shows the
translation and everything else (ties, bias, omit, the decodings) is protmask's own.

ProteinMPNN's run script keeps only the last line of each control file; here every line counts, so one file
may hold many structures over many lines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..models.convert_proteinmpnn import PROTEINMPNN_ALPHABET  # its letter order: bias tables use its columns
from ..residues import AMINO_ACIDS
from ..structure import ProteinChain
from .constraints import DesignOptions
from .positions import DesignError

assert PROTEINMPNN_ALPHABET[:20] == AMINO_ACIDS  # protmask designs over the same 20 letters, in this order
#: The flags of the per-structure control files, as `protein_mpnn_run.py` names them (with underscores).
CONTROL_FLAGS = ("chain_id_jsonl", "fixed_positions_jsonl", "tied_positions_jsonl", "bias_by_res_jsonl",
                 "omit_AA_jsonl", "pssm_jsonl")


def read_json_lines(path, flag: str) -> dict:
    """Every JSON object of a file (one per line, as ProteinMPNN's helpers write them), merged: a
    structure named on a later line replaces the same name on an earlier one."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise DesignError(f"{flag} {path}: cannot read it ({error.strerror or error})") from None
    merged = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DesignError(f"{flag} {path}: line {number} is not JSON ({error.msg})") from None
        if not isinstance(value, dict):
            raise DesignError(f"{flag} {path}: line {number} is not a JSON object")
        merged.update(value)
    return merged


def read_parsed_chains(path) -> list[tuple[str, list[ProteinChain]]]:
    """``--jsonl_path``: (name, chains) for each line of ``parse_multiple_chains.py``'s output. The chains'
    residues are numbered 1, 2, … along each sequence, ProteinMPNN's indices; ``-`` (a gap) is an unknown
    residue without coordinates."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise DesignError(f"--jsonl_path {path}: cannot read it ({error.strerror or error})") from None
    structures = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--jsonl_path {path} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise DesignError(f"{where}: not JSON ({error.msg})") from None
        if not isinstance(entry, dict) or "name" not in entry:
            raise DesignError(f"{where}: expected an object with 'name' and 'seq_chain_X' (parse_multiple_chains.py)")
        chains = [_chain_from_entry(entry, key[len("seq_chain_"):], where)
                  for key in entry if key.startswith("seq_chain_")]
        if not chains:
            raise DesignError(f"{where}: {entry['name']} has no seq_chain_X field")
        structures.append((str(entry["name"]), chains))
    if not structures:
        raise DesignError(f"--jsonl_path {path}: no structures in it")
    return structures


def _chain_from_entry(entry: dict, chain_id: str, where: str) -> ProteinChain:
    sequence = entry[f"seq_chain_{chain_id}"].replace("-", "X")
    coords = entry.get(f"coords_chain_{chain_id}", {})
    atoms = [coords.get(f"{atom}_chain_{chain_id}") for atom in ("N", "CA", "C", "O")]
    others = [atoms[0], *atoms[2:]]
    if atoms[1] is None or None in others and any(a is not None for a in others):
        raise DesignError(f"{where}: chain {chain_id} has no coords_chain_{chain_id} with N, CA, C and O (or CA "
                          "alone, parse_multiple_chains.py --ca_only)")
    # CA alone (--ca_only): the other atoms are missing, so only a CA-only model designs the chain
    ca = np.asarray(atoms[1], dtype=np.float32).reshape(-1, 3)
    xyz = np.stack([np.asarray(a, dtype=np.float32).reshape(-1, 3) if a is not None else np.full_like(ca, np.nan)
                    for a in atoms], axis=1)
    if len(xyz) != len(sequence):
        raise DesignError(f"{where}: chain {chain_id} has {len(sequence)} residues but {len(xyz)} coordinates")
    return ProteinChain(chain_id, sequence, xyz, np.arange(1, len(sequence) + 1), " " * len(sequence),
                        source=str(entry["name"]))


def proteinmpnn_labels(chain: ProteinChain) -> list[str | None]:
    """ProteinMPNN's 1-based index i (as entry i - 1) → this chain's residue label, None where ProteinMPNN
    has a gap residue. Its parser walks residue numbers from the lowest to the highest, each number giving
    its residues in insertion-code order, or one unknown residue when the file has none."""
    by_number: dict[int, list[str]] = {}
    for number, code in zip(chain.residue_numbers.tolist(), chain.insertion_codes):
        by_number.setdefault(number, []).append(code.strip())
    if not by_number:
        return []
    labels: list[str | None] = []
    for number in range(min(by_number), max(by_number) + 1):
        codes = sorted(set(by_number.get(number, [])))
        labels += [f"{number}{code}" for code in codes] if codes else [None]
    return labels


@dataclass
class ProteinMPNNControls:
    """The control files of one design run, read once; `options_for` turns them into one structure's
    `DesignOptions`."""

    files: dict          # flag → (path, merged dictionary)
    bias_aa: dict

    @classmethod
    def read(cls, args) -> "ProteinMPNNControls":
        files = {flag: (getattr(args, flag), read_json_lines(getattr(args, flag), f"--{flag}"))
                 for flag in CONTROL_FLAGS if getattr(args, flag, None)}
        bias_aa = read_json_lines(args.bias_AA_jsonl, "--bias_AA_jsonl") if getattr(args, "bias_AA_jsonl", None) else {}
        return cls(files, bias_aa)

    def __bool__(self) -> bool:
        return bool(self.files or self.bias_aa)

    def entry(self, flag: str, name: str):
        if flag not in self.files:
            return None
        path, table = self.files[flag]
        if name not in table:
            raise DesignError(f"--{flag} {path}: no entry for {name} (it has {', '.join(list(table)[:5]) or 'none'}"
                              f"{', …' if len(table) > 5 else ''})")
        return table[name]

    def options_for(self, name: str, chains: list[ProteinChain], base: DesignOptions) -> DesignOptions:
        """``base`` (the command line's options) with this structure's controls added."""
        index = {c.chain_id: proteinmpnn_labels(c) for c in chains}
        label = _labeller(name, index)
        designed = base.chains
        chain_entry = self.entry("chain_id_jsonl", name)
        if chain_entry is not None:
            designed = [str(c) for c in chain_entry[0]]
        fix = [label(chain_id, i, "fixed_positions_jsonl")
               for chain_id, indices in (self.entry("fixed_positions_jsonl", name) or {}).items()
               if designed is None or chain_id in designed for i in indices or []]
        ties, weights = _ties(self.entry("tied_positions_jsonl", name) or [], label)
        bias = _bias_by_residue(self.entry("bias_by_res_jsonl", name) or {}, label)
        omit = {}
        for chain_id, items in (self.entry("omit_AA_jsonl", name) or {}).items():
            for indices, letters in items:
                for i in indices:
                    position = label(chain_id, i, "omit_AA_jsonl")
                    omit[position] = omit.get(position, "") + letters.replace("X", "")
        pssm = {}
        for chain_id, table in (self.entry("pssm_jsonl", name) or {}).items():
            if not table:  # ProteinMPNN's way of saying: no profile for this chain
                continue
            for i, row in enumerate(zip(table["pssm_coef"], table["pssm_bias"], table["pssm_log_odds"]), 1):
                position = label(chain_id, i, "pssm_jsonl")
                if position:
                    pssm[position] = row
        bias_aa = {**_as_mapping(base.bias_aa), **{k: float(v) for k, v in self.bias_aa.items() if k != "X"}}
        return replace(base, chains=designed,
                       fix=",".join(filter(None, [base.fix, ",".join(p for p in fix if p)])) or None,
                       tied_labels=list(base.tied_labels or []) + ties, tie_weights={**(base.tie_weights or {}), **weights},
                       bias={**(base.bias or {}), **bias}, omit={**(base.omit or {}), **omit}, bias_aa=bias_aa or None,
                       pssm={**(base.pssm or {}), **pssm} or None)


def _labeller(name: str, index: dict):
    def label(chain_id: str, position: int, flag: str) -> str | None:
        if chain_id not in index:
            raise DesignError(f"--{flag}: {name} has no chain {chain_id} (it has {', '.join(index)})")
        labels = index[chain_id]
        if not 1 <= int(position) <= len(labels):
            raise DesignError(f"--{flag}: {name} chain {chain_id} position {position}: ProteinMPNN numbers this "
                              f"chain 1-{len(labels)}")
        found = labels[int(position) - 1]
        return None if found is None else f"{chain_id}{found}"  # a gap residue: nothing to fix or tie
    return label


def _ties(groups: list, label) -> tuple[list[list[str]], dict[str, float]]:
    """ProteinMPNN's tied positions, ``[{"A": [1], "B": [1]}, …]`` or its weighted form ``{"A": [[1], [1.0]]}``
    (weights for positive and negative multi-state design) → groups of labels and each member's weight."""
    tied, weights = [], {}
    for group in groups:
        members = []
        for chain_id, value in group.items():
            weighted = bool(value) and isinstance(value[0], list)
            indices, betas = (value[0], value[1]) if weighted else (value, [1.0] * len(value))
            for i, beta in zip(indices, betas):
                member = label(chain_id, i, "tied_positions_jsonl")
                if member:
                    members.append(member)
                    if weighted:
                        weights[member] = float(beta)
        if len(members) > 1:
            tied.append(members)
    return tied, weights


def _bias_by_residue(table: dict, label) -> dict[str, dict[str, float]]:
    """``{"A": [[21 numbers] per residue]}`` in ProteinMPNN's alphabet → ``{"A12": {"G": 2.0}}`` (X dropped:
    protmask never designs it)."""
    bias = {}
    for chain_id, rows in table.items():
        for i, row in enumerate(rows, 1):
            values = {a: float(v) for a, v in zip(PROTEINMPNN_ALPHABET[:20], row) if float(v) != 0.0}
            position = label(chain_id, i, "bias_by_res_jsonl") if values else None
            if position:
                bias[position] = values
    return bias


def _as_mapping(bias_aa) -> dict:
    from .constraints import parse_bias_aa

    return parse_bias_aa(bias_aa)
