"""Scoring sequences on a backbone: log-likelihood over decoding orders (ProteinMPNN's ``--score_only``) and
masked-marginal mutation scans."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..residues import AMINO_ACIDS
from .proteinmpnn_inputs import PROTEINMPNN_ALPHABET
from .constraints import DesignOptions, plan_design
from .positions import DesignError
from .decoding import amino_acid_log_probs, encode, is_causal, log_probs_with_hidden

ALWAYS_HIDDEN = -2  # a rank for positions that stay hidden and are not scored
CONTEXT = -1        # a rank for positions that stay visible and are not scored (any rank below -2 too: a
                    # causal model sees such positions in the order of their ranks)


@torch.no_grad()
def ranked_log_probs(model, batch: dict, rank: torch.Tensor, mask_token_id: int, allowed: torch.Tensor,
                     chunk: int = 16, structure=None) -> torch.Tensor:
    """log p over the 20 amino acids at each position with rank ≥ 0, seeing exactly the positions of lower
    rank (an autoregressive factorisation when ranks are a permutation; positions sharing a rank are
    decoded together). ``CONTEXT`` positions are always seen, ``ALWAYS_HIDDEN`` never. ``rank``: ``[L]``
    for the one example in ``batch``. Returns ``[L, 20]``; rows of unscored positions are NaN."""
    rank = rank.to(batch["input_ids"].device)
    width = batch["input_ids"].shape[1]
    length = len(rank)
    rank = torch.nn.functional.pad(rank, (0, width - len(rank)), value=CONTEXT)
    if is_causal(model):  # the decoder takes the order itself: one pass
        if structure is None:
            structure = encode(model, batch)
        decoding_rank = torch.where(rank == ALWAYS_HIDDEN, torch.full_like(rank, 2 * width + 1), rank)
        log_probs = amino_acid_log_probs(model, batch["input_ids"], structure, allowed, decoding_rank[None])[0]
        return log_probs.masked_fill((rank < 0)[:, None], float("nan"))[:length]
    levels = torch.unique(rank[rank >= 0])
    hidden = (rank[None, :] >= levels[:, None]) | (rank == ALWAYS_HIDDEN)[None, :]
    log_probs = log_probs_with_hidden(model, batch, hidden, mask_token_id, allowed, chunk, structure)
    result = torch.full((width, len(allowed)), float("nan"), device=log_probs.device)
    for row, level in enumerate(levels.tolist()):
        where = rank == level
        result[where] = log_probs[row, where]
    return result[:length]


@dataclass
class MutationScan:
    """One row per scanned position (or tie group): Δ log-likelihood of each of the 20 amino acids against
    the native residue, with the position hidden (masked marginal). Summed over a group's members."""

    name: str
    labels: list[str] = field(default_factory=list)       # the row's first residue, e.g. "A12"
    natives: list[str] = field(default_factory=list)
    tied: list[list[str]] = field(default_factory=list)   # every residue the row's mutation is applied to
    values: np.ndarray | None = None                       # [rows, 20], alphabet order


@torch.no_grad()
def mutation_scan(model, processor, structure, options: DesignOptions | None = None, chunk: int = 16) -> MutationScan:
    """Every single mutant of the designed chains of ``structure`` (a list of `ProteinChain`), scored as
    log p(mutant) − log p(native) at the hidden position with the rest of the native sequence visible.

    ``options`` picks chains (``chains``) and ties (``tie``, ``homo_oligomer``): a tied row hides every copy
    and sums the copies' differences, i.e. scores the mutation applied to all of them.
    """
    plan = plan_design(structure, replace(options or DesignOptions(), backbone=model.config.backbone))
    device = next(model.parameters()).device
    allowed = torch.tensor(processor.tokenizer.amino_acid_ids, device=device)
    batch = {k: v.to(device) for k, v in processor([plan.example]).items()}
    native = np.array(list(plan.example.sequence))
    standard = np.isin(native, list(AMINO_ACIDS))
    units = [np.flatnonzero((plan.unit_of == u) & plan.scoring & standard) for u in range(plan.num_units)]
    units = sorted((u for u in units if len(u)), key=lambda u: u[0])
    hidden = torch.zeros(len(units), batch["input_ids"].shape[1], dtype=torch.bool)
    for row, members in enumerate(units):
        hidden[row, members] = True
    log_probs = log_probs_with_hidden(model, batch, hidden, processor.tokenizer.mask_token_id, allowed, chunk)
    native_index = np.array([AMINO_ACIDS.index(c) if c in AMINO_ACIDS else 0 for c in native])
    values = np.zeros((len(units), len(AMINO_ACIDS)))
    for row, members in enumerate(units):
        at = log_probs[row, torch.as_tensor(members, device=device)].double().cpu().numpy()  # [members, 20]
        values[row] = (at - at[np.arange(len(members)), native_index[members]][:, None]).sum(0)
    labels = [plan.index.labels[u[0]] for u in units]
    return MutationScan(plan.name, labels, [native[u[0]] for u in units],
                        [[plan.index.labels[p] for p in u] for u in units], values)


