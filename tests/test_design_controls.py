"""Design controls on real structures: ties and homo-oligomers, bias and omit, dry runs, many structures in one
run, FASTA scores, per-position distributions and mutation scans."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from protmask import ProtMaskConfig, ProtMaskForMaskedLM, ProtMaskProcessor, ProtMaskTokenizer, parse_structure
from protmask.design import (DesignError, DesignOptions, describe_plan, design_sequences, mutation_scan, plan_design,
                             ranked_log_probs)
from protmask.design.scoring import CONTEXT
from protmask.residues import AMINO_ACIDS

from conftest import read_fasta

SMALL = dict(hidden_dim=64, num_encoder_layers=2, num_decoder_layers=2, num_neighbors=16, dropout=0.0,
             backbone_noise=0.0)
DECODINGS = ("mask_predict", "autoregressive")


@pytest.fixture(scope="module")
def untrained():
    """An untrained model spreads its probability, so sampling shows every way a constraint could fail."""
    torch.manual_seed(0)
    return ProtMaskForMaskedLM(ProtMaskConfig(**SMALL)).eval(), ProtMaskProcessor(ProtMaskTokenizer())


@pytest.fixture(scope="module")
def tetramer(sample_dir):
    chains = parse_structure(sample_dir / "1olg.pdb.gz")  # p53 tetramerisation domain: four identical chains
    assert len(chains) == 4 and len({c.sequence for c in chains}) == 1
    return chains


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "protmask.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("decoding", DECODINGS)
def test_homo_oligomer_copies_always_receive_the_same_residues(untrained, tetramer, decoding):
    model, processor = untrained
    for temperature in (0.0, 1.0):
        result = design_sequences(model, processor, tetramer, homo_oligomer=True, temperature=temperature,
                                  num_samples=2, seed=3, decoding=decoding)
        for design in result.designs:
            assert len(set(design.sequence.split("/"))) == 1, (decoding, temperature)
    free = design_sequences(model, processor, tetramer, temperature=1.0, seed=3, decoding=decoding)
    assert len(set(free.designs[0].sequence.split("/"))) > 1  # without the tie, sampled copies differ


@pytest.mark.parametrize("decoding", DECODINGS)
def test_explicit_ties_and_a_fixed_member(untrained, tetramer, decoding):
    model, processor = untrained
    labels = [f"{c.chain_id}{r}" for c in tetramer for r in c.residue_ids]
    at = {label: i for i, label in enumerate(labels)}
    for seed in range(3):
        result = design_sequences(model, processor, tetramer, tie="A330,B335;A340-344,C350-354", temperature=1.0,
                                  seed=seed, decoding=decoding)
        letters = result.designs[0].sequence.replace("/", "")
        assert letters[at["A330"]] == letters[at["B335"]]
        assert [letters[at[f"A{n}"]] for n in range(340, 345)] == [letters[at[f"C{n}"]] for n in range(350, 355)]
    native = "".join(c.sequence for c in tetramer)
    fixed = design_sequences(model, processor, tetramer, tie="A330,B335", fix="A330", temperature=1.0,
                             decoding=decoding).designs[0].sequence.replace("/", "")
    assert fixed[at["B335"]] == native[at["A330"]]  # the group takes its fixed member's residue
    differing = next(n for n in range(320, 355) if native[at[f"A{n}"]] != native[at[f"B{n + 1}"]])
    with pytest.raises(DesignError, match="fixed members disagree"):
        design_sequences(model, processor, tetramer, tie=f"A{differing},B{differing + 1}",
                         fix=f"A{differing},B{differing + 1}")


@pytest.mark.parametrize("decoding", DECODINGS)
def test_omitted_letters_never_appear_and_bias_shows(untrained, sample_dir, decoding):
    model, processor = untrained
    chains = parse_structure(sample_dir / "1a8o.pdb.gz")
    omit = "ACDEFGHIKLMN"
    for seed in range(2):
        sequence = design_sequences(model, processor, chains, omit_aa=omit, temperature=1.0, seed=seed,
                                    decoding=decoding).designs[0].sequence
        assert not set(sequence) & set(omit) and "X" not in sequence
    plain = design_sequences(model, processor, chains, temperature=1.0, decoding=decoding).designs[0].sequence
    biased = design_sequences(model, processor, chains, bias_aa="K:4.0", temperature=1.0,
                              decoding=decoding).designs[0].sequence
    assert plain.count("K") / len(plain) < 0.2 and biased.count("K") / len(biased) > 0.4
    first, second = chains[0].residue_ids[5], chains[0].residue_ids[6]
    per_position = design_sequences(model, processor, chains, bias={f"A{first}": {"W": 50.0}},
                                    omit={f"A{second}": AMINO_ACIDS.replace("Y", "")}, temperature=1.0,
                                    decoding=decoding).designs[0].sequence
    assert per_position[5] == "W" and per_position[6] == "Y"


def test_dry_run_lists_exactly_the_constrained_positions(tetramer, tmp_path):
    options = DesignOptions(chains=["A", "B"], fix="A320-322", tie="A330,B330", bias={"A341": {"K": 1.5}},
                            omit={"B342-343": "CW"}, bias_aa=None)
    description = describe_plan(plan_design(tetramer, options))
    chain_a, chain_b = description["chains"]["A"], description["chains"]["B"]
    all_a = [f"A{r}" for r in tetramer[0].residue_ids]
    assert chain_a["fixed"] == ["A320", "A321", "A322"]
    assert chain_a["designed"] == [r for r in all_a if r not in ("A320", "A321", "A322")]
    assert chain_a["tied"] == ["A330"] and chain_b["tied"] == ["B330"]
    assert description["tie_groups"] == [["A330", "B330"]]
    assert chain_a["biased"] == {"A341": {"K": 1.5}} and chain_b["biased"] == {}
    assert chain_b["omitted"] == {"B342": "CW", "B343": "CW"} and chain_a["omitted"] == {}
    assert not description["chains"]["C"]["designed_chain"] and description["chains"]["C"]["designed"] == []

    (tmp_path / "omit.json").write_text(json.dumps({"B342-343": "CW"}))
    done = run_cli("design", "--model", "unused-in-a-dry-run", "--pdb", tetramer[0].source, "--chains", "A,B",
                   "--fix", "A320-322", "--tie", "A330,B330", "--omit_file", tmp_path / "omit.json", "--dry_run")
    assert done.returncode == 0, done.stderr
    assert "fixed        3  A320-322" in done.stdout and "designed    39  A319,A323-360" in done.stdout
    assert "tie group: A330,B330" in done.stdout and "omit CW: B342-343" in done.stdout
    assert "chain C: 42 residues, context (not designed)" in done.stdout

    contradictions = [
        (dict(fix="A320", omit={"A320": tetramer[0].sequence[1]}), "fixed by --fix"),
        (dict(tie="A330,B999"), "no such residue"),
        (dict(omit={"A330": AMINO_ACIDS}), "every amino acid is omitted"),
        (dict(tie="A330,B330", omit={"A330": AMINO_ACIDS[:10], "B330": AMINO_ACIDS[10:]}), "every amino acid"),
        (dict(tie="A330-333,B330-331"), "different lengths"),
        (dict(bias_aa="Z:1"), "not one of the 20"),
    ]
    for controls, message in contradictions:
        with pytest.raises(DesignError, match=message):
            plan_design(tetramer, DesignOptions(**controls))
    bad = run_cli("design", "--model", "unused", "--pdb", tetramer[0].source, "--tie", "A330,B999", "--dry_run")
    assert bad.returncode == 2 and "--tie 'B999': no such residue in chain B" in bad.stderr


def test_many_structures_in_one_run_match_one_at_a_time(untrained, sample_dir, edge_dir, tmp_path):
    model, processor = untrained
    model.save_pretrained(tmp_path / "model")
    processor.tokenizer.save_pretrained(tmp_path / "model")
    folder = tmp_path / "structures"
    folder.mkdir()
    names = ["1olg.pdb.gz", "1a8o.pdb.gz", "5emb.pdb.gz"]
    for name in names:
        shutil.copy(sample_dir / name, folder / name)
    shutil.copy(edge_dir / "empty.pdb", folder / "empty.pdb")
    common = ["--model", tmp_path / "model", "--num_samples", "2", "--temperature", "0.5", "--seed", "7"]
    together = run_cli("design", *common, "--pdb", folder, "--output_dir", tmp_path / "out")
    assert together.returncode == 1, together.stderr  # one structure failed, the others were designed
    assert "skipped" in together.stderr and "empty.pdb" in together.stderr
    for name in names:
        alone = run_cli("design", *common, "--pdb", sample_dir / name, "--output", tmp_path / f"{name}.fasta")
        assert alone.returncode == 0, alone.stderr
        stem = name.split(".")[0]
        assert read_fasta(tmp_path / "out" / f"{stem}.fasta") == read_fasta(tmp_path / f"{name}.fasta")
    headers = [line for line in (tmp_path / "out" / "1olg.fasta").read_text().splitlines() if "_design_" in line]
    for field in ("score=", "global_score=", "recovery=", "temperature=0.5", "decoding=mask_predict",
                  f"model={tmp_path / 'model'}"):
        assert all(field in header for header in headers), field
    assert [" seed=7 " in headers[0], " seed=8 " in headers[1]] == [True, True]  # design i uses seed + i


@pytest.mark.parametrize("decoding", DECODINGS)
def test_scores_and_sampled_distributions_are_the_ones_used(untrained, tetramer, decoding):
    model, processor = untrained
    temperature = 0.7
    bias = {"A331": {"K": 2.0}}
    result = design_sequences(model, processor, tetramer, homo_oligomer=True, omit_aa="CW", bias=bias,
                              temperature=temperature, seed=1, decoding=decoding)
    design = result.designs[0]
    probabilities = np.array([p[4] for p in design.positions])
    assert design.score == pytest.approx(float(-np.log(probabilities).mean()), abs=1e-4)
    assert np.allclose(design.sampled.sum(1), 1.0, atol=1e-5)
    assert (design.sampled[:, [AMINO_ACIDS.index("C"), AMINO_ACIDS.index("W")]] == 0).all()
    by_residue = {}
    for (chain, residue, *_), distribution in zip(design.positions, design.sampled):
        by_residue.setdefault(residue, []).append(distribution)
    for residue, copies in by_residue.items():  # one distribution per tie group, written to every copy
        assert len(copies) == 4 and all(np.array_equal(copies[0], c) for c in copies)

    # Recompute one group's distribution from the model: the copies' mean log-probability plus the bias,
    # at the temperature, with exactly what was visible when the group was drawn.
    plan = plan_design(tetramer, DesignOptions(homo_oligomer=True, omit_aa="CW", bias=bias))
    batch = processor([plan.example])
    labels = plan.index.labels
    members = [labels.index(f"{c}331") for c in "ABCD"]
    letters = design.sequence.replace("/", "")
    step = decode_steps(model, processor, plan, design, decoding)
    tokens = batch["input_ids"].clone()
    designed = torch.from_numpy(plan.designed)
    hidden = designed & (torch.from_numpy(step) >= step[members[0]])
    tokens[0, : len(labels)][designed & ~hidden] = torch.tensor(
        processor.encode_sequence("".join(np.array(list(letters))[plan.designed & ~hidden.numpy()])))
    tokens[0, : len(labels)][hidden] = processor.tokenizer.mask_token_id
    with torch.no_grad():
        logits = model(**{**batch, "input_ids": tokens}).logits[0, :, processor.tokenizer.amino_acid_ids]
    log_probs = logits.log_softmax(-1)[members].mean(0) + torch.from_numpy(plan.bias[members[0]])
    expected = (log_probs / temperature).softmax(-1).numpy()
    row = next(i for i, p in enumerate(design.positions) if p[0] == "A" and p[1] == "331")
    assert np.allclose(design.sampled[row], expected, atol=1e-5)
    assert design.sampled[row][AMINO_ACIDS.index("K")] > 0


def decode_steps(model, processor, plan, design, decoding):
    """The step at which each position was drawn, recovered by decoding again with the same seed."""
    from protmask.design.decoding import decode

    width = processor([plan.example])["input_ids"].shape[1]
    pad = lambda a, v: torch.nn.functional.pad(torch.as_tensor(a), (0, width - len(a)), value=v)  # noqa: E731
    batch = processor([plan.example])
    result = decode(model, batch, pad(plan.unit_of, -1)[None], pad(plan.scoring, False)[None],
                    torch.tensor(processor.tokenizer.amino_acid_ids), processor.tokenizer.mask_token_id,
                    torch.nn.functional.pad(torch.from_numpy(plan.bias), (0, 0, 0, width - len(plan.unit_of)))[None],
                    decoding, design.temperature, 10, torch.Generator().manual_seed(design.seed))
    tokens = processor.tokenizer.convert_ids_to_tokens(result.tokens[0, : len(plan.unit_of)].tolist())
    assert plan.sequence_of(tokens) == design.sequence
    return result.step[0, : len(plan.unit_of)].numpy()


def test_autoregressive_log_probs_agree_with_scoring_in_the_same_order(untrained, sample_dir):
    model, processor = untrained
    chains = parse_structure(sample_dir / "1a8o.pdb.gz")
    design = design_sequences(model, processor, chains, temperature=1.0, decoding="autoregressive", seed=2)
    plan = plan_design(chains, DesignOptions())
    step = decode_steps(model, processor, plan, design.designs[0], "autoregressive")
    assert sorted(step[plan.designed].tolist()) == list(range(int(plan.designed.sum())))  # one residue a step
    batch = processor([chains])
    letters = design.designs[0].sequence
    batch["input_ids"][0, : len(letters)] = torch.from_numpy(processor.encode_sequence(letters))
    rank = torch.from_numpy(np.where(plan.designed, step, CONTEXT))
    log_probs = ranked_log_probs(model, batch, rank, processor.tokenizer.mask_token_id,
                                 torch.tensor(processor.tokenizer.amino_acid_ids))
    chosen = np.array([log_probs[i, AMINO_ACIDS.index(c)].item() for i, c in enumerate(letters) if plan.designed[i]])
    recorded = np.log([p[4] for p in design.designs[0].positions])
    assert np.allclose(chosen, recorded, atol=1e-4)


def test_mutation_scan_rows_are_masked_marginal_differences(untrained, tetramer, sample_dir, tmp_path):
    model, processor = untrained
    allowed = processor.tokenizer.amino_acid_ids
    chains = parse_structure(sample_dir / "1a8o.pdb.gz")
    scan = mutation_scan(model, processor, chains)
    native = chains[0].sequence
    scanned = [i for i, ok in enumerate(chains[0].backbone_complete) if ok and native[i] in AMINO_ACIDS]
    assert scan.labels == [f"A{chains[0].residue_ids[i]}" for i in scanned]
    natives = [AMINO_ACIDS.index(native[i]) for i in scanned]
    assert np.all(scan.values[np.arange(len(scanned)), natives] == 0.0)
    batch = processor([chains])
    for row in (0, 17, len(scanned) - 1):
        position = scanned[row]
        tokens = batch["input_ids"].clone()
        tokens[0, position] = processor.tokenizer.mask_token_id
        with torch.no_grad():
            log_probs = model(**{**batch, "input_ids": tokens}).logits[0, position, allowed].log_softmax(-1)
        assert np.allclose(scan.values[row], (log_probs - log_probs[natives[row]]).numpy(), atol=1e-4)

    tied = mutation_scan(model, processor, tetramer, DesignOptions(homo_oligomer=True, chains=["A", "B", "C", "D"]))
    assert len(tied.labels) == len(tetramer[0]) and tied.tied[0] == [f"{c}{tetramer[0].residue_ids[0]}" for c in "ABCD"]
    batch = processor([tetramer])
    copies = [i * len(tetramer[0]) + 5 for i in range(4)]
    tokens = batch["input_ids"].clone()
    tokens[0, copies] = processor.tokenizer.mask_token_id
    with torch.no_grad():
        log_probs = model(**{**batch, "input_ids": tokens}).logits[0, copies][:, allowed].log_softmax(-1)
    native_index = AMINO_ACIDS.index(tetramer[0].sequence[5])
    assert np.allclose(tied.values[5], (log_probs - log_probs[:, native_index:native_index + 1]).sum(0).numpy(),
                       atol=1e-4)

    model.save_pretrained(tmp_path / "model")
    processor.tokenizer.save_pretrained(tmp_path / "model")
    done = run_cli("score", "--model", tmp_path / "model", "--pdb", sample_dir / "1olg.pdb.gz", "--mutation_scan",
                   "--chains", "A", "--output", tmp_path / "scan" / "scan.csv")
    assert done.returncode == 0, done.stderr
    rows = (tmp_path / "scan" / "scan.csv").read_text().splitlines()
    assert rows[0].split(",")[3:] == list(AMINO_ACIDS) and len(rows) == 1 + len(tetramer[0])
    assert (tmp_path / "scan" / "scan.png").stat().st_size > 10_000


def test_score_command_is_deterministic_and_averages_orders(untrained, sample_dir, tmp_path):
    model, processor = untrained
    model.save_pretrained(tmp_path / "model")
    processor.tokenizer.save_pretrained(tmp_path / "model")
    structure = sample_dir / "5emb.pdb.gz"
    chains = parse_structure(structure)
    (tmp_path / "seqs.fasta").write_text(">native\n" + "/".join(c.sequence for c in chains) + "\n>poly_ala\n" +
                                         "/".join("A" * len(c) for c in chains) + "\n")
    outputs = []
    for seed, name in ((0, "a.tsv"), (0, "b.tsv"), (1, "c.tsv")):
        done = run_cli("score", "--model", tmp_path / "model", "--pdb", structure, "--sequences", tmp_path / "seqs.fasta",
                       "--num_orders", "2", "--seed", seed, "--output", tmp_path / name)
        assert done.returncode == 0, done.stderr
        outputs.append((tmp_path / name).read_text())
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]
    rows = [line.split("\t") for line in outputs[0].splitlines()[1:] if not line.startswith("#")]
    summaries = [line for line in outputs[0].splitlines() if line.startswith("# ")]
    assert [s.split(":")[0] for s in summaries] == ["# native", "# poly_ala"]
    native = [float(r[3]) for r in rows if r[0] == "native"]
    scored = sum(int(c.backbone_complete.sum()) for c in chains)
    assert len(native) == scored and all(v < 0 for v in native)
    assert abs(float(summaries[0].split("mean_log_likelihood=")[1].split()[0]) - np.mean(native)) < 1e-4

    # Each order predicts every residue from those before it; two orders are averaged.
    from protmask.design.scoring import score_sequences

    two = score_sequences(model, processor, chains, num_orders=2, seed=3)[0]
    batch = processor([chains])
    scored = np.concatenate([c.backbone_complete for c in chains])
    by_order = []
    for order in range(2):
        rank = np.full(len(scored), CONTEXT)
        rank[scored] = np.random.default_rng((3, 0, order)).permutation(int(scored.sum()))
        log_probs = ranked_log_probs(model, batch, torch.from_numpy(rank), processor.tokenizer.mask_token_id,
                                     torch.tensor(processor.tokenizer.amino_acid_ids))
        letters = "".join(c.sequence for c in chains)
        by_order.append([log_probs[i, AMINO_ACIDS.index(letters[i])].item() for i in np.flatnonzero(scored)])
    assert np.allclose(two.log_likelihood, np.mean(by_order, axis=0), atol=1e-5)
    assert not np.allclose(by_order[0], by_order[1], atol=1e-3)


def test_design_and_evaluate_refuse_bad_requests_before_work(untrained, sample_dir, edge_dir, sample_build, tmp_path):
    from safetensors.torch import save_file

    from protmask.design import load_model

    model, processor = untrained
    run = tmp_path / "run"
    model.save_pretrained(run / "final")
    processor.tokenizer.save_pretrained(run / "final")
    checkpoint = run / "checkpoint-00000002"
    checkpoint.mkdir()
    shifted = {k: v + 0.01 for k, v in model.state_dict().items()}
    save_file(shifted, str(checkpoint / "model.safetensors"))
    (checkpoint / "trainer_state.json").write_text('{"global_step": 2}')
    loaded, _ = load_model(checkpoint)  # a resumable checkpoint: its weights, the run's configuration
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in shifted.items())

    structure = sample_dir / "1a8o.pdb.gz"
    design = lambda *a: run_cli("design", "--pdb", structure, *a)  # noqa: E731
    done = design("--model", checkpoint, "--output", tmp_path / "new" / "folder" / "out.fasta")
    assert done.returncode == 0 and "is a resumable checkpoint" in done.stderr, done.stderr
    assert (tmp_path / "new" / "folder" / "out.fasta").is_file()  # a missing output folder is made
    cases = [
        (["--model", run / "fnal", "--output", tmp_path / "x.fasta"], "no such folder"),
        (["--model", run / "final", "--device", "cuda", "--output", tmp_path / "x.fasta"], "no CUDA GPU"),
        (["--model", run / "final", "--temperature", "nan", "--output", tmp_path / "x.fasta"], "--temperature"),
        (["--model", run / "final", "--fill", "AB" + "_" * 68, "--output", tmp_path / "x.fasta"], "'B'"),
    ]
    if torch.cuda.is_available():
        cases.pop(1)
    for flags, message in cases:
        done = design(*flags)
        assert done.returncode == 2 and message in done.stderr, (flags, done.stderr)
    ca_only = run_cli("design", "--model", run / "final", "--pdb", edge_dir / "ca_only_1crn.pdb",
                      "--output", tmp_path / "x.fasta")
    assert ca_only.returncode == 2 and "nothing to design" in ca_only.stderr
    assert not (tmp_path / "x.fasta").exists()

    evaluate = lambda *a: run_cli("evaluate", "--model", run / "final", *a)  # noqa: E731
    bogus = evaluate("--pdb_path", sample_build.path, "--split", "bogus")
    assert bogus.returncode == 2 and "--split bogus" in bogus.stderr and "test" in bogus.stderr
    negative = evaluate("--pdb_path", sample_dir, "--max_length", "-1")  # 0 is allowed: no crop, as in training
    assert negative.returncode == 2 and "--max_length" in negative.stderr
