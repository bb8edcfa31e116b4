"""Token-weighted masked-LM metrics (NLL, perplexity, accuracy) and per-chain recovery, summed per rank and
reduced across ranks once."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .residues import AMINO_ACIDS

#: The label of a position that is not scored (visible context, padding): PyTorch's cross-entropy default.
IGNORE_INDEX = -100
#: The classes a label can take: the 20 amino acids and X, which end the vocabulary (after the special tokens).
RESIDUE_LETTERS = len(AMINO_ACIDS) + 1


def masked_lm_sums(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0):
    """(summed loss, scored positions, correct predictions) over positions whose label is not IGNORE_INDEX, as
    device tensors: no host synchronisation (no boolean indexing, no `.item()`), so a training step can add
    them up and read them once. The loss is float32 cross-entropy whatever the logits' dtype; with nothing
    scored every sum is 0. The one loss and metric path of training, validation, evaluation and design.

    Label smoothing e spreads its mass over the 21 residue letters only, as ProteinMPNN's does: the target is
    (1 - e) one-hot + e / 21 there. The special tokens get none (a converted head gives them -1e4)."""
    scored = labels != IGNORE_INDEX
    flat = logits.flatten(0, -2).float()
    loss = F.cross_entropy(flat, labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    if label_smoothing:
        letter_log_probs = flat[:, -RESIDUE_LETTERS:] - flat.logsumexp(-1, keepdim=True)
        uniform = torch.where(scored.flatten(), -letter_log_probs.mean(-1), 0.0).sum()
        loss = (1 - label_smoothing) * loss + label_smoothing * uniform
    correct = ((logits.argmax(-1) == labels) & scored).sum()
    return loss, scored.sum(), correct


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, reduction: str = "mean"):
    """Cross-entropy over scored positions: their sum, or their mean (0 when nothing is scored, not NaN)."""
    loss, tokens, _ = masked_lm_sums(logits, labels, label_smoothing)
    return loss if reduction == "sum" else loss / tokens.clamp(min=1)


class MaskedLMStats:
    """Running sums over scored positions; `reduce` adds them across ranks in one collective.

    Loss, perplexity and accuracy are token-weighted (every scored residue counts once, as ProteinMPNN and
    ESM report). Recovery is per chain (each chain's fraction of correctly predicted scored residues),
    averaged over chains: long chains do not dominate it.
    """

    FIELDS = ("loss_sum", "tokens", "correct", "chain_recovery_sum", "chains")

    def __init__(self, device="cpu"):
        self.sums = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=device)
        self.chain_recoveries: list[float] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor, chain_index: torch.Tensor,
               label_smoothing: float = 0.0) -> None:
        scored = labels != IGNORE_INDEX
        if not bool(scored.any()):
            return
        loss, tokens, correct = masked_lm_sums(logits, labels, label_smoothing)
        hits = (logits.argmax(-1) == labels) & scored
        # Per chain: one id per (example, chain) pair.
        chain_id = torch.arange(labels.shape[0], device=labels.device)[:, None] * (int(chain_index.max()) + 2) + (
            chain_index + 1)
        ids, inverse = torch.unique(chain_id[scored], return_inverse=True)
        per_chain_tokens = torch.zeros(len(ids), device=labels.device).index_add_(0, inverse, torch.ones_like(inverse, dtype=torch.float))
        per_chain_hits = torch.zeros(len(ids), device=labels.device).index_add_(0, inverse, hits[scored].float())
        recovery = per_chain_hits / per_chain_tokens
        self.chain_recoveries += recovery.tolist()
        self.sums += torch.tensor(
            [float(loss), float(tokens), float(correct), float(recovery.sum()), float(len(ids))],
            dtype=torch.float64, device=self.sums.device)

    def reduce(self, accelerator=None) -> dict:
        sums = accelerator.reduce(self.sums, reduction="sum") if accelerator is not None else self.sums
        return summarize(sums.tolist())


def summarize(sums) -> dict:
    loss_sum, tokens, correct, recovery_sum, chains = sums
    if tokens == 0:
        return {"loss": float("nan"), "perplexity": float("nan"), "accuracy": float("nan"),
                "recovery": float("nan"), "tokens": 0, "chains": 0}
    loss = loss_sum / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "accuracy": correct / tokens,
        "recovery": recovery_sum / chains if chains else float("nan"),
        "tokens": int(tokens),
        "chains": int(chains),
    }


#: Two rules say when a residue is at a binding site of a class (small molecule, metal, nucleotide). The
#: LigandMPNN paper's (its sequence-recovery figures): a heavy atom of the residue's side chain, CB included,
#: lies within SIDE_CHAIN_SITE_CUTOFF (Å) of a non-protein heavy atom of the class; glycine is never a site.
#: LigandMPNN run.py's (the residues its ligand confidence is computed over, --ligand_mpnn_cutoff_for_score):
#: the virtual CB lies within SITE_CUTOFF; it needs the backbone only, so training's validation uses it.
SIDE_CHAIN_SITE_CUTOFF = 5.0
SITE_CUTOFF = 8.0
SITE_CLASSES = ("small_molecule", "metal", "nucleotide")  # structure.ATOM_CLASSES, by index
SITE_DEFINITIONS = {
    "side_chain": f"a side-chain heavy atom (CB included) within {SIDE_CHAIN_SITE_CUTOFF:g} Å of a non-protein "
                  "heavy atom of the class (the LigandMPNN paper's rule)",
    "virtual_cb": f"virtual CB within {SITE_CUTOFF:g} Å of a non-protein heavy atom of the class (LigandMPNN "
                  "run.py's --ligand_mpnn_cutoff_for_score)",
}


def side_chain_sites(side_chain_atoms: np.ndarray, atom_coords: np.ndarray, atom_classes: np.ndarray) -> np.ndarray:
    """``[L, 3]`` bool, the paper's rule: some atom of the residue's side chain (``side_chain_atoms``
    ``[L, K, 3]``, NaN where absent) lies within `SIDE_CHAIN_SITE_CUTOFF` of an atom (``atom_coords``
    ``[M, 3]``) of each class (``atom_classes`` ``[M]``, indices into `SITE_CLASSES`)."""
    length = side_chain_atoms.shape[0]
    sites = np.zeros((length, len(SITE_CLASSES)), dtype=bool)
    points = side_chain_atoms.reshape(-1, 3)
    present = np.flatnonzero(np.isfinite(points).all(-1))
    if len(present) == 0 or len(atom_coords) == 0:
        return sites
    owner = present // side_chain_atoms.shape[1]
    atoms = torch.from_numpy(np.asarray(atom_coords, dtype=np.float32))
    classes = torch.from_numpy(np.asarray(atom_classes, dtype=np.int64))
    rows = max(1, 2**24 // len(atoms))  # bounded memory on a ribosome's worth of atoms
    for start in range(0, len(present), rows):
        near = torch.cdist(torch.from_numpy(points[present[start:start + rows]]), atoms) < SIDE_CHAIN_SITE_CUTOFF
        for c in range(len(SITE_CLASSES)):
            hit = (near & (classes == c)[None, :]).any(-1).numpy()
            sites[owner[start:start + rows][hit], c] = True
    return sites


def binding_sites(batch: dict) -> torch.Tensor:
    """``[B, L, 3]`` bool: the residue has a backbone and its virtual CB is within `SITE_CUTOFF` of a context
    atom of each class (the batch's ``context_coords``, ``context_mask``, ``context_classes``)."""
    from .models.modeling_protmask import BackboneFeatures

    coords = batch["coords"].float()
    complete = torch.isfinite(coords).all(-1).all(-1)
    cb = BackboneFeatures.atoms(torch.nan_to_num(coords))[:, :, 4]
    near = torch.cdist(cb, batch["context_coords"].float()) < SITE_CUTOFF  # [B, L, M]
    near &= complete[:, :, None] & batch["context_mask"].bool()[:, None, :]
    classes = batch["context_classes"]
    return torch.stack([(near & (classes == c)[:, None, :]).any(-1) for c in range(len(SITE_CLASSES))], -1)


class SiteStats:
    """Teacher-forced accuracy at binding sites, per class: scored residues at a site and those right."""

    def __init__(self, device="cpu"):
        self.sums = torch.zeros(2, len(SITE_CLASSES), dtype=torch.float64, device=device)

    def update(self, logits: torch.Tensor, batch: dict) -> None:
        sites = binding_sites(batch) & (batch["labels"] != IGNORE_INDEX)[..., None]
        hits = (logits.argmax(-1) == batch["labels"])[..., None] & sites
        self.sums += torch.stack([sites.sum((0, 1)), hits.sum((0, 1))]).to(self.sums)

    def reduce(self, accelerator=None) -> dict:
        sums = accelerator.reduce(self.sums, reduction="sum") if accelerator is not None else self.sums
        out = {}
        for i, name in enumerate(SITE_CLASSES):
            total, right = float(sums[0, i]), float(sums[1, i])
            out[f"site_residues_{name}"] = int(total)
            out[f"site_accuracy_{name}"] = right / total if total else float("nan")
        return out
