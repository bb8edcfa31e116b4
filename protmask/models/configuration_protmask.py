"""`ProtMaskConfig`: every hyper-parameter of the structure-conditioned masked protein language model."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


@strict
class ProtMaskConfig(PreTrainedConfig):
    r"""Configuration of a [`ProtMaskForMaskedLM`].

    The model reads a protein backbone (N, CA, C, O per residue) and a sequence with some residues hidden,
    and predicts every residue. Structure features follow ProteinMPNN: a k-nearest-neighbour graph on CA
    atoms, radial basis functions of the 25 distances between the backbone atoms (and a virtual CB) of two
    neighbours, and their relative position in sequence.

    Args:
        vocab_size (`int`, defaults to 24):
            Number of tokens: the specials `<pad>`, `<mask>`, `<unk>`, the 20 amino acids and `X`.
        hidden_dim (`int`, defaults to 256):
            Width of node (residue) and edge (neighbour pair) states.
        num_encoder_layers (`int`, defaults to 3):
            Structure encoder layers; each updates node states from their edges, then edge states.
        num_decoder_layers (`int`, defaults to 3):
            Sequence decoder layers; each updates node states from neighbours' structure and masked sequence.
        num_neighbors (`int`, defaults to 48):
            Neighbours per residue in the graph, nearest by CA distance (the residue itself included).
        num_rbf (`int`, defaults to 16):
            Radial basis functions per atom-pair distance, centred evenly between `rbf_min` and `rbf_max`.
        rbf_min (`float`, defaults to 2.0) and rbf_max (`float`, defaults to 22.0):
            Range of the radial basis centres, in Å.
        max_relative_position (`int`, defaults to 32):
            Sequence offsets between two residues of one chain are clipped to ±this; residues of different
            chains share one extra "other chain" class.
        ff_multiplier (`int`, defaults to 4):
            Width of the position-wise feed-forward block, as a multiple of `hidden_dim`.
        message_scale (`float`, defaults to 30.0):
            Summed neighbour messages are divided by this (ProteinMPNN's constant), keeping updates O(1).
        dropout (`float`, defaults to 0.1):
            Dropout on every residual update.
        backbone_noise (`float`, defaults to 0.02):
            Standard deviation in Å of Gaussian noise added to the coordinates in training mode only, so
            the model does not learn crystallographic detail; zero in evaluation.
        label_smoothing (`float`, defaults to 0.0):
            Label smoothing of the cross-entropy loss.
        mask_ratio (`float`, defaults to 0.15):
            Fraction of each chain's residues hidden in training. Recorded so evaluation masks at the ratio
            the model was trained at.
        mask_ratio_max (`float`, *optional*):
            When set, each chain's mask ratio is drawn uniformly from [`mask_ratio`, `mask_ratio_max`]: a
            model trained up to 1.0 also designs whole sequences well.
        layer_norm_eps (`float`, defaults to 1e-5):
            Epsilon of the layer norms.
        pad_token_id (`int`, defaults to 0) and mask_token_id (`int`, defaults to 1):
            Token ids the model treats specially (padding never enters the graph).
        tie_word_embeddings (`bool`, defaults to `False`):
            The output head is not tied to the input embedding.
        decoder_context (`str`, defaults to `"masked"`):
            What a decoder layer reads from a neighbour. `"masked"`: its decoder state and its residue
            embedding, `<mask>` where hidden (a masked language model: every visible residue is seen by all).
            `"causal"`: ProteinMPNN's decoder: residues are decoded in an order (``decoding_rank``); a
            neighbour decoded earlier contributes its decoder state and residue, any other its encoder state
            and no residue, and decoder messages count every neighbour (ProteinMPNN masks edges in the
            encoder only). Without a rank, visible residues count as decoded first and hidden ones after.
        backbone (`str`, defaults to `"full"`):
            What the model reads of a residue. `"full"`: N, CA, C and O; residues missing any are left out.
            `"ca"`: the CA alone, with ProteinMPNN's CA-only features (distances between the CAs before, at and
            after two neighbours, and their relative orientation): for CA traces and coarse models.
        context_atoms (`int`, defaults to 0):
            Atomic context (LigandMPNN): each residue reads this many non-protein heavy atoms (small molecules,
            metals, nucleic acids) nearest its virtual CB, through the context encoder (`models/context.py`);
            25 for the published LigandMPNN models. 0: a residue-only model.
        residue_label_classes (`int`, defaults to 0):
            When set, a class per residue (``residue_labels``, 0 = unlabelled) sets its initial node state:
            3 for the membrane ProteinMPNN models (0 none, 1 interface, 2 buried; or one global
            transmembrane label for every residue).
        message_bias_per_neighbor (`bool`, defaults to `False`):
            Add the bias of each message MLP's last layer once per neighbour (ProteinMPNN) instead of once
            per residue; converted ProteinMPNN weights set it.

    Example:

    ```python
    >>> from protmask import ProtMaskConfig, ProtMaskForMaskedLM
    >>> model = ProtMaskForMaskedLM(ProtMaskConfig(hidden_dim=128, num_neighbors=32))
    ```
    """

    model_type = "protmask"
    attribute_map = {"hidden_size": "hidden_dim", "num_hidden_layers": "num_encoder_layers"}

    vocab_size: int = 24
    hidden_dim: int = 256
    num_encoder_layers: int = 3
    num_decoder_layers: int = 3
    num_neighbors: int = 48
    num_rbf: int = 16
    rbf_min: float = 2.0
    rbf_max: float = 22.0
    max_relative_position: int = 32
    ff_multiplier: int = 4
    message_scale: float = 30.0
    dropout: float = 0.1
    backbone_noise: float = 0.02
    label_smoothing: float = 0.0
    mask_ratio: float = 0.15
    mask_ratio_max: float | None = None
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 0
    mask_token_id: int | None = 1
    tie_word_embeddings: bool = False
    decoder_context: str = "masked"
    message_bias_per_neighbor: bool = False
    backbone: str = "full"
    context_atoms: int = 0
    residue_label_classes: int = 0

    def validate_architecture(self):
        problems = []
        for name in ("vocab_size", "hidden_dim", "num_neighbors", "num_rbf", "max_relative_position", "ff_multiplier"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("num_encoder_layers", "num_decoder_layers"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be zero or more, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.backbone_noise < 0:
            problems.append(f"backbone_noise must be zero or more (Å), got {self.backbone_noise}")
        if not 0.0 < self.mask_ratio <= 1.0:
            problems.append(f"mask_ratio must be in (0, 1], got {self.mask_ratio}")
        if self.mask_ratio_max is not None and not self.mask_ratio <= self.mask_ratio_max <= 1.0:
            problems.append(f"mask_ratio_max must be in [mask_ratio, 1], got {self.mask_ratio_max}")
        if not 0.0 <= self.label_smoothing < 1.0:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.decoder_context not in ("masked", "causal"):
            problems.append(f"decoder_context must be 'masked' or 'causal', got {self.decoder_context!r}")
        if self.backbone not in ("full", "ca"):
            problems.append(f"backbone must be 'full' or 'ca', got {self.backbone!r}")
        if self.context_atoms < 0 or self.residue_label_classes < 0:
            problems.append("context_atoms and residue_label_classes must be zero or more")
        if self.context_atoms and self.backbone != "full":
            problems.append("atomic context (context_atoms) needs backbone='full': it is placed by the virtual CB")
        if self.rbf_max <= self.rbf_min:
            problems.append("rbf_max must be larger than rbf_min")
        if problems:
            raise ValueError("invalid ProtMaskConfig: " + "; ".join(problems))


__all__ = ["ProtMaskConfig"]
