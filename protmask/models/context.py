"""Atomic context (LigandMPNN, Dauparas et al., Nature Methods 2025): each residue's nearest non-protein heavy
atoms (small molecules, metals, nucleic acids), their features, and the context encoder whose output joins the
residue's node state after the structure encoder.

Per residue, the ``config.context_atoms`` atoms nearest its virtual CB are its context. An atom is typed by its
element (one-hot of the atomic number, the periodic group and the period); a residue-atom pair carries the RBFs
of the atom's distances to N, CA, C, O and CB and 4 numbers of its direction in the residue's N-CA-C frame; two
atoms of one residue's context carry the RBFs of their distance. Two rounds then update the atoms from each
other and the residue from its atoms.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..residues import SIDE_CHAIN_ELEMENTS
from .configuration_protmask import ProtMaskConfig

#: Atom types: the atomic number, 0 for an unknown element or padding (one-hot over 0 … 119).
NUM_ELEMENT_CLASSES = 120
NUM_GROUPS, NUM_PERIODS = 19, 8  # one-hot over 0 … 18 and 0 … 7, 0 for no element
NUM_TYPE_FEATURES = NUM_ELEMENT_CLASSES + NUM_GROUPS + NUM_PERIODS
NUM_TYPE_EMBEDDING = 64
NUM_ANGLE_FEATURES = 4
#: The residue atoms an atom's distances are measured from: N, CA, C, O and the virtual CB.
NUM_RESIDUE_ATOMS = 5
#: Squared distance that ranks a padding atom after every real one.
_FAR = float("inf")


@functools.lru_cache(maxsize=1)
def periodic_table() -> tuple[torch.Tensor, torch.Tensor]:
    """(group, period) of each atom type 0 … 119 (0 for 0 and 119, no element): lanthanides and actinides
    are group 3."""
    period_ends = (2, 10, 18, 36, 54, 86, 118)
    group, period = [0], [0]
    for number in range(1, period_ends[-1] + 1):
        row = next(i for i, end in enumerate(period_ends) if number <= end)
        column = number - (period_ends[row - 1] if row else 0)  # 1-based place in its period
        if row == 0:
            g = 1 if column == 1 else 18
        elif row in (1, 2):
            g = column if column <= 2 else column + 10
        elif row in (3, 4):
            g = column
        else:  # periods 6 and 7: 15 lanthanides / actinides share group 3
            g = column if column <= 2 else 3 if column <= 17 else column - 14
        group.append(g)
        period.append(row + 1)
    padding = [0] * (NUM_ELEMENT_CLASSES - len(group))
    return torch.tensor(group + padding), torch.tensor(period + padding)


def nearest_context_atoms(cb: torch.Tensor, context_coords: torch.Tensor, context_elements: torch.Tensor,
                          context_mask: torch.Tensor, count: int):
    """Each residue's ``count`` context atoms nearest its CB ``[B, L, 3]``, from the example's atoms
    (``[B, M, 3]``, ``[B, M]`` atomic numbers, ``[B, M]`` mask) → coordinates ``[B, L, count, 3]`` (zero where
    padding), elements ``[B, L, count]`` and mask ``[B, L, count]``. A residue whose example has fewer atoms
    gets padding after them, as LigandMPNN does."""
    batch, atoms = context_mask.shape
    if atoms < count:  # pad so that top-k has enough entries; the padding is masked
        pad = count - atoms
        context_coords = F.pad(context_coords, (0, 0, 0, pad))
        context_elements = F.pad(context_elements, (0, pad))
        context_mask = F.pad(context_mask, (0, pad))
    valid = context_mask.bool()
    squared = (cb[:, :, None, :] - context_coords[:, None, :, :]).square().sum(-1)
    squared = squared.masked_fill(~valid[:, None, :], _FAR)
    _, index = squared.topk(count, dim=-1, largest=False)  # [B, L, count]
    rows = torch.arange(batch, device=cb.device)[:, None, None]
    mask = valid[rows, index]
    coords = context_coords[rows, index] * mask[..., None]
    elements = context_elements.long()[rows, index] * mask
    return coords, elements, mask


#: Side-chain context reads the side chains of each residue's 16 nearest residues by CA (itself first), as
#: LigandMPNN does; the nearest ``context_atoms`` of those atoms and the non-protein ones are the context.
SIDE_CHAIN_NEIGHBORS = 16


def nearest_with_side_chains(cb: torch.Tensor, selected, side_chain_coords: torch.Tensor,
                             side_chain_mask: torch.Tensor, neighbor_index: torch.Tensor, count: int):
    """The ``count`` atoms nearest each residue's CB among its selected non-protein atoms (`nearest_context_atoms`)
    and the side-chain atoms (``[B, L, S, 3]``, mask ``[B, L, S]``) of its `SIDE_CHAIN_NEIGHBORS` nearest
    residues (``neighbor_index`` ``[B, L, K]``, nearest first)."""
    nearest = neighbor_index[:, :, :SIDE_CHAIN_NEIGHBORS]
    batch, length, neighbors = nearest.shape
    rows = torch.arange(batch, device=cb.device)[:, None, None]
    side_coords = side_chain_coords.float()[rows, nearest].reshape(batch, length, -1, 3)
    side_mask = side_chain_mask.bool()[rows, nearest].reshape(batch, length, -1)
    elements = torch.tensor(SIDE_CHAIN_ELEMENTS, device=cb.device).repeat(neighbors).expand(batch, length, -1)
    atoms, atom_elements, atom_mask = selected
    # Side chains first, then the other atoms, as LigandMPNN concatenates them (the order breaks exact ties).
    coords = torch.cat([side_coords, atoms], 2)
    mask = torch.cat([side_mask, atom_mask], 2)
    squared = (cb[:, :, None, :] - coords).square().sum(-1).masked_fill(~mask, _FAR)
    _, index = squared.topk(count, dim=-1, largest=False)
    mask = mask.gather(2, index)
    coords = coords.gather(2, index[..., None].expand(-1, -1, -1, 3)) * mask[..., None]
    return coords, torch.cat([elements, atom_elements], 2).gather(2, index) * mask, mask


def radial_basis(distance: torch.Tensor, config: ProtMaskConfig) -> torch.Tensor:
    """``exp(-((d - c) / w)²)`` over the config's RBF centres: ``[...]`` → ``[..., num_rbf]``."""
    centers = torch.linspace(config.rbf_min, config.rbf_max, config.num_rbf, device=distance.device)
    width = (config.rbf_max - config.rbf_min) / config.num_rbf
    return torch.exp(-(((distance[..., None] - centers) / width) ** 2))


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b).square().sum(-1) + 1e-6).sqrt()


