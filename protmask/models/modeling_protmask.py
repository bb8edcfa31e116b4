"""`ProtMaskModel` and `ProtMaskForMaskedLM`: a message-passing structure encoder over a k-nearest-neighbour
backbone graph and a decoder that predicts hidden residues from structure and the visible sequence.

Top to bottom: geometry helpers, `BackboneFeatures` (coordinates → graph and edge states), `EncoderLayer`,
`DecoderLayer`, the `PreTrainedModel` base, the bare model and the masked-LM head.

Speed: every message of ProteinMPNN is an MLP over the concatenation [h_i, h_ij, h_j] (3H inputs per edge).
Its first linear layer is a sum of three projections, so here each node state is projected once per node
and only the projection is gathered onto its k edges; the last linear layer of the node message commutes
with the sum over neighbours, so it runs once per node, not once per edge. That is 5H² multiply-adds per
edge per encoder layer instead of 10H², and 2H² per decoder layer instead of 6H², with the same functions
representable. Geometry is computed on the k neighbours only, never as L×L per atom pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MaskedLMOutput
from transformers.utils import ModelOutput

from ..metrics import masked_lm_loss
from ..residues import has_backbone
from .configuration_protmask import ProtMaskConfig
from .context import ContextEncoder

# Ideal-geometry coefficients for the virtual CB from N, CA, C (as in ProteinMPNN and trRosetta).
_CB_A, _CB_B, _CB_C = -0.58273431, 0.56802827, -0.54067466
NUM_ATOM_TYPES = 5  # N, CA, C, O and the virtual CB


def gather_neighbors(values: torch.Tensor, neighbor_index: torch.Tensor) -> torch.Tensor:
    """``values[b, neighbor_index[b, i, k]]``: ``[B, L, *F]`` at ``[B, L, K]`` → ``[B, L, K, *F]``."""
    batch, length, k = neighbor_index.shape
    flat = neighbor_index.reshape(batch, length * k)
    feature_shape = values.shape[2:]
    index = flat.view(batch, length * k, *([1] * len(feature_shape))).expand(batch, length * k, *feature_shape)
    return values.gather(1, index).view(batch, length, k, *feature_shape)


def edge_message_input(edge_states, edge_weight, self_projection, neighbor_projection, neighbor_index):
    """``edge_states @ edge_weightᵀ + self_projection[i] + neighbor_projection[j]`` for every edge.

    The first layer of a message MLP over [h_i, h_ij, h_j], computed without the concatenation: node terms
    are projected once per node, gathered onto edges, and the edge GEMM adds onto them (addmm), so no
    [B, L, K, 3H] tensor is made. With ``neighbor_index`` None, ``neighbor_projection`` is already per edge
    ``[B, L, K, H]`` (the causal decoder picks it per edge). Out of place on purpose: an in-place add or
    addmm on these views makes autograd copy every edge gradient back through them (measured: 7 % of a CPU
    training step).
    """
    if neighbor_projection is None:  # messages over [h_i, h_ij] only (the context atoms' layers)
        node_terms = self_projection[:, :, None].expand(*edge_states.shape[:-1], self_projection.shape[-1])
        node_terms = node_terms.contiguous()
    else:
        if neighbor_index is not None:
            neighbor_projection = gather_neighbors(neighbor_projection, neighbor_index)
        node_terms = neighbor_projection + self_projection[:, :, None]
    hidden, out = edge_states.shape[-1], node_terms.shape[-1]
    # Explicit casts: under autocast the node terms are half precision, the edge states may not be.
    summed = torch.addmm(node_terms.view(-1, out), edge_states.reshape(-1, hidden).to(node_terms.dtype),
                         edge_weight.t().to(node_terms.dtype))
    return summed.view(node_terms.shape)


@dataclass
class StructureEncoding(ModelOutput):
    """What the encoder computed from a backbone, reusable across decoder passes (iterative design).

    node_states: ``[B, L, H]``; edge_states: ``[B, L, K, H]``; neighbor_index: ``[B, L, K]``;
    node_mask: ``[B, L]`` (float, 1 where the residue has a complete backbone);
    edge_mask: ``[B, L, K]`` (float, 1 where both ends are such residues);
    causal_edge_mask: ``[B, L, K]``, the edges ProteinMPNN's decoder counts: from such a residue to any residue
    of the structure, with or without a backbone, but not to padding (so a structure with fewer residues than
    neighbours decodes in a padded batch as it does alone).
    """

    node_states: torch.Tensor | None = None
    edge_states: torch.Tensor | None = None
    neighbor_index: torch.Tensor | None = None
    node_mask: torch.Tensor | None = None
    edge_mask: torch.Tensor | None = None
    causal_edge_mask: torch.Tensor | None = None


@dataclass
class ProtMaskModelOutput(ModelOutput):
    """last_hidden_state: decoder output ``[B, L, H]``; structure: the encoder's `StructureEncoding`."""

    last_hidden_state: torch.Tensor | None = None
    structure: StructureEncoding | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class BackboneFeatures(nn.Module):
    """Backbone coordinates → k-nearest-neighbour graph, edge states and masks.

    Edge features: radial basis functions of the 25 distances between the N, CA, C, O and virtual CB atoms
    of a residue and its neighbour, plus an embedding of their relative sequence position (clipped to
    ±max_relative_position, with one class for "different chain").
    """

    #: The backbone columns a residue needs (see `protmask.residues.BACKBONE_COLUMNS`).
    backbone = "full"

    def __init__(self, config: ProtMaskConfig):
        super().__init__()
        self.num_neighbors = config.num_neighbors
        self.num_rbf = config.num_rbf
        self.rbf_min, self.rbf_max = config.rbf_min, config.rbf_max
        self.max_relative_position = config.max_relative_position
        self.backbone_noise = config.backbone_noise
        self.rbf_projection = nn.Linear(self.num_atom_pairs() * config.num_rbf, config.hidden_dim, bias=False)
        self.position_embedding = nn.Embedding(2 * config.max_relative_position + 2, config.hidden_dim)
        self.norm = nn.LayerNorm(config.hidden_dim, eps=config.layer_norm_eps)
        self.edge_input = nn.Linear(config.hidden_dim, config.hidden_dim)

    @staticmethod
    def num_atom_pairs() -> int:
        return NUM_ATOM_TYPES * NUM_ATOM_TYPES

    def forward(self, coords, attention_mask, residue_index, chain_index, return_atoms: bool = False):
        """(edge states, neighbour index, node mask, edge mask); with ``return_atoms`` also the N, CA, C, O and
        CB ``[B, L, 5, 3]`` as featurised (noised in training) and as given (what atomic context is chosen by)."""
        # Geometry in float32 even under autocast: bf16 distances would blur the neighbour ranking.
        with torch.autocast(device_type=coords.device.type, enabled=False):
            coords = coords.float()
            node_mask = attention_mask.bool() & has_backbone(coords, self.backbone)
            coords = torch.where(node_mask[..., None, None], coords, torch.zeros_like(coords))
            clean = coords
            if self.training and self.backbone_noise > 0:
                coords = coords + self.backbone_noise * torch.randn_like(coords) * node_mask[..., None, None]
            atoms = self.atoms(coords)  # [B, L, A, 3]

            length = coords.shape[1]
            k = min(self.num_neighbors, length)
            ca = coords[:, :, 1]
            distance = torch.cdist(ca, ca, compute_mode="donot_use_mm_for_euclid_dist")
            distance = distance.masked_fill(~node_mask[:, None, :], float("inf"))
            neighbor_distance, neighbor_index = distance.topk(k, dim=-1, largest=False)
            edge_mask = node_mask[:, :, None] & torch.isfinite(neighbor_distance)

            neighbor_atoms = gather_neighbors(atoms, neighbor_index)  # [B, L, K, A, 3]
            delta = atoms[:, :, None, :, None, :] - neighbor_atoms[:, :, :, None, :, :]
            pair_distance = (delta.square().sum(-1) + 1e-6).sqrt().flatten(-2)  # [B, L, K, A²]
            centers = torch.linspace(self.rbf_min, self.rbf_max, self.num_rbf, device=coords.device)
            width = (self.rbf_max - self.rbf_min) / self.num_rbf
            # exp(-((d - c) / w)²), in place: the largest tensor of the step ([B, L, K, 400]) and nothing here
            # needs gradients, so one buffer serves instead of five temporaries. The exponent is clamped at -87
            # (exp(-87) = 1.6e-38, just above the smallest normal float32, so such features are 0 to within
            # 1.6e-38): PyTorch's vectorised CPU exp is 5× slower for arguments that underflow, and most of
            # these do (distant atom pairs).
            rbf = pair_distance[..., None] - centers
            rbf = rbf.div_(width).square_().clamp_max_(87.0).neg_().exp_().flatten(-2)  # [B, L, K, A² × R]
            extra = self.extra_edge_features(coords, neighbor_index, attention_mask)

        offset = residue_index[:, :, None] - gather_neighbors(residue_index, neighbor_index)
        same_chain = chain_index[:, :, None] == gather_neighbors(chain_index, neighbor_index)
        m = self.max_relative_position
        relative = torch.where(same_chain, offset.clamp(-m, m) + m, torch.full_like(offset, 2 * m + 1))
        edges = self.rbf_projection(rbf.to(self.rbf_projection.weight.dtype)) + self.position_embedding(relative)
        if extra is not None:
            edges = edges + extra
        edges = self.edge_input(self.norm(edges))
        dtype = edges.dtype
        graph = edges, neighbor_index, node_mask.to(dtype), edge_mask.to(dtype)
        if return_atoms:
            return *graph, BackboneFeatures.atoms(coords), BackboneFeatures.atoms(clean)
        return graph

    @staticmethod
    def atoms(coords):
        """The atoms whose pairwise distances are featurised: N, CA, C, O and the virtual CB."""
        n, ca, c, o = coords.unbind(dim=-2)
        b, cc = ca - n, c - ca
        cb = _CB_A * torch.cross(b, cc, dim=-1) + _CB_B * b + _CB_C * cc + ca
        return torch.stack([n, ca, c, o, cb], dim=-2)

    def extra_edge_features(self, coords, neighbor_index, attention_mask):
        """Edge terms beyond distances and positions (none for full backbones)."""
        return None


