"""Decoding sequences from a model: mask-predict and autoregressive, over *units* (one residue or a tie group
that receives one residue), with a bias over the 20 amino acids; and log-probabilities with chosen positions
hidden, the primitive of scoring and mutation scans.

Every function here works on flat positions of a batch (``b * L + i``) so that one call serves one structure
or a batch of them. The structure encoder runs once per call; only the decoder runs per round or step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.modeling_protmask import CausalDecodingCache

DECODINGS = ("mask_predict", "autoregressive")


@dataclass
class DecodedSequences:
    """tokens: ``[B, L]`` ids with designed positions filled. Per designed position (NaN / 0 elsewhere):
    ``log_prob`` the model's log-probability of the chosen residue when it was drawn (no bias, no temperature),
    ``sampled`` ``[B, L, 20]`` the distribution it was drawn from (tie-averaged, biased, tempered), ``step``
    the round or step at which it was decoded (-1 where not designed)."""

    tokens: torch.Tensor
    log_prob: torch.Tensor
    sampled: torch.Tensor
    step: torch.Tensor


#: Batch entries the structure encoder reads besides the backbone: context atoms, residue labels, side chains.
STRUCTURE_EXTRAS = ("context_coords", "context_elements", "context_mask", "residue_labels", "side_chain_coords",
                    "side_chain_mask")


def encode(model, batch: dict):
    """The structure encoder's output for ``batch`` (with its context atoms and residue labels when it has
    them), reusable by every decoder pass over it."""
    return model.protmask.encode_structure(batch["coords"], batch["attention_mask"], batch["residue_index"],
                                           batch["chain_index"], **{k: batch[k] for k in STRUCTURE_EXTRAS if k in batch})


def is_causal(model) -> bool:
    """Whether the model decodes in an order (ProteinMPNN's decoder), so that passes need a decoding rank."""
    return getattr(model.config, "decoder_context", "masked") == "causal"


def amino_acid_log_probs(model, tokens: torch.Tensor, structure, allowed: torch.Tensor,
                         decoding_rank: torch.Tensor | None = None) -> torch.Tensor:
    """log p over the 20 amino acids at every position: ``[B, L, 20]`` (float32)."""
    logits = model.logits_from_structure(tokens, structure, decoding_rank=decoding_rank)[..., allowed]
    return logits.float().log_softmax(-1)


def _rank_within_example(key: torch.Tensor, example_of_unit: torch.Tensor) -> torch.Tensor:
    """Rank of each unit's ``key`` (ascending) among the units of its own example."""
    order = torch.argsort(example_of_unit.double() * 4 + key.double(), stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    starts = torch.zeros(int(example_of_unit.max()) + 2, dtype=torch.long, device=order.device)
    starts[1:] = torch.bincount(example_of_unit, minlength=len(starts) - 1).cumsum(0)
    return rank - starts[example_of_unit]


@torch.no_grad()
def decode(model, batch: dict, unit_of: torch.Tensor, scoring: torch.Tensor, allowed: torch.Tensor,
           mask_token_id: int, bias: torch.Tensor | None = None, decoding: str = "mask_predict",
           temperature: float = 0.0, rounds: int = 10, generator: torch.Generator | None = None,
           structure=None, incremental: bool = True, weight: torch.Tensor | None = None,
           profile=None) -> DecodedSequences:
    """Fill every position with ``unit_of >= 0`` (``[B, L]``): positions of one unit get one residue.

    A unit's distribution is the mean of its ``scoring`` members' log-probabilities plus ``bias``
    (``[B, L, 20]``, -inf omits), divided by ``temperature``: the argmax at temperature 0, else a sample.
    ``weight`` (``[B, L]``) scales each member's log-probabilities in that mean (ProteinMPNN's tied_beta:
    a negative weight designs against a member's state). ``profile``: (coef ``[B, L]``, frequencies and
    allowed ``[B, L, 20]``), a PSSM mixed into each unit's distribution as ProteinMPNN does (see pssm.py).
    ``mask_predict`` starts with all units hidden and each round commits the most confident 1/(rounds left);
    ``autoregressive`` decodes one unit per step in a random order drawn from ``generator``, each seeing
    the residues decoded before it. ``structure``: the batch's encoding, when the caller already has it.
    A causal model (ProteinMPNN's decoder) decodes autoregressively step by step from cached states
    (``incremental``), the same function as a decoder pass per step at a fraction of the cost.
    """
    if decoding not in DECODINGS:
        raise ValueError(f"decoding must be one of {DECODINGS}, got {decoding!r}")
    device = batch["input_ids"].device
    shape = batch["input_ids"].shape
    if structure is None:
        structure = encode(model, batch)
    flat_unit = unit_of.reshape(-1).to(device)
    designed = flat_unit >= 0
    scoring = scoring.reshape(-1).to(device) & designed
    num_units = int(flat_unit.max()) + 1 if bool(designed.any()) else 0
    example_of_unit = torch.zeros(num_units, dtype=torch.long, device=device)
    example_of_unit[flat_unit[designed]] = torch.nonzero(designed).flatten() // shape[1]
    member_count = torch.bincount(flat_unit[scoring], minlength=num_units).clamp(min=1)[:, None].float()
    flat_bias = bias.reshape(-1, len(allowed)).to(device) if bias is not None else None
    flat_weight = weight.reshape(-1).to(device) if weight is not None else None

    tokens = batch["input_ids"].clone()
    tokens.view(-1)[designed] = mask_token_id
    log_prob = torch.full(shape, float("nan"), device=device)
    sampled = torch.zeros(*shape, len(allowed), device=device)
    step_of = torch.full(shape, -1, dtype=torch.long, device=device)
    remaining = torch.ones(num_units, dtype=torch.bool, device=device)
    decoding_rank = None
    if is_causal(model):
        # As ProteinMPNN: the residues that are not designed come first, in a random order of their own;
        # designed ones follow in the order they are drawn, and those still hidden see all of these.
        given = torch.nonzero(~designed).flatten()
        decoding_rank = torch.full((designed.numel(),), designed.numel() * 2, dtype=torch.long, device=device)
        decoding_rank[given] = torch.randperm(len(given), generator=generator).to(device)
        first_designed_rank = len(given)
    if decoding == "autoregressive":
        order_key = torch.rand(num_units, generator=generator, device="cpu").to(device)
        order_rank = _rank_within_example(order_key, example_of_unit) if num_units else order_key.long()
        steps = int(order_rank.max()) + 1 if num_units else 0
    else:
        steps = max(1, rounds)
    cache = None
    if decoding == "autoregressive" and decoding_rank is not None and incremental and num_units:
        cache = CausalDecodingCache(model, tokens, structure, decoding_rank.view(shape))
    for step in range(steps):
        if not bool(remaining.any()):
            break
        if decoding == "autoregressive":
            commit = remaining & (order_rank == step)
            active = designed & commit[flat_unit.clamp(min=0)]  # the members of this step's units
        else:
            commit, active = None, designed & remaining[flat_unit.clamp(min=0)]
        positions = torch.nonzero(active).flatten()
        if cache is not None:
            logits = cache.logits(positions // shape[1], positions % shape[1])
            active_lp = logits[:, allowed].float().log_softmax(-1)
        else:
            step_rank = decoding_rank.view(shape) if decoding_rank is not None else None
            all_lp = amino_acid_log_probs(model, tokens, structure, allowed, step_rank).reshape(-1, len(allowed))
            active_lp = all_lp[positions]
        members = scoring[positions]
        weighted = active_lp[members] * (flat_weight[positions[members], None] if flat_weight is not None else 1.0)
        biased = weighted + (flat_bias[positions[members]] if flat_bias is not None else 0.0)
        unit_lp = torch.zeros(num_units, len(allowed), device=device).index_add_(
            0, flat_unit[positions[members]], biased) / member_count
        distribution = (unit_lp / temperature if temperature > 0 else unit_lp).softmax(-1)
        if profile is not None:
            distribution = _mix_profile(distribution, unit_lp, profile, positions[members],
                                        flat_unit[positions[members]], member_count)
        choice = torch.zeros(num_units, dtype=torch.long, device=device)
        candidates = torch.nonzero(commit if commit is not None else remaining).flatten()
        choice[candidates] = _draw(distribution[candidates], temperature, generator)
        if commit is None:  # mask-predict: keep the most confident share of each example's hidden units
            confidence = distribution.gather(-1, choice[:, None])[:, 0]
            left = torch.zeros(int(example_of_unit.max()) + 1, device=device).index_add_(
                0, example_of_unit, remaining.float())
            take = torch.ceil(left / (steps - step))[example_of_unit]
            order = _rank_within_example(torch.where(remaining, 1 - confidence, torch.full_like(confidence, 3.0)),
                                         example_of_unit)
            commit = remaining & (order < take)
        kept = commit[flat_unit[positions]]
        written, units = positions[kept], flat_unit[positions[kept]]
        tokens.view(-1)[written] = allowed[choice[units]]
        log_prob.view(-1)[written] = active_lp[kept, choice[units]]
        sampled.view(-1, len(allowed))[written] = distribution[units]
        step_of.view(-1)[written] = step
        if cache is not None:
            cache.commit(tokens.view(-1)[positions])
        if decoding_rank is not None:
            decoding_rank[written] = first_designed_rank + step
        remaining &= ~commit
    log_prob.view(-1)[~scoring] = float("nan")
    return DecodedSequences(tokens, log_prob, sampled, step_of)


def _mix_profile(distribution, unit_lp, profile, positions, units, member_count) -> torch.Tensor:
    """ProteinMPNN's PSSM step on each unit's distribution, the profile averaged over the unit's members:
    (1 - c) p + c f, then p x allowed renormalised; omitted letters (-inf) stay at zero."""
    coef, frequencies, allowed = (value.reshape(-1, *value.shape[2:]).to(distribution.device) for value in profile)
    per_unit = lambda values: torch.zeros(len(distribution), *values.shape[1:], device=distribution.device).index_add_(  # noqa: E731
        0, units, values[positions]) / member_count.reshape(-1, *[1] * (values.dim() - 1))
    c = per_unit(coef)[:, None]
    mixed = ((1 - c) * distribution + c * per_unit(frequencies)) * per_unit(allowed)
    mixed = mixed.masked_fill(torch.isneginf(unit_lp), 0.0)
    return mixed / mixed.sum(-1, keepdim=True).clamp(min=1e-30)


def _draw(distribution: torch.Tensor, temperature: float, generator) -> torch.Tensor:
    """One residue per row: the argmax at temperature 0, else a sample (drawn on the CPU: seeds give the
    same designs on any device)."""
    if len(distribution) == 0:
        return torch.zeros(0, dtype=torch.long, device=distribution.device)
    if temperature > 0:
        return torch.multinomial(distribution.cpu(), 1, generator=generator)[:, 0].to(distribution.device)
    return distribution.argmax(-1)


@torch.no_grad()
def log_probs_with_hidden(model, batch: dict, hidden: torch.Tensor, mask_token_id: int, allowed: torch.Tensor,
                          chunk: int = 16, structure=None) -> torch.Tensor:
    """log p over the 20 amino acids at every position, once per row of ``hidden`` (``[N, L]`` bool): for row
    n, the positions ``hidden[n]`` show the mask token and the rest of ``batch`` (one example) is visible.
    Returns ``[N, L, 20]``. The structure is encoded once; decoder passes run ``chunk`` rows at a time."""
    if structure is None:
        structure = encode(model, batch)
    results = []
    for start in range(0, len(hidden), chunk):
        rows = hidden[start:start + chunk].to(batch["input_ids"].device)
        tokens = batch["input_ids"].expand(len(rows), -1).masked_fill(rows, mask_token_id)
        expanded = type(structure)(**{key: value.expand(len(rows), *value.shape[1:])
                                      for key, value in structure.items()})
        results.append(amino_acid_log_probs(model, tokens, expanded, allowed))
    return torch.cat(results) if results else torch.zeros(0, hidden.shape[1], len(allowed))