def direction_features(n, ca, c, atoms) -> torch.Tensor:
    """An atom's direction from CA in the residue's frame (x along CA→N, y in the N-CA-C plane): the
    cosine and sine of its azimuth, and of its elevation. ``[B, L, 3]`` × 3, ``[B, L, K, 3]`` → ``[B, L, K, 4]``."""
    e1 = F.normalize(n - ca, dim=-1)
    v2 = c - ca
    e2 = F.normalize(v2 - e1 * (e1 * v2).sum(-1, keepdim=True), dim=-1)
    e3 = torch.cross(e1, e2, dim=-1)
    frame = torch.stack([e1, e2, e3], dim=-2)  # [B, L, 3 axes, 3]
    local = torch.einsum("blpq,blkq->blkp", frame, atoms - ca[:, :, None])
    planar = torch.sqrt(local[..., 0] ** 2 + local[..., 1] ** 2 + 1e-8)
    full = local.norm(dim=-1) + 1e-8
    return torch.stack([local[..., 0] / planar, local[..., 1] / planar, planar / full, local[..., 2] / full], -1)


class ContextFeatures(nn.Module):
    """Per residue and context atom: the residue-atom edge state, the atom's type state, and the states of
    the atom pairs of the residue's context."""

    def __init__(self, config: ProtMaskConfig):
        super().__init__()
        hidden, num_rbf = config.hidden_dim, config.num_rbf
        self.config = config
        self.type_projection = nn.Linear(NUM_TYPE_FEATURES, NUM_TYPE_EMBEDDING)
        self.edge_projection = nn.Linear(NUM_RESIDUE_ATOMS * num_rbf + NUM_TYPE_EMBEDDING + NUM_ANGLE_FEATURES, hidden)
        self.edge_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.atom_projection = nn.Linear(NUM_TYPE_FEATURES, hidden, bias=False)
        self.atom_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.pair_projection = nn.Linear(num_rbf, hidden, bias=False)
        self.pair_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def element_types(self, elements: torch.Tensor) -> torch.Tensor:
        """Atomic numbers ``[...]`` → the 147 one-hot type features ``[..., 147]``."""
        # Tables, not buffers: loading a saved model fills only the tensors its weights file holds.
        group, period = (table.to(elements.device) for table in periodic_table())
        elements = elements.clamp(0, NUM_ELEMENT_CLASSES - 1)
        return torch.cat([F.one_hot(elements, NUM_ELEMENT_CLASSES), F.one_hot(group[elements], NUM_GROUPS),
                          F.one_hot(period[elements], NUM_PERIODS)], -1).float()

    def forward(self, residue_atoms, atoms, elements):
        """``residue_atoms`` ``[B, L, 5, 3]`` (N, CA, C, O, CB); ``atoms`` ``[B, L, K, 3]``; ``elements``
        ``[B, L, K]`` → (edges ``[B, L, K, H]``, atom states ``[B, L, K, H]``, pairs ``[B, L, K, K, H]``)."""
        n, ca, c = residue_atoms[:, :, 0], residue_atoms[:, :, 1], residue_atoms[:, :, 2]
        types = self.element_types(elements)
        distances = [radial_basis(_distance(residue_atoms[:, :, None, a], atoms), self.config)
                     for a in (0, 1, 2, 3, 4)]
        edge = torch.cat([*distances, self.type_projection(types), direction_features(n, ca, c, atoms)], -1)
        edges = self.edge_norm(self.edge_projection(edge))
        pairs = radial_basis(_distance(atoms[:, :, :, None], atoms[:, :, None, :]), self.config)
        pairs = self.pair_norm(self.pair_projection(pairs))
        atom_states = self.atom_norm(self.atom_projection(types))
        return edges, atom_states, pairs