class CATraceFeatures(BackboneFeatures):
    """ProteinMPNN's CA-only features (``CA_ProteinFeatures``): a residue is its CA and the CAs before and
    after it in the example (zero at the ends, as ProteinMPNN pads), and an edge carries the RBFs of the 9
    distances between those three of a residue and of its neighbour, its relative position, and 7 numbers of
    relative orientation (the neighbour's direction in the residue's local frame and the quaternion of the
    rotation between the two frames). Frames come from consecutive CA-CA steps of 3.6-4.0 Å only, so a chain
    break or a missing residue leaves a residue without a frame (zero), as in ProteinMPNN."""

    backbone = "ca"

    def __init__(self, config: ProtMaskConfig):
        super().__init__(config)
        self.orientation_projection = nn.Linear(7, config.hidden_dim, bias=False)

    @staticmethod
    def num_atom_pairs() -> int:
        return 3 * 3

    @staticmethod
    def atoms(coords):
        ca = coords[:, :, 1]
        before, after = torch.zeros_like(ca), torch.zeros_like(ca)
        before[:, 1:], after[:, :-1] = ca[:, :-1], ca[:, 1:]
        return torch.stack([before, ca, after], dim=-2)

    def extra_edge_features(self, coords, neighbor_index, attention_mask):
        ca = coords[:, :, 1]
        frames = local_frames(ca, attention_mask.sum(-1))  # [B, L, 3, 3], rows: the frame's axes
        direction = gather_neighbors(ca, neighbor_index) - ca[:, :, None]
        direction = F.normalize(torch.einsum("blij,blkj->blki", frames, direction), dim=-1)
        rotation = frames[:, :, None].transpose(-1, -2) @ gather_neighbors(frames, neighbor_index)
        features = torch.cat([direction, rotation_quaternion(rotation)], dim=-1)
        return self.orientation_projection(features.to(self.orientation_projection.weight.dtype))


