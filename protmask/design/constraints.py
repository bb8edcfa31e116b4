"""What a design may change and how: designed, fixed and tied positions, amino-acid bias and omit.

`plan_design` turns the user's options for one structure into a `DesignPlan` — per position, the starting
residue, whether it is designed, which *unit* it is decoded with (a tie group or itself) and an additive
bias over the 20 amino acids (-inf where omitted) — and refuses contradictions before any compute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..data.collator import Example, to_example
from ..residues import AMINO_ACIDS, has_backbone
from ..structure import ParsedEntry, ProteinChain
from .positions import DesignError, ResidueIndex
from .pssm import MIN_QUERY_IDENTITY as MIN_ALIGNMENT_IDENTITY
from .pssm import Profile, alignment_profile, build_profile, query_to_chain, read_alignment

MASK_CHARACTERS = "_?-*"
#: Chains whose residues agree at every shared residue number, and share at least this fraction of the
#: shorter chain, count as copies of one sequence for --homo_oligomer.
HOMO_OLIGOMER_MIN_OVERLAP = 0.9


@dataclass
class DesignOptions:
    """The design controls, as the command line and the Python API take them."""

    chains: Sequence[str] | None = None   # chains to design (default all; others stay as context)
    fix: str | None = None                # "A1-10,A45": keep native
    fill: str | None = None               # designed chains' sequence with _ where to design
    tie: str | None = None                # "A12,B12;A13,B13": groups decoded as one residue
    homo_oligomer: bool = False           # tie chains with identical sequences position by position
    omit_aa: str = ""                     # letters never designed anywhere
    bias_aa: Mapping[str, float] | str | None = None  # {"A": -1.0} or "A:-1.0,K:0.5", added to log-probabilities
    bias: Mapping[str, Mapping[str, float]] | None = None  # per position: {"A12": {"K": 2.0}}
    omit: Mapping[str, str] | None = None  # per position: {"A12": "CW"}
    tied_labels: Sequence[Sequence[str]] | None = None  # tie groups as residue labels: [["A12", "B12"], …]
    tie_weights: Mapping[str, float] | None = None  # per position: the weight of its log-probabilities in its
    #                                                 group's (ProteinMPNN's tied_beta; negative: negative design)
    # a profile, with ProteinMPNN's semantics (see pssm.py): per residue (coef, 21 frequencies, 21 log-odds)
    pssm: Mapping[str, tuple] | None = None
    pssm_alignment: str | None = None  # an a3m / FASTA alignment to build it from, matched to the designed chains
    pssm_multi: float = 0.0
    pssm_threshold: float = 0.0
    pssm_bias_flag: bool = False
    pssm_log_odds_flag: bool = False
    # what the model reads of a residue (its config.backbone): "full" designs residues with N, CA, C and O,
    # "ca" (CA-only models) residues with a CA. The design and score commands set it from the model.
    backbone: str = "full"
    # membrane-label models (LigandMPNN's): residues in the membrane ("A12,A13", labelled 2) and at its
    # interface (labelled 1), or one label for every residue (1 transmembrane, 0 soluble)
    transmembrane_buried: str | None = None
    transmembrane_interface: str | None = None
    global_transmembrane_label: int | None = None
    # atomic-context models: the side chains of the residues not designed join the context (LigandMPNN's
    # --ligand_mpnn_use_side_chain_context 1); needs a structure parsed with its side chains
    side_chain_context: bool = False


@dataclass
class DesignPlan:
    """One structure's design problem, position by position over its concatenated chains."""

    chains: list[ProteinChain]
    index: ResidueIndex
    example: Example
    chosen: list[str]                 # designed chains, in the order the user gave
    tokens: np.ndarray                # [L] one-letter residues to start from (fill letters, tied fixed letters)
    designed: np.ndarray              # [L] bool: receives a designed residue
    scoring: np.ndarray               # [L] bool: designed and has a backbone, so its distribution counts
    unit_of: np.ndarray               # [L] int: decoding unit (tie group or single position), -1 if not designed
    fixed: np.ndarray                 # [L] bool: kept by --fix
    bias: np.ndarray                  # [L, 20] float32 added to log-probabilities; -inf = omitted
    groups: list[list[int]] = field(default_factory=list)  # tie groups (positions), as decoded
    notes: list[str] = field(default_factory=list)
    weight: np.ndarray | None = None  # [L] float32: each member's weight in its unit's distribution (None: 1)
    profile: Profile | None = None    # the PSSM mixed into designed residues' distributions
    has_backbone: np.ndarray | None = None  # [L] bool: has every atom the model reads (DesignOptions.backbone)

    @property
    def name(self) -> str:
        return self.example.name or "structure"

    @property
    def num_units(self) -> int:
        return int(self.unit_of.max()) + 1 if self.designed.any() else 0

    def sequence_of(self, letters) -> str:
        """Letters over all positions → the designed chains' sequences joined with "/"."""
        letters = np.asarray(list(letters))
        return "/".join("".join(letters[self.index.chain_positions(c)]) for c in self.chosen)