class ContextEncoder(nn.Module):
    """The residue's context update: atoms exchange messages within each residue's context (``atom_layers``),
    then the residue reads its atoms (``residue_layers``), twice; the result joins the node state through a
    projection and a layer norm, so a residue without context atoms keeps a fixed offset."""

    def __init__(self, config: ProtMaskConfig, node_update_class):
        super().__init__()
        hidden = config.hidden_dim
        self.count = config.context_atoms
        self.noise = config.backbone_noise
        self.features = ContextFeatures(config)
        self.edge_input = nn.Linear(hidden, hidden)
        self.node_input = nn.Linear(hidden, hidden)
        self.atom_input = nn.Linear(hidden, hidden)
        self.pair_input = nn.Linear(hidden, hidden)
        self.atom_layers = nn.ModuleList(node_update_class(config, neighbor_dim=0) for _ in range(2))
        self.residue_layers = nn.ModuleList(node_update_class(config, neighbor_dim=hidden) for _ in range(2))
        self.output = nn.Linear(hidden, hidden, bias=False)
        self.output_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def select(self, clean_atoms, context_coords, context_elements, context_mask, neighbor_index=None,
               side_chains=None):
        """The nearest atoms of each residue, chosen on the coordinates as given (before any training noise).
        ``side_chains``: (coordinates ``[B, L, S, 3]``, mask ``[B, L, S]``) of side-chain atoms that may join
        the context, each residue choosing among those of its nearest residues in ``neighbor_index``."""
        with torch.autocast(device_type=clean_atoms.device.type, enabled=False):
            cb = clean_atoms[:, :, 4].float()
            selected = nearest_context_atoms(cb, context_coords.float(), context_elements, context_mask, self.count)
            if side_chains is None:
                return selected
            return nearest_with_side_chains(cb, selected, *side_chains, neighbor_index, self.count)

    def forward(self, node_states, node_mask, residue_atoms, selected):
        """``residue_atoms`` ``[B, L, 5, 3]`` as the structure encoder saw them (noised in training);
        ``selected`` from `select`. Returns the updated node states."""
        atoms, elements, atom_mask = selected
        if self.training and self.noise > 0:
            atoms = atoms + self.noise * torch.randn_like(atoms)
        with torch.autocast(device_type=atoms.device.type, enabled=False):
            edges, atom_states, pairs = self.features(residue_atoms.float(), atoms.float(), elements)
        dtype = node_states.dtype
        atom_mask = atom_mask.to(dtype)
        edges = self.edge_input(edges.to(dtype))
        atom_states = self.atom_input(atom_states.to(dtype))
        pairs = self.pair_input(pairs.to(dtype))
        batch, length, count, hidden = atom_states.shape
        flat_mask = atom_mask.reshape(batch * length, count)
        pair_mask = flat_mask[:, :, None] * flat_mask[:, None, :]
        flat_pairs = pairs.reshape(batch * length, count, count, hidden)
        context = self.node_input(node_states)
        for atom_layer, residue_layer in zip(self.atom_layers, self.residue_layers):
            atom_states = atom_layer(atom_states.reshape(batch * length, count, hidden), flat_pairs, None, None,
                                     flat_mask, pair_mask).view(batch, length, count, hidden)
            context = residue_layer(context, edges, None, None, node_mask, atom_mask,
                                    residue_layer.neighbor_input(atom_states))
        return node_states + self.output_norm(self.dropout(self.output(context)))