def local_frames(ca: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """ProteinMPNN's coarse frame at each CA ``[B, L, 3]`` → ``[B, L, 3, 3]`` (zero where undefined): from the
    unit steps u₋ = CA_i - CA_{i-1} and u₊ = CA_{i+1} - CA_i (kept only when 3.6-4.0 Å long, a real peptide
    step), the axes normalize(u₋ - u₊), the normal of u₋ and u₊, and their cross product.

    ProteinMPNN defines frames at positions 1 … L-3 of an example of L residues only (its last two residues get
    none); ``lengths`` ``[B]`` keeps that per example, so a padded batch gives each example the frames it has
    on its own."""
    if ca.shape[1] < 4:  # no residue has a step on both sides
        return ca.new_zeros(*ca.shape, 3)
    step = ca[:, 1:] - ca[:, :-1]
    length = step.norm(dim=-1)
    unit = F.normalize(step * ((length > 3.6) & (length < 4.0))[..., None], dim=-1)
    before, after = unit[:, :-2], unit[:, 1:-1]
    normal = F.normalize(torch.cross(before, after, dim=-1), dim=-1)
    axis = F.normalize(before - after, dim=-1)
    frames = torch.stack([axis, normal, torch.cross(axis, normal, dim=-1)], dim=2)  # [B, L - 3, 3, 3]
    frames = F.pad(frames, (0, 0, 0, 0, 1, 2))
    defined = torch.arange(ca.shape[1], device=ca.device) < (lengths[:, None] - 2)
    return frames * defined[..., None, None]


def rotation_quaternion(rotation: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``[..., 3, 3]`` → unit quaternions ``[..., 4]`` (x, y, z, w), ProteinMPNN's formula
    (a zero matrix gives the identity)."""
    rxx, ryy, rzz = torch.diagonal(rotation, dim1=-2, dim2=-1).unbind(-1)
    magnitudes = 0.5 * torch.sqrt(torch.abs(1 + torch.stack([rxx - ryy - rzz, -rxx + ryy - rzz, -rxx - ryy + rzz], -1)))
    r = lambda i, j: rotation[..., i, j]  # noqa: E731
    signs = torch.sign(torch.stack([r(2, 1) - r(1, 2), r(0, 2) - r(2, 0), r(1, 0) - r(0, 1)], -1))
    w = torch.sqrt(F.relu(1 + rxx + ryy + rzz))[..., None] / 2.0
    return F.normalize(torch.cat([signs * magnitudes, w], -1), dim=-1)


class Dropout(nn.Dropout):
    """`nn.Dropout` with a cheaper mask on CPU; CUDA and inference keep PyTorch's own.

    PyTorch's CPU dropout draws a Bernoulli float per element: over an edge tensor [48 000, 256] it costs four
    times a GELU over the same tensor (measured with torch 2.13, one thread). Here one 64-bit draw gives the
    16-bit random numbers of four elements, so ``p`` is rounded to a multiple of 1/65536 and the kept values
    are scaled by the inverse of the keep probability actually used. Draws come from the default generator,
    as PyTorch's do: seeded runs and resumed runs repeat them exactly.
    """

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.training or not 0.0 < self.p < 1.0 or hidden.device.type != "cpu" or self.inplace:
            return super().forward(hidden)
        dropped = round(self.p * 65536)
        words = torch.empty((hidden.numel() + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
        keep = words.view(torch.int16)[: hidden.numel()].view(hidden.shape) >= dropped - 32768
        return torch.where(keep, hidden, 0.0).mul_(65536 / (65536 - dropped))


class FeedForward(nn.Module):
    def __init__(self, config: ProtMaskConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden_dim, config.hidden_dim * config.ff_multiplier)
        self.down = nn.Linear(config.hidden_dim * config.ff_multiplier, config.hidden_dim)

    def forward(self, hidden):
        return self.down(F.gelu(self.up(hidden)))


class NodeUpdate(nn.Module):
    """A node's residual update from its edges: message MLP over [h_i, h_ij, x_j], sum over neighbours,
    then a position-wise feed-forward block. ``x_j`` is the neighbour's state (encoder) or its state and
    residue embedding (decoder)."""

    def __init__(self, config: ProtMaskConfig, neighbor_dim: int):
        super().__init__()
        hidden = config.hidden_dim
        self.scale = config.message_scale
        self.bias_per_neighbor = config.message_bias_per_neighbor
        # Message inputs [h_i, h_ij, x_j] → hidden as three projections (see `edge_message_input`); the
        # bias sits on the per-node self projection.
        self.edge_input = nn.Linear(hidden, hidden, bias=False)
        self.self_input = nn.Linear(hidden, hidden)
        # neighbor_dim 0: messages read no neighbour state (the atom layers of the atomic context).
        self.neighbor_input = nn.Linear(neighbor_dim, hidden, bias=False) if neighbor_dim else None
        self.message = nn.Linear(hidden, hidden)
        self.output = nn.Linear(hidden, hidden)
        self.feed_forward = FeedForward(config)
        self.message_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.ff_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout)

    def forward(self, node_states, edge_states, neighbor_states, neighbor_index, node_mask, edge_mask,
                neighbor_projection=None):
        """``neighbor_projection``: per-edge ``neighbor_input`` terms ``[B, L, K, H]`` when the caller chose
        them edge by edge (causal decoding); otherwise ``neighbor_states`` are projected per node."""
        if neighbor_projection is None:
            if self.neighbor_input is not None:
                neighbor_projection = self.neighbor_input(neighbor_states)
        else:
            neighbor_index = None
        message = edge_message_input(edge_states, self.edge_input.weight, self.self_input(node_states),
                                     neighbor_projection, neighbor_index)
        message = F.gelu(self.message(F.gelu(message)))
        # The MLP's last linear layer commutes with the sum over neighbours: apply it once per node.
        summed = torch.einsum("blkh,blk->blh", message, edge_mask)
        update = self.output(summed)
        if self.bias_per_neighbor:  # ProteinMPNN applies the last layer per edge: its bias once per neighbour
            update = update + self.output.bias * (edge_mask.sum(-1, keepdim=True) - 1)
        node_states = self.message_norm(node_states + self.dropout(update / self.scale))
        node_states = self.ff_norm(node_states + self.dropout(self.feed_forward(node_states)))
        return node_states * node_mask[..., None]


class EncoderLayer(GradientCheckpointingLayer):
    """Update node states from their edges, then edge states from their two updated nodes."""

    def __init__(self, config: ProtMaskConfig):
        super().__init__()
        hidden = config.hidden_dim
        self.node_update = NodeUpdate(config, neighbor_dim=hidden)
        self.edge_edge = nn.Linear(hidden, hidden, bias=False)
        self.edge_self = nn.Linear(hidden, hidden)
        self.edge_neighbor = nn.Linear(hidden, hidden, bias=False)
        self.edge_message = nn.Linear(hidden, hidden)
        self.edge_output = nn.Linear(hidden, hidden)
        self.edge_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout)

    def forward(self, node_states, edge_states, neighbor_index, node_mask, edge_mask):
        node_states = self.node_update(node_states, edge_states, node_states, neighbor_index, node_mask, edge_mask)
        message = edge_message_input(edge_states, self.edge_edge.weight, self.edge_self(node_states),
                                     self.edge_neighbor(node_states), neighbor_index)
        message = self.edge_output(F.gelu(self.edge_message(F.gelu(message))))
        edge_states = self.edge_norm(edge_states + self.dropout(message))
        return node_states, edge_states


class DecoderLayer(GradientCheckpointingLayer):
    """Update node states from each neighbour's structure edge, decoder state and (masked) residue."""

    def __init__(self, config: ProtMaskConfig):
        super().__init__()
        self.node_update = NodeUpdate(config, neighbor_dim=2 * config.hidden_dim)

    def forward(self, node_states, edge_states, sequence_states, neighbor_index, node_mask, edge_mask,
                decoded_before=None, encoder_states=None):
        """``decoded_before`` ``[B, L, K]`` (causal decoding): the neighbour was decoded before the residue, so
        it contributes its decoder state and residue; any other neighbour its ``encoder_states`` alone."""
        neighbors = torch.cat([node_states, sequence_states], dim=-1)
        if decoded_before is None:
            return self.node_update(node_states, edge_states, neighbors, neighbor_index, node_mask, edge_mask)
        projection = self.node_update.neighbor_input
        seen = gather_neighbors(projection(neighbors), neighbor_index)
        unseen = gather_neighbors(F.linear(encoder_states, projection.weight[:, : encoder_states.shape[-1]]),
                                  neighbor_index)
        per_edge = torch.where(decoded_before[..., None], seen, unseen)
        return self.node_update(node_states, edge_states, None, neighbor_index, node_mask, edge_mask, per_edge)


class ProtMaskPreTrainedModel(PreTrainedModel):
    config_class = ProtMaskConfig
    config: ProtMaskConfig
    base_model_prefix = "protmask"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EncoderLayer", "DecoderLayer"]

    def _init_weights(self, module):
        # Glorot-uniform weights, as ProteinMPNN: message MLPs on summed projections train stably with it.
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.xavier_uniform_(module.weight)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class ProtMaskModel(ProtMaskPreTrainedModel):
    """The structure encoder and sequence decoder, without an output head."""

    def __init__(self, config: ProtMaskConfig):
        super().__init__(config)
        self.features = (CATraceFeatures if config.backbone == "ca" else BackboneFeatures)(config)
        if config.residue_label_classes:  # a label per residue sets its initial node state (membrane models)
            self.label_embedding = nn.Embedding(config.residue_label_classes, config.hidden_dim)
            self.label_norm = nn.LayerNorm(config.hidden_dim, eps=config.layer_norm_eps)
            self.label_input = nn.Linear(config.hidden_dim, config.hidden_dim)
        self.encoder_layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_encoder_layers))
        self.context_encoder = ContextEncoder(config, NodeUpdate) if config.context_atoms else None
        self.sequence_embedding = nn.Embedding(config.vocab_size, config.hidden_dim, padding_idx=config.pad_token_id)
        self.decoder_layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_decoder_layers))
        self.post_init()

    def get_input_embeddings(self):
        return self.sequence_embedding

    def set_input_embeddings(self, value):
        self.sequence_embedding = value

    @staticmethod
    def _defaults(coords, attention_mask, residue_index, chain_index):
        batch, length = coords.shape[:2]
        device = coords.device
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=device)
        if residue_index is None:
            residue_index = torch.arange(length, device=device).expand(batch, length)
        if chain_index is None:
            chain_index = torch.zeros(batch, length, dtype=torch.long, device=device)
        return attention_mask, residue_index.long(), chain_index.long()

    def encode_structure(self, coords, attention_mask=None, residue_index=None, chain_index=None,
                         context_coords=None, context_elements=None, context_mask=None,
                         residue_labels=None, side_chain_coords=None, side_chain_mask=None) -> StructureEncoding:
        """Run the structure encoder once; the result can be decoded many times with different sequences.

        ``context_*``: the example's non-protein heavy atoms (``[B, M, 3]``, atomic numbers ``[B, M]``, mask
        ``[B, M]``), read by models with ``config.context_atoms``; without them such a model sees no atoms.
        ``residue_labels`` ``[B, L]``: class per residue for models with ``config.residue_label_classes``
        (0 where unlabelled). ``side_chain_coords`` ``[B, L, 31, 3]`` and ``side_chain_mask`` ``[B, L, 31]``:
        side-chain atoms a context model may also take as context (LigandMPNN's side-chain context; the caller
        masks those of the residues being designed)."""
        attention_mask, residue_index, chain_index = self._defaults(coords, attention_mask, residue_index, chain_index)
        with_context = self.context_encoder is not None
        edge_states, neighbor_index, node_mask, edge_mask, *atoms = self.features(
            coords, attention_mask, residue_index, chain_index, return_atoms=with_context)
        node_states = self.initial_node_states(edge_states, residue_labels)
        if with_context:  # chosen before the encoder layers draw dropout, so training runs repeat exactly
            side_chains = None if side_chain_coords is None else (side_chain_coords, side_chain_mask)
            selected = self.context_encoder.select(atoms[1], *self._context_defaults(
                coords, context_coords, context_elements, context_mask), neighbor_index, side_chains)
        for layer in self.encoder_layers:
            node_states, edge_states = layer(node_states, edge_states, neighbor_index, node_mask, edge_mask)
        if with_context:
            node_states = self.context_encoder(node_states, node_mask, atoms[0], selected)
        causal_edge_mask = node_mask[..., None] * gather_neighbors(attention_mask.to(node_mask.dtype), neighbor_index)
        return StructureEncoding(node_states=node_states, edge_states=edge_states, neighbor_index=neighbor_index,
                                 node_mask=node_mask, edge_mask=edge_mask, causal_edge_mask=causal_edge_mask)

    def initial_node_states(self, edge_states, residue_labels):
        """Zero, or for a model with residue labels their embedding (label 0 where none are given)."""
        batch, length, hidden = edge_states.shape[0], edge_states.shape[1], edge_states.shape[-1]
        if not self.config.residue_label_classes:
            return edge_states.new_zeros(batch, length, hidden)
        if residue_labels is None:
            residue_labels = torch.zeros(batch, length, dtype=torch.long, device=edge_states.device)
        labels = self.label_norm(self.label_embedding(residue_labels.long()))
        return self.label_input(labels).to(edge_states.dtype)

    @staticmethod
    def _context_defaults(coords, context_coords, context_elements, context_mask):
        if context_coords is None:  # no atoms: every residue's context is padding
            batch = coords.shape[0]
            return (coords.new_zeros(batch, 0, 3), torch.zeros(batch, 0, dtype=torch.long, device=coords.device),
                    torch.zeros(batch, 0, dtype=torch.bool, device=coords.device))
        if context_mask is None:
            context_mask = torch.ones(context_coords.shape[:2], dtype=torch.bool, device=coords.device)
        return context_coords, context_elements, context_mask

    def decode(self, input_ids, structure: StructureEncoding, output_hidden_states: bool = False,
               decoding_rank: torch.Tensor | None = None):
        """Decoder states for ``input_ids``. ``decoding_rank`` ``[B, L]`` (causal decoder only): residue j is
        decoded before residue i when ``rank[j] < rank[i]``; by default visible residues before hidden ones."""
        sequence_states = self.sequence_embedding(input_ids).to(structure.node_states.dtype)
        hidden = structure.node_states
        all_states = [hidden] if output_hidden_states else None
        causal = {}
        edge_mask = structure.edge_mask
        if self.config.decoder_context == "causal":
            if decoding_rank is None:
                decoding_rank = (input_ids == self.config.mask_token_id).long()
            neighbor_rank = gather_neighbors(decoding_rank, structure.neighbor_index)
            causal = {"decoded_before": neighbor_rank < decoding_rank[..., None], "encoder_states": hidden}
            edge_mask = structure.causal_edge_mask
        for layer in self.decoder_layers:
            hidden = layer(hidden, structure.edge_states, sequence_states, structure.neighbor_index,
                           structure.node_mask, edge_mask, **causal)
            if output_hidden_states:
                all_states.append(hidden)
        return hidden, (tuple(all_states) if output_hidden_states else None)

    def forward(
        self,
        input_ids: torch.Tensor,
        coords: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        residue_index: torch.Tensor | None = None,
        chain_index: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        decoding_rank: torch.Tensor | None = None,
        context_coords: torch.Tensor | None = None,
        context_elements: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        residue_labels: torch.Tensor | None = None,
        side_chain_coords: torch.Tensor | None = None,
        side_chain_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> ProtMaskModelOutput:
        structure = self.encode_structure(coords, attention_mask, residue_index, chain_index, context_coords,
                                          context_elements, context_mask, residue_labels, side_chain_coords,
                                          side_chain_mask)
        hidden, all_states = self.decode(input_ids, structure, bool(output_hidden_states), decoding_rank)
        return ProtMaskModelOutput(last_hidden_state=hidden, structure=structure, hidden_states=all_states)


class ProtMaskForMaskedLM(ProtMaskPreTrainedModel):
    """`ProtMaskModel` with a linear head over the vocabulary. ``model(**batch)`` → `MaskedLMOutput`."""

    def __init__(self, config: ProtMaskConfig):
        super().__init__(config)
        self.protmask = ProtMaskModel(config)
        self.lm_head = nn.Linear(config.hidden_dim, config.vocab_size)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        coords: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        residue_index: torch.Tensor | None = None,
        chain_index: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        decoding_rank: torch.Tensor | None = None,
        context_coords: torch.Tensor | None = None,
        context_elements: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        residue_labels: torch.Tensor | None = None,
        side_chain_coords: torch.Tensor | None = None,
        side_chain_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> MaskedLMOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch, length)`): the sequence, with hidden residues as `<mask>`.
        coords (`torch.FloatTensor` of shape `(batch, length, 4, 3)`): N, CA, C, O in Å; NaN where missing.
        attention_mask (`(batch, length)`): 1 for residues, 0 for padding.
        residue_index (`(batch, length)`): position along the chain (gaps allowed); chain_index: chain number.
        labels (`(batch, length)`): true residue ids where scored, IGNORE_INDEX (-100) elsewhere.
        decoding_rank (`(batch, length)`, causal decoder only): the order residues are decoded in (see
        `ProtMaskConfig.decoder_context`).
        context_coords (`(batch, atoms, 3)`), context_elements (`(batch, atoms)`, atomic numbers) and
        context_mask (`(batch, atoms)`): the non-protein heavy atoms, for models with `context_atoms`.
        residue_labels (`(batch, length)`): per-residue classes, for models with `residue_label_classes`.
        side_chain_coords (`(batch, length, 31, 3)`) and side_chain_mask (`(batch, length, 31)`): side-chain
        atoms that a model with `context_atoms` adds to each residue's context (those of designed residues masked).
        """
        outputs = self.protmask(input_ids, coords, attention_mask, residue_index, chain_index,
                                output_hidden_states=output_hidden_states, decoding_rank=decoding_rank,
                                context_coords=context_coords, context_elements=context_elements,
                                context_mask=context_mask, residue_labels=residue_labels,
                                side_chain_coords=side_chain_coords, side_chain_mask=side_chain_mask)
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = masked_lm_loss(logits, labels, self.config.label_smoothing)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)

    def logits_from_structure(self, input_ids, structure: StructureEncoding,
                              decoding_rank: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for a sequence given an encoding from `self.protmask.encode_structure` (design reuses it)."""
        hidden, _ = self.protmask.decode(input_ids, structure, decoding_rank=decoding_rank)
        return self.lm_head(hidden)


class CausalDecodingCache:
    """Step-by-step decoding for ``decoder_context="causal"`` models (ProteinMPNN's sampler).

    A decoded residue sees only residues decoded before it, so its decoder states never change again: each
    step computes the residues being decoded (a few per example) against cached states and projections,
    instead of a decoder pass over the whole batch. Start with one full pass under ``decoding_rank``
    (residues given before decoding starts rank below every residue still to decode).
    """

    def __init__(self, model: "ProtMaskForMaskedLM", input_ids, structure: StructureEncoding, decoding_rank):
        bare = model.protmask
        self.model, self.structure = model, structure
        _, states = bare.decode(input_ids, structure, output_hidden_states=True, decoding_rank=decoding_rank)
        self.states = [s.clone() for s in states[:-1]]  # the input of each decoder layer, per residue
        sequence = bare.sequence_embedding(input_ids).to(structure.node_states.dtype)
        self.projections = [layer.node_update.neighbor_input for layer in bare.decoder_layers]
        self.seen = [p(torch.cat([s, sequence], -1)) for p, s in zip(self.projections, self.states)]
        hidden = structure.node_states.shape[-1]
        self.unseen = [F.linear(structure.node_states, p.weight[:, :hidden]) for p in self.projections]
        self.decoded = decoding_rank < decoding_rank.max()  # [B, L]: seen by the residues now being decoded
        self._pending = None

    def logits(self, batch_index: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, V]`` at ``(batch_index, position)``, each seeing every residue decoded so far."""
        structure = self.structure
        neighbors = structure.neighbor_index[batch_index, position]  # [N, K]
        visible = self.decoded[batch_index[:, None], neighbors]
        edges = structure.edge_states[batch_index, position][None]
        node_mask = structure.node_mask[batch_index, position][None]
        edge_mask = structure.causal_edge_mask[batch_index, position][None]
        hidden = self.states[0][batch_index, position][None]
        inputs = []
        for layer, seen, unseen in zip(self.model.protmask.decoder_layers, self.seen, self.unseen):
            inputs.append(hidden[0])
            per_edge = torch.where(visible[..., None], seen[batch_index[:, None], neighbors],
                                   unseen[batch_index[:, None], neighbors])[None]
            hidden = layer.node_update(hidden, edges, None, None, node_mask, edge_mask, per_edge)
        self._pending = (batch_index, position, inputs)
        return self.model.lm_head(hidden[0])

    def commit(self, token_ids: torch.Tensor) -> None:
        """The residues of the last `logits` call were decoded as ``token_ids``: cache their states."""
        batch_index, position, inputs = self._pending
        sequence = self.model.protmask.sequence_embedding(token_ids).to(inputs[0].dtype)
        for layer_index, state in enumerate(inputs):
            self.states[layer_index][batch_index, position] = state
            self.seen[layer_index][batch_index, position] = self.projections[layer_index](torch.cat([state, sequence], -1))
        self.decoded[batch_index, position] = True


__all__ = ["ProtMaskPreTrainedModel", "ProtMaskModel", "ProtMaskForMaskedLM", "CausalDecodingCache", "masked_lm_loss"]