def parse_bias_aa(value, flag: str = "--bias_aa") -> dict[str, float]:
    """``"A:-1.0,K:0.5"`` (or a mapping) → {letter: bias}, checked."""
    if not value:
        return {}
    if isinstance(value, str):
        pairs = {}
        for item in (part.strip() for part in value.split(",")):
            if not item:
                continue
            letter, _, number = item.partition(":")
            try:
                pairs[letter.strip()] = float(number)
            except ValueError:
                raise DesignError(f"{flag} {item!r}: write LETTER:NUMBER, e.g. 'A:-1.0,K:0.5'") from None
        value = pairs
    checked = {}
    for letter, number in value.items():
        letter = str(letter).upper()
        if letter not in AMINO_ACIDS:
            raise DesignError(f"{flag}: {letter!r} is not one of the 20 amino acids ({AMINO_ACIDS})")
        if not np.isfinite(float(number)):
            raise DesignError(f"{flag}: the bias for {letter} must be a finite number, got {number}")
        checked[letter] = float(number)
    return checked


def parse_letters(text: str, flag: str) -> str:
    letters = "".join(str(text or "").upper().split()).replace(",", "")
    wrong = sorted(set(letters) - set(AMINO_ACIDS + "X"))
    if wrong:
        raise DesignError(f"{flag}: {''.join(wrong)!r} are not amino-acid letters ({AMINO_ACIDS})")
    return "".join(c for c in letters if c != "X")  # X is never designed anyway


