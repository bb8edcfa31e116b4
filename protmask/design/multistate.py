"""One sequence for several backbones: multi-state design (a conformational switch, a scaffold in two states),
with positive and negative state weights.

Each state is its own structure, planned with the same options (chains, fix, bias, omit …). Residues tied
across states (``--tie "a.pdb:A12,b.pdb:A12;…"`` or ``--tie_by_number``) form one decoding unit, whose residue
is drawn from the weighted mean of its members' log-probabilities (each member weighted by its state's
weight, ProteinMPNN's ``tied_beta``), plus bias, over the temperature; a negative weight designs against a
state. The states are decoded together as one batch, each seeing only its own backbone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..residues import AMINO_ACIDS
from .constraints import DesignPlan, merge_groups
from .decoding import decode, encode
from .designer import Design, _global_score_terms, structure_stem
from .positions import DesignError


@dataclass
class MultiStatePlan:
    """States' plans, and the decoding units over all their positions (state k's position i is k·W + i)."""

    names: list[str]
    plans: list[DesignPlan]
    weights: list[float]
    width: int
    unit_of: np.ndarray           # [states, width]: -1 where not designed
    groups: list[list[tuple[int, int]]] = field(default_factory=list)  # cross-state ties: (state, position)
    notes: list[str] = field(default_factory=list)

    @property
    def num_units(self) -> int:
        return int(self.unit_of.max()) + 1 if (self.unit_of >= 0).any() else 0


def parse_state_tie(text: str | None, names: list[str], plans: list[DesignPlan]) -> list[list[tuple[int, int]]]:
    """``"a.pdb:A12,b.pdb:A12;a.pdb:A13-20,b.pdb:A13-20"`` → groups of (state, position); ranges of equal
    length tie element by element, as in a one-structure --tie."""
    groups = []
    for group_text in (g.strip() for g in (text or "").split(";")):
        if not group_text:
            continue
        items = []
        for item in (i.strip() for i in group_text.split(",") if i.strip()):
            state, _, residues = item.rpartition(":")
            matches = [k for k, name in enumerate(names) if state in (name, Path(name).name, structure_stem(name))]
            if not state or len(matches) != 1:
                raise DesignError(f"--tie {item!r}: write STATE:RESIDUE with STATE one of the --states files "
                                  f"({', '.join(Path(n).name for n in names)}), e.g. {Path(names[0]).name}:A12")
            items.append([(matches[0], p) for p in plans[matches[0]].index.resolve(residues, "--tie")])
        if len(items) < 2 or len({len(i) for i in items}) > 1:
            raise DesignError(f"--tie {group_text!r}: a group needs two or more items of the same length")
        groups += [list(members) for members in zip(*items)]
    return groups


def tie_by_number(plans: list[DesignPlan]) -> list[list[tuple[int, int]]]:
    """Every designed residue label present in two or more states, tied across them."""
    by_label: dict[str, list[tuple[int, int]]] = {}
    for state, plan in enumerate(plans):
        for position in np.flatnonzero(plan.designed):
            by_label.setdefault(plan.index.labels[position], []).append((state, int(position)))
    return [members for members in by_label.values() if len(members) > 1]


def plan_states(names: list[str], plans: list[DesignPlan], weights: list[float], tie: str | None = None,
                by_number: bool = False) -> MultiStatePlan:
    """Merge the states' own units (their ties stay) with the cross-state ties into one numbering."""
    if len(weights) != len(plans):
        raise DesignError(f"--state_weights: {len(weights)} weights for {len(plans)} --states files")
    width = max(len(p.index) for p in plans)
    flat = lambda state, position: state * width + position  # noqa: E731
    groups = [[flat(s, p) for s, p in g] for g in parse_state_tie(tie, names, plans)]
    if by_number:
        groups += [[flat(s, p) for s, p in g] for g in tie_by_number(plans)]
    for state, plan in enumerate(plans):  # each state's own tie groups
        groups += [[flat(state, p) for p in members] for members in plan.groups]
    designed = np.zeros(len(plans) * width, dtype=bool)
    for state, plan in enumerate(plans):
        designed[state * width: state * width + len(plan.index)] = plan.designed
    notes = []
    unit_of = np.full(len(plans) * width, -1, dtype=np.int64)
    merged = merge_groups(groups)
    for number, members in enumerate(merged):
        if not designed[members].all():
            labels = [f"{Path(names[m // width]).name}:{plans[m // width].index.labels[m % width]}" for m in members
                      if not designed[m]]
            raise DesignError(f"tie {', '.join(labels)}: not designed in its state (fixed, context or no backbone); "
                              "tie designed residues only")
        unit_of[members] = number
    singles = np.flatnonzero(designed & (unit_of < 0))
    unit_of[singles] = len(merged) + np.arange(len(singles))
    if len(singles):
        notes.append(f"{len(singles)} designed residues are in one state only and are designed from it alone")
    cross = [[(m // width, m % width) for m in members] for members in merged if len({m // width for m in members}) > 1]
    return MultiStatePlan(list(names), list(plans), [float(w) for w in weights], width,
                          unit_of.reshape(len(plans), width), cross, notes)


def format_states(states: MultiStatePlan) -> str:
    lines = [f"{len(states.plans)} states, one sequence: {states.num_units} decoding units, "
             f"{len(states.groups)} of them across states"]
    for name, plan, weight in zip(states.names, states.plans, states.weights):
        lines.append(f"  state {Path(name).name}: weight {weight:g}, chains {','.join(plan.chosen)}, "
                     f"{int(plan.designed.sum())} designed residues")
    for members in states.groups[:10]:
        lines.append("  unit: " + ",".join(f"{Path(states.names[s]).name}:{states.plans[s].index.labels[p]}"
                                           for s, p in members))
    if len(states.groups) > 10:
        lines.append(f"  … {len(states.groups) - 10} more units across states")
    lines += [f"  note: {note}" for note in states.notes]
    return "\n".join(lines)


@torch.no_grad()
def design_states(model, processor, states: MultiStatePlan, num_samples: int = 1, temperature: float = 0.1,
                  seed: int = 0, rounds: int = 10, decoding: str = "mask_predict") -> list[list[Design]]:
    """``num_samples`` designs; each a list of one `Design` per state (its sequence, recovery and scores
    under that state)."""
    device = next(model.parameters()).device
    tokenizer = processor.tokenizer
    allowed = torch.tensor(tokenizer.amino_acid_ids, device=device)
    plans, width = states.plans, states.width
    batch = {k: v.to(device) for k, v in processor([p.example for p in plans]).items()}
    padded_width = batch["input_ids"].shape[1]
    pad = lambda rows, fill: torch.nn.functional.pad(torch.as_tensor(np.stack(rows)), (0, 0) * (np.ndim(rows[0]) - 1) + (0, padded_width - width), value=fill)  # noqa: E731
    fit = lambda array, fill: np.concatenate([array, np.full((width - len(array), *array.shape[1:]), fill, array.dtype)])  # noqa: E731
    for k, plan in enumerate(plans):
        batch["input_ids"][k, :len(plan.index)] = torch.from_numpy(processor.encode_sequence("".join(plan.tokens)))
    unit_of = pad(list(states.unit_of), -1)
    scoring = pad([fit(p.scoring, False) for p in plans], False)
    bias = pad([fit(p.bias, 0.0) for p in plans], 0.0)
    weight = pad([np.full(width, w, np.float32) for w in states.weights], 1.0)
    encoding = encode(model, batch)
    samples = []
    for sample in range(num_samples):
        generator = torch.Generator().manual_seed(seed + sample)
        result = decode(model, batch, unit_of, scoring, allowed, tokenizer.mask_token_id, bias, decoding, temperature,
                        rounds, generator, encoding, weight=weight)
        samples.append([_state_design(model, processor, plan, result, k, seed + sample, temperature, decoding)
                        for k, plan in enumerate(plans)])
    return samples


def _state_design(model, processor, plan: DesignPlan, result, state: int, seed: int, temperature: float,
                  decoding: str) -> Design:
    tokenizer = processor.tokenizer
    length = len(plan.index)
    letters = np.array(tokenizer.convert_ids_to_tokens(result.tokens[state, :length].tolist()))
    log_prob = result.log_prob[state, :length].cpu().numpy()
    native = np.array(list(plan.example.sequence))
    recovered = plan.scoring & np.isin(native, list(AMINO_ACIDS))
    designed_nll = -log_prob[plan.scoring]
    one = {k: v.to(result.tokens.device) for k, v in processor([plan.example]).items()}
    one["input_ids"][0, :length] = result.tokens[state, :length]
    allowed = torch.tensor(tokenizer.amino_acid_ids, device=result.tokens.device)
    others = _global_score_terms(model, one, encode(model, one), plan, letters, allowed, tokenizer.mask_token_id, seed)
    designed = np.flatnonzero(plan.designed)
    return Design(sequence=plan.sequence_of(letters),
                  recovery=float((letters[recovered] == native[recovered]).mean()) if recovered.any() else float("nan"),
                  mean_probability=float(np.nanmean(np.exp(log_prob[plan.scoring]))), seed=seed,
                  temperature=temperature, score=float(designed_nll.mean()),
                  global_score=float(np.concatenate([designed_nll, others]).mean()), decoding=decoding,
                  sampled=result.sampled[state, designed].cpu().numpy(), letters=letters,
                  step=result.step[state, :length].cpu().numpy())


def state_fasta(states: MultiStatePlan, samples: list[list[Design]], model_name: str = "") -> list[str]:
    """FASTA lines: each state's native, then per sample one record per state."""
    model = f" model={model_name}" if model_name else ""
    weights = " ".join(f"{Path(n).name}:{w:g}" for n, w in zip(states.names, states.weights))
    lines = []
    for name, plan in zip(states.names, states.plans):
        lines += [f">{structure_stem(name)}_native state={Path(name).name} chains={','.join(plan.chosen)}{model}",
                  plan.sequence_of(plan.example.sequence)]
    for number, designs in enumerate(samples, 1):
        for name, design in zip(states.names, designs):
            lines += [f">design_{number}_{structure_stem(name)} state={Path(name).name} score={design.score:.4f} "
                      f"global_score={design.global_score:.4f} recovery={design.recovery:.4f} "
                      f"temperature={design.temperature:g} seed={design.seed} decoding={design.decoding} "
                      f"state_weights={weights}{model}", design.sequence]
    return lines