def write_scan_csv(scan: MutationScan, path) -> None:
    lines = ["residue,native,tied_with," + ",".join(AMINO_ACIDS)]
    for label, native, tied, row in zip(scan.labels, scan.natives, scan.tied, scan.values):
        lines.append(f"{label},{native},{' '.join(t for t in tied if t != label)}," +
                     ",".join(f"{v:.4f}" for v in row))
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


@dataclass
class SequenceScore:
    """Log-likelihood of one sequence on a backbone, per residue, averaged over decoding orders."""

    name: str
    labels: list[str]             # the scored residues, e.g. "A12"
    letters: list[str]
    log_likelihood: np.ndarray    # [residues] natural log, mean over orders
    num_orders: int

    @property
    def total(self) -> float:
        return float(self.log_likelihood.sum())

    @property
    def mean(self) -> float:
        return float(self.log_likelihood.mean()) if len(self.log_likelihood) else float("nan")


@torch.no_grad()
def score_sequences(model, processor, structure, sequences=None, chains=None, num_orders: int = 1, seed: int = 0,
                    chunk: int = 16, options: DesignOptions | None = None) -> list[SequenceScore]:
    """ProteinMPNN's ``--score_only``: each residue of the chosen chains predicted from the structure and the
    residues before it in a random order (other chains are given first), averaged over ``num_orders``
    seeded orders. ``sequences``: ``[(name, "SEQ/SEQ")]`` for the chosen chains (default: the native one).
    ``options`` (instead of ``chains``): the chains and fixed positions, e.g. from ProteinMPNN's JSONL files;
    fixed residues are given, not scored, as in ProteinMPNN (its loss mask leaves them out)."""
    options = replace(options or DesignOptions(chains=chains), backbone=model.config.backbone)
    plan = plan_design(structure, options)
    device = next(model.parameters()).device
    allowed = torch.tensor(processor.tokenizer.amino_acid_ids, device=device)
    batch = {k: v.to(device) for k, v in processor([plan.example]).items()}
    structure_encoding = encode(model, batch)
    chosen = np.concatenate([plan.index.chain_positions(c) for c in plan.chosen])
    results = []
    for number, (name, text) in enumerate(sequences or [(f"{plan.name}_native", plan.sequence_of(plan.tokens))]):
        letters = plan.tokens.copy()
        flat = str(text).replace("/", "").upper()
        if len(flat) != len(chosen):
            raise DesignError(f"sequence {name}: {len(flat)} residues; chains {','.join(plan.chosen)} have {len(chosen)}")
        letters[chosen] = list(flat)
        tokens = batch["input_ids"].clone()
        tokens[0, : len(letters)] = torch.from_numpy(processor.encode_sequence("".join(letters)))
        scored = np.zeros(len(letters), dtype=bool)
        scored[chosen] = True
        scored &= plan.has_backbone & ~plan.fixed & np.isin(letters, list(AMINO_ACIDS))
        context = ~scored
        totals = np.zeros(int(scored.sum()))
        for order in range(num_orders):
            rng = np.random.default_rng((seed, number, order))
            rank = np.full(len(letters), CONTEXT)
            if is_causal(model):  # given residues come first, in an order of their own (ProteinMPNN)
                rank[context] = -3 * len(letters) + rng.permutation(int(context.sum()))  # below every other rank
            rank[scored] = rng.permutation(int(scored.sum()))
            log_probs = ranked_log_probs(model, {**batch, "input_ids": tokens}, torch.from_numpy(rank),
                                         processor.tokenizer.mask_token_id, allowed, chunk, structure_encoding)
            index = torch.from_numpy(np.flatnonzero(scored)).to(device)
            letter_index = torch.tensor([AMINO_ACIDS.index(c) for c in letters[scored]], device=device)
            totals += log_probs[index, letter_index].double().cpu().numpy()
        results.append(SequenceScore(name, [plan.index.labels[p] for p in np.flatnonzero(scored)],
                                     list(letters[scored]), totals / num_orders, num_orders))
    return results