def read_json_option(path, flag: str) -> dict:
    try:
        value = json.loads(Path(path).read_text())
    except OSError as error:
        raise DesignError(f"{flag} {path}: cannot read it ({error.strerror or error})") from None
    except json.JSONDecodeError as error:
        raise DesignError(f"{flag} {path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise DesignError(f"{flag} {path}: expected an object keyed by residue, e.g. {{\"A12\": ...}}")
    return value


def homo_oligomer_groups(index: ResidueIndex, chosen: Sequence[str]) -> tuple[list[list[int]], list[str]]:
    """Tie groups for chains with one sequence, aligned by residue label; and what was tied, in words."""
    families: list[list[str]] = []
    for chain_id in chosen:
        for family in families:
            if _same_sequence(index, family[0], chain_id):
                family.append(chain_id)
                break
        else:
            families.append([chain_id])
    groups, notes = [], []
    for family in (f for f in families if len(f) > 1):
        by_label = {}
        for chain_id in family:
            chain = index.chains[index.chain_ids.index(chain_id)]
            for position, label in zip(index.chain_positions(chain_id), chain.residue_ids):
                by_label.setdefault(label, []).append(int(position))
        tied = [members for members in by_label.values() if len(members) > 1]
        groups += tied
        lengths = {len(index.chain_positions(c)) for c in family}
        aligned = " (different lengths, aligned by residue number)" if len(lengths) > 1 else ""
        notes.append(f"homo-oligomer: chains {','.join(family)} tied at {len(tied)} positions{aligned}")
    return groups, notes


def _same_sequence(index: ResidueIndex, first: str, second: str) -> bool:
    chains = [index.chains[index.chain_ids.index(c)] for c in (first, second)]
    letters = [dict(zip(c.residue_ids, c.sequence)) for c in chains]
    shared = letters[0].keys() & letters[1].keys()
    if len(shared) < HOMO_OLIGOMER_MIN_OVERLAP * min(len(c) for c in chains):
        return False
    return all(letters[0][label] == letters[1][label] for label in shared)


def parse_tie(text: str | None, index: ResidueIndex) -> list[list[int]]:
    """``"A12,B12;A13-20,B13-20"`` → groups. Items of one group that name ranges tie element by element."""
    groups = []
    for group_text in (g.strip() for g in (text or "").split(";")):
        if not group_text:
            continue
        items = [index.resolve(item, "--tie") for item in group_text.split(",") if item.strip()]
        if len(items) < 2:
            raise DesignError(f"--tie {group_text!r}: a group needs two or more residues, e.g. 'A12,B12'")
        if len({len(i) for i in items}) > 1:
            raise DesignError(f"--tie {group_text!r}: its ranges have different lengths "
                              f"({', '.join(str(len(i)) for i in items)} residues)")
        groups += [list(members) for members in zip(*items)]
    return groups


def merge_groups(groups: list[list[int]]) -> list[list[int]]:
    """Groups that share a position become one (a residue tied to two groups ties all of them)."""
    parent: dict[int, int] = {}

    def root(p):
        while parent.setdefault(p, p) != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    for members in groups:
        for other in members[1:]:
            parent[root(other)] = root(members[0])
    merged: dict[int, list[int]] = {}
    for p in sorted({p for members in groups for p in members}):
        merged.setdefault(root(p), []).append(p)
    return [members for members in merged.values() if len(members) > 1]


def plan_design(structure: Sequence[ProteinChain] | ParsedEntry, options: DesignOptions) -> DesignPlan:
    """Check the options against one structure and lay out its design problem. Raises `DesignError`.
    ``structure``: its chains, or a `ParsedEntry` whose atoms are the context of a model with atomic context."""
    atoms = None
    if isinstance(structure, ParsedEntry):
        structure, atoms = structure.chains, structure.atoms
    chains = list(structure)
    index = ResidueIndex(chains)
    chosen = list(options.chains) if options.chains else list(index.chain_ids)
    missing = [c for c in chosen if c not in index.chain_ids]
    if missing:
        raise DesignError(f"--chains {','.join(missing)}: not in the structure (it has {', '.join(index.chain_ids)})")
    example = to_example(chains)
    example.atoms = atoms
    example.residue_labels = membrane_labels(options, index)
    tokens = np.array(list(example.sequence))
    in_chosen = np.isin(index.chain_of, [index.chain_ids.index(c) for c in chosen])
    usable = has_backbone(example.coords, options.backbone)
    fixed = np.zeros(len(index), dtype=bool)
    fixed[index.resolve_list(options.fix, "--fix")] = True
    hidden = in_chosen & ~fixed
    if options.fill is not None:
        hidden &= _apply_fill(options.fill, tokens, in_chosen, chosen)
    notes = []
    if not (hidden & usable).any():
        needs = "a CA" if options.backbone == "ca" else "a complete backbone (N, CA, C, O)"
        hint = ("; the structure has CA atoms only: design it with a CA-only model (protmask convert-proteinmpnn "
                "--checkpoint ca/v_48_020)" if options.backbone == "full" and (hidden & has_backbone(example.coords, "ca")).any()
                else "")
        raise DesignError("nothing to design: every position of the designed chains is fixed, given by --fill "
                          f"or lacks {needs}{hint}")

    global_bias = np.zeros(len(AMINO_ACIDS), dtype=np.float32)
    for letter, value in parse_bias_aa(options.bias_aa).items():
        global_bias[AMINO_ACIDS.index(letter)] = value
    bias = np.zeros((len(index), len(AMINO_ACIDS)), dtype=np.float32)  # per residue, from --bias_file
    for key, letters in (options.bias or {}).items():
        if not isinstance(letters, Mapping):
            raise DesignError(f"--bias_file: {key!r} must map to {{letter: bias}}, e.g. {{\"K\": 2.0}}")
        for letter, value in parse_bias_aa(letters, f"--bias_file {key}").items():
            bias[index.resolve(key, "--bias_file"), AMINO_ACIDS.index(letter)] += value
    omitted = np.zeros(bias.shape, dtype=bool)
    omitted[:, [AMINO_ACIDS.index(c) for c in parse_letters(options.omit_aa, "--omit_aa")]] = True
    for key, letters in (options.omit or {}).items():
        positions = index.resolve(key, "--omit_file")
        for letter in parse_letters(letters if isinstance(letters, str) else "".join(letters), f"--omit_file {key}"):
            if fixed[positions].any() and (tokens[positions] == letter).any():
                clash = [index.labels[p] for p in positions if fixed[p] and tokens[p] == letter]
                raise DesignError(f"{', '.join(clash)}: fixed by --fix as {letter}, but --omit_file omits {letter} there")
            omitted[positions, AMINO_ACIDS.index(letter)] = True

    groups = parse_tie(options.tie, index)
    groups += [[p for label in members for p in index.resolve(label, "--tied_positions_jsonl")]
               for members in options.tied_labels or []]
    weight = None
    if options.tie_weights:
        weight = np.ones(len(index), dtype=np.float32)
        for label, value in options.tie_weights.items():
            weight[index.resolve(label, "--tied_positions_jsonl")] = value
    if options.homo_oligomer:
        found, said = homo_oligomer_groups(index, chosen)
        groups += found
        notes += said or ["homo-oligomer: no two designed chains have the same sequence; nothing tied"]
    designed = hidden & usable
    tied_groups = []
    for members in merge_groups(groups):
        members = np.array(members)
        given = members[~hidden[members]]  # fixed, context chains or letters given by --fill
        if len(given):
            letters = set(tokens[given])
            if len(letters) > 1:
                raise DesignError(f"tie group {index.format(members)}: its fixed members disagree "
                                  f"({', '.join(f'{index.labels[p]}={tokens[p]}' for p in given)})")
            letter = letters.pop()
            tokens[members] = letter  # the whole group takes the fixed residue
            designed[members] = False
            notes.append(f"tie group {index.format(members)}: takes the fixed residue {letter} of "
                         f"{index.format(given)}")
            continue
        if not usable[members].any():
            notes.append(f"tie group {index.format(members)}: no member has a backbone; kept native")
            continue
        designed[members] = True  # members without a backbone follow their group
        omitted[members] = omitted[members].any(0)  # a letter omitted at one member is omitted for all
        bias[members] = bias[members].sum(0)  # a residue's own bias applies to the group that decides it
        tied_groups.append(members.tolist())
    scoring = designed & usable
    example.side_chains = _side_chain_context(options, example, designed)

    unit_of = np.full(len(index), -1, dtype=np.int64)
    for number, members in enumerate(tied_groups):
        unit_of[members] = number
    singles = np.flatnonzero(designed & (unit_of < 0))
    unit_of[singles] = len(tied_groups) + np.arange(len(singles))
    _check_allowed(index, unit_of, omitted, designed)
    bias += global_bias
    bias[omitted] = -np.inf
    profile = _profile(options, index, chosen, notes)
    return DesignPlan(chains, index, example, chosen, tokens, designed, scoring, unit_of, fixed, bias, tied_groups,
                      notes, weight, profile, usable)


def _side_chain_context(options: DesignOptions, example, designed: np.ndarray):
    """The side chains a context model reads: those of the residues not designed (a designed residue's own
    side chain would give its identity away), or none without ``side_chain_context``."""
    if not options.side_chain_context:
        return None
    if example.side_chains is None:
        raise DesignError("--side_chain_context reads side-chain atoms from the structure file, and this structure "
                          "has none (a JSONL entry or chains given without them): give the PDB / mmCIF file")
    side_chains = example.side_chains.copy()
    side_chains[designed] = np.nan
    return side_chains


def _profile(options: DesignOptions, index: ResidueIndex, chosen: Sequence[str], notes: list[str]):
    """The plan's PSSM from --pssm_jsonl rows and/or an alignment (each designed chain the query matches)."""
    rows = {}
    for label, row in (options.pssm or {}).items():
        for position in index.resolve(label, "--pssm_jsonl"):
            rows[position] = row
    if options.pssm_alignment:
        sequences = read_alignment(options.pssm_alignment)
        frequencies, odds = alignment_profile(sequences)
        matched = []
        for chain_id in chosen:
            positions = index.chain_positions(chain_id)
            mapping = query_to_chain(sequences[0], "".join(index.chains[index.chain_ids.index(chain_id)].sequence))
            if mapping:
                matched.append(chain_id)
                rows.update({int(positions[at]): (1.0, frequencies[column], odds[column])
                             for column, at in mapping.items()})
        if not matched:
            raise DesignError(f"--pssm {options.pssm_alignment}: its first sequence matches none of the designed "
                              f"chains ({','.join(chosen)}) at {MIN_ALIGNMENT_IDENTITY:.0%} identity")
        notes.append(f"pssm: {len(sequences)} sequences of {options.pssm_alignment} on chains {','.join(matched)}")
    profile = build_profile(len(index), rows, options.pssm_multi, options.pssm_threshold, options.pssm_bias_flag,
                            options.pssm_log_odds_flag)
    if rows:
        notes.append(f"pssm: {len(rows)} residues" + (
            f", --pssm_multi {options.pssm_multi:g}" * options.pssm_bias_flag +
            f", log-odds above {options.pssm_threshold:g}" * options.pssm_log_odds_flag if profile is not None else
            " given, but neither --pssm_bias_flag nor --pssm_log_odds_flag is on: not used (as ProteinMPNN)"))
    return profile


def _apply_fill(fill: str, tokens: np.ndarray, in_chosen: np.ndarray, chosen: Sequence[str]) -> np.ndarray:
    """Write --fill's letters into ``tokens``; return the positions it leaves to design."""
    text = fill.replace("<mask>", "_").replace("/", "").replace(" ", "")
    target = np.flatnonzero(in_chosen)
    if len(text) != len(target):
        raise DesignError(f"--fill has {len(text)} residues; the designed chains ({','.join(chosen)}) have {len(target)}")
    wrong = sorted(set(text.upper()) - set(AMINO_ACIDS + "X" + MASK_CHARACTERS))
    if wrong:
        raise DesignError(f"--fill: {''.join(wrong)!r} are neither amino-acid letters nor _ (a position to design)")
    hidden = np.zeros(len(tokens), dtype=bool)
    for position, letter in zip(target, text.upper()):
        if letter in MASK_CHARACTERS:
            hidden[position] = True
        else:
            tokens[position] = letter
    if not hidden.any():
        raise DesignError("--fill marks no position to design; write _ where a residue should be designed")
    return hidden


def _check_allowed(index: ResidueIndex, unit_of: np.ndarray, omitted: np.ndarray, designed: np.ndarray) -> None:
    """Every designed position must keep at least one amino acid after --omit_aa / --omit_file."""
    empty = [p for p in np.flatnonzero(designed) if omitted[p].all()]
    if empty:
        raise DesignError(f"{index.format(empty)}: every amino acid is omitted there (--omit_aa / --omit_file); "
                          "leave at least one letter, or --fix the position")


def describe_plan(plan: DesignPlan) -> dict:
    """Per chain, the residue labels that are designed, fixed, tied, biased and omitted (what --dry_run shows)."""
    index, bias = plan.index, plan.bias
    biased = plan.designed & (np.isfinite(bias) & (bias != 0)).any(1)
    omitted = plan.designed & np.isinf(bias).any(1)
    tied = np.zeros(len(index), dtype=bool)
    tied[[p for members in plan.groups for p in members]] = True
    chains = {}
    for chain_id in plan.index.chain_ids:
        positions = index.chain_positions(chain_id)
        pick = lambda mask: [index.labels[p] for p in positions if mask[p]]  # noqa: E731
        chains[chain_id] = {
            "designed_chain": chain_id in plan.chosen,
            "residues": len(positions),
            "designed": pick(plan.designed),
            "fixed": pick(plan.fixed),
            "tied": pick(tied),
            "biased": {index.labels[p]: {a: float(bias[p, i]) for i, a in enumerate(AMINO_ACIDS)
                                         if np.isfinite(bias[p, i]) and bias[p, i] != 0}
                       for p in positions if biased[p]},
            "omitted": {index.labels[p]: "".join(a for i, a in enumerate(AMINO_ACIDS) if np.isinf(bias[p, i]))
                        for p in positions if omitted[p]},
        }
    described = {"structure": plan.name, "designed_chains": plan.chosen, "chains": chains,
                 "tie_groups": [[index.labels[p] for p in members] for members in plan.groups], "notes": plan.notes}
    if plan.weight is not None:
        described["tie_weights"] = {index.labels[p]: float(plan.weight[p]) for p in np.flatnonzero(plan.designed)
                                    if plan.weight[p] != 1.0}
    return described


def membrane_labels(options: DesignOptions, index: ResidueIndex) -> np.ndarray | None:
    """LigandMPNN's membrane labels per residue (None when no option sets them): 2 buried, 1 interface, 0
    neither (or both), or the global label everywhere."""
    if options.global_transmembrane_label is not None:
        return np.full(len(index), int(options.global_transmembrane_label), dtype=np.int64)
    if not (options.transmembrane_buried or options.transmembrane_interface):
        return None
    buried, interface = np.zeros(len(index), dtype=bool), np.zeros(len(index), dtype=bool)
    listed = lambda text: (text or "").replace(" ", ",")  # noqa: E731  (LigandMPNN writes "A12 A13")
    buried[index.resolve_list(listed(options.transmembrane_buried), "--transmembrane_buried")] = True
    interface[index.resolve_list(listed(options.transmembrane_interface), "--transmembrane_interface")] = True
    return (2 * (buried & ~interface) + (interface & ~buried)).astype(np.int64)


def format_plan(plan: DesignPlan) -> str:
    """The dry run's text: one block per structure, a line per chain and kind of constraint."""
    description = describe_plan(plan)
    index = plan.index
    lines = [f"{plan.name}: designing chains {','.join(plan.chosen)}, {int(plan.designed.sum())} positions in "
             f"{plan.num_units} decoding units"]
    for chain_id, chain in description["chains"].items():
        positions = index.chain_positions(chain_id)
        if not chain["designed_chain"]:
            lines.append(f"  chain {chain_id}: {chain['residues']} residues, context (not designed)")
            continue
        lines.append(f"  chain {chain_id}: {chain['residues']} residues")
        for kind in ("designed", "fixed", "tied"):
            mask = np.isin(index.labels, chain[kind])
            lines.append(f"    {kind:9s}{len(chain[kind]):5d}  {index.format(positions[mask[positions]])}")
        by_rule = {}
        for label, letters in chain["biased"].items():
            by_rule.setdefault(",".join(f"{a}:{v:+g}" for a, v in letters.items()), []).append(label)
        for label, letters in chain["omitted"].items():
            by_rule.setdefault(f"omit {letters}", []).append(label)
        for kind in ("biased", "omitted"):
            lines.append(f"    {kind:9s}{len(chain[kind]):5d}")
        for rule, labels in by_rule.items():
            mask = np.isin(index.labels, labels)
            lines.append(f"      {rule}: {index.format(np.flatnonzero(mask))}")
    weights = description.get("tie_weights", {})
    for members in description["tie_groups"]:
        lines.append(f"  tie group: {','.join(f'{m}×{weights[m]:g}' if m in weights else m for m in members)}")
    if plan.example.atoms is not None:
        from .context import describe_context

        lines.append(f"  {describe_context(plan.example.atoms)}")
    if plan.example.side_chains is not None:
        present = np.isfinite(plan.example.side_chains).all(-1)
        residues = present.any(-1)
        lines.append(f"  side-chain context: {int(present.sum())} side-chain atoms of {int(residues.sum())} residues "
                     f"not designed (designed residues' own side chains hidden)")
    lines += [f"  note: {note}" for note in description["notes"]]
    return "\n".join(lines)
