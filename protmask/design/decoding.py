"""Decoding sequences from a model: mask-predict and autoregressive, over *units* (one residue or a tie group
that receives one residue), with a bias over the 20 amino acids; and log-probabilities with chosen positions
hidden, the primitive of scoring and mutation scans.

Every function here works on flat positions of a batch (``b * L + i``) so that one call serves one structure
or a batch of them. The structure encoder runs once per call; only the decoder runs per round or step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def encode(model, batch: dict):
    """The structure encoder's output for ``batch``, reusable by every decoder pass over it."""
    return model.protmask.encode_structure(batch["coords"], batch["attention_mask"], batch["residue_index"],
                                           batch["chain_index"])


def amino_acid_log_probs(model, tokens: torch.Tensor, structure, allowed: torch.Tensor) -> torch.Tensor:
    """log p over the 20 amino acids at every position: ``[B, L, 20]`` (float32)."""
    logits = model.logits_from_structure(tokens, structure)[..., allowed]
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
           structure=None) -> DecodedSequences:
    """Fill every position with ``unit_of >= 0`` (``[B, L]``): positions of one unit get one residue.

    A unit's distribution is the mean of its ``scoring`` members' log-probabilities plus ``bias``
    (``[B, L, 20]``, -inf omits), divided by ``temperature``: the argmax at temperature 0, else a sample.
    ``mask_predict`` starts with all units hidden and each round commits the most confident 1/(rounds left);
    ``autoregressive`` decodes one unit per step in a random order drawn from ``generator``, each seeing
    the residues decoded before it. ``structure``: the batch's encoding, when the caller already has it.
    """
    if decoding not in DECODINGS:
        raise ValueError(f"decoding must be one of {DECODINGS}, got {decoding!r}")
    device = batch["input_ids"].device
    shape = batch["input_ids"].shape
    if structure is None:
        structure = encode(model, batch)
    flat_unit = unit_of.reshape(-1).to(device)
    designed = flat_unit >= 0
    members = torch.nonzero(designed & scoring.reshape(-1).to(device)).flatten()
    num_units = int(flat_unit.max()) + 1 if bool(designed.any()) else 0
    example_of_unit = torch.zeros(num_units, dtype=torch.long, device=device)
    example_of_unit[flat_unit[designed]] = torch.nonzero(designed).flatten() // shape[1]
    member_count = torch.bincount(flat_unit[members], minlength=num_units).clamp(min=1)[:, None].float()
    flat_bias = bias.reshape(-1, len(allowed)).to(device) if bias is not None else None

    tokens = batch["input_ids"].clone()
    tokens.view(-1)[designed] = mask_token_id
    log_prob = torch.full(shape, float("nan"), device=device)
    sampled = torch.zeros(*shape, len(allowed), device=device)
    step_of = torch.full(shape, -1, dtype=torch.long, device=device)
    remaining = torch.ones(num_units, dtype=torch.bool, device=device)
    if decoding == "autoregressive":
        order_key = torch.rand(num_units, generator=generator, device="cpu").to(device)
        order_rank = _rank_within_example(order_key, example_of_unit) if num_units else order_key.long()
        steps = int(order_rank.max()) + 1 if num_units else 0
    else:
        steps = max(1, rounds)
    for step in range(steps):
        if not bool(remaining.any()):
            break
        position_lp = amino_acid_log_probs(model, tokens, structure, allowed).reshape(-1, len(allowed))
        biased = position_lp[members] + (flat_bias[members] if flat_bias is not None else 0.0)
        unit_lp = torch.zeros(num_units, len(allowed), device=device).index_add_(0, flat_unit[members], biased)
        unit_lp = unit_lp / member_count
        distribution = (unit_lp / temperature if temperature > 0 else unit_lp).softmax(-1)
        if temperature > 0:
            choice = torch.multinomial(distribution.cpu(), 1, generator=generator)[:, 0].to(device)
        else:
            choice = distribution.argmax(-1)
        if decoding == "autoregressive":
            commit = remaining & (order_rank == step)
        else:
            confidence = distribution.gather(-1, choice[:, None])[:, 0]
            left = torch.zeros(int(example_of_unit.max()) + 1, device=device).index_add_(
                0, example_of_unit, remaining.float())
            take = torch.ceil(left / (steps - step))[example_of_unit]
            rank = _rank_within_example(torch.where(remaining, 1 - confidence, torch.full_like(confidence, 3.0)),
                                        example_of_unit)
            commit = remaining & (rank < take)
        written = torch.nonzero(designed & commit[flat_unit.clamp(min=0)]).flatten()
        units = flat_unit[written]
        tokens.view(-1)[written] = allowed[choice[units]]
        log_prob.view(-1)[written] = position_lp[written, choice[units]]
        sampled.view(-1, len(allowed))[written] = distribution[units]
        step_of.view(-1)[written] = step
        remaining &= ~commit
    no_backbone = ~scoring.to(device)
    log_prob[no_backbone] = float("nan")
    return DecodedSequences(tokens, log_prob, sampled, step_of)


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