@torch.no_grad()
def letter_probabilities(model, processor, structure, chains=None, conditional: bool = True, chunk: int = 16,
                         options: DesignOptions | None = None):
    """ProteinMPNN's ``--conditional_probs_only`` (``conditional``: log p(s_i | every other residue and the
    structure), each residue hidden alone, i.e. decoded last) or ``--unconditional_probs_only`` (log p(s_i |
    structure), no residue visible), over its 21 letters ``ACDEFGHIKLMNPQRSTVWYX``.

    Returns (plan, ``[L, 21]`` log-probabilities, NaN outside the chosen chains' residues with a backbone).
    On a causal model a hidden residue sees every visible one, which equals ProteinMPNN's definition exactly
    for one decoder layer (deeper, ProteinMPNN's other residues also see each other in a random order).
    ``options`` (instead of ``chains``): the chains and fixed positions (fixed residues are given, not
    computed: ProteinMPNN's design_mask)."""
    plan = plan_design(structure, replace(options or DesignOptions(chains=chains), backbone=model.config.backbone))
    device = next(model.parameters()).device
    tokenizer = processor.tokenizer
    letters21 = torch.tensor(tokenizer.convert_tokens_to_ids(list(PROTEINMPNN_ALPHABET)), device=device)
    batch = {k: v.to(device) for k, v in processor([plan.example]).items()}
    width, scored = batch["input_ids"].shape[1], np.flatnonzero(plan.scoring)
    hidden = torch.zeros(len(scored) if conditional else 1, width, dtype=torch.bool)
    if conditional:
        hidden[torch.arange(len(scored)), torch.from_numpy(scored)] = True
    else:
        hidden[0, : len(plan.index)] = True
    log_probs = log_probs_with_hidden(model, batch, hidden, tokenizer.mask_token_id, letters21, chunk)
    result = np.full((len(plan.index), len(PROTEINMPNN_ALPHABET)), np.nan, dtype=np.float32)
    rows = torch.arange(len(scored)) if conditional else torch.zeros(len(scored), dtype=torch.long)
    result[scored] = log_probs[rows, torch.from_numpy(scored)].float().cpu().numpy()
    return plan, result


def write_letter_probabilities(tables, path) -> None:
    """One TSV row per residue with probabilities: structure, residue, native, log p of each of the 21
    letters. ``tables``: [(structure name, plan, log-probabilities)] as `letter_probabilities` gives them."""
    lines = ["structure\tresidue\tnative\t" + "\t".join(f"log_p_{a}" for a in PROTEINMPNN_ALPHABET)]
    for name, plan, log_probs in tables:
        for position in np.flatnonzero(np.isfinite(log_probs).all(1)):
            lines.append(f"{name}\t{plan.index.labels[position]}\t{plan.example.sequence[position]}\t" +
                         "\t".join(f"{v:.5f}" for v in log_probs[position]))
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def write_letter_probabilities_npz(plan, log_probs: np.ndarray, path) -> None:
    """ProteinMPNN's conditional_probs_only/NAME.npz (or unconditional_probs_only): ``log_p`` [1, L, 21] (0
    where not computed), ``S`` the native as letter indices, ``mask`` residues with a backbone,
    ``design_mask`` the residues computed."""
    letters = [PROTEINMPNN_ALPHABET.find(c) if c in AMINO_ACIDS else 20 for c in plan.example.sequence]
    np.savez(path, log_p=np.nan_to_num(log_probs, nan=0.0)[None], S=np.array(letters, np.int32),
             mask=plan.has_backbone.astype(np.float32), design_mask=plan.scoring.astype(np.float32))


def write_score_tsv(scores: list[SequenceScore], path, extra=()) -> None:
    """Rows of (sequence, residue, letter, log-likelihood), then the summary lines and any ``extra`` ones."""
    lines = ["sequence\tresidue\tletter\tlog_likelihood"]
    for score in scores:
        lines += [f"{score.name}\t{label}\t{letter}\t{value:.5f}"
                  for label, letter, value in zip(score.labels, score.letters, score.log_likelihood)]
    lines += [summary_line(score) for score in scores] + list(extra)
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def summary_line(score: SequenceScore) -> str:
    return (f"# {score.name}: mean_log_likelihood={score.mean:.5f} score={-score.mean:.5f} "
            f"total_log_likelihood={score.total:.4f} residues={len(score.labels)} orders={score.num_orders}")
