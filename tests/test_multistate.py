"""Multi-state design: one sequence for two backbones, each tied unit drawn from the weighted sum of the
states' log-probabilities, positive and negative weights, the FASTA reporting every state."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from Bio.PDB import PDBIO, PDBParser, Select

from protmask import ProtMaskConfig, ProtMaskForMaskedLM, ProtMaskProcessor, ProtMaskTokenizer, parse_structure
from protmask.design import DesignOptions, log_probs_with_hidden, plan_design
from protmask.design.multistate import design_states, plan_states


@pytest.fixture(scope="module")
def two_states(sample_dir, tmp_path_factory):
    """1olg's chains A and B (one sequence, two slightly different backbones), each written alone as chain A."""
    import gzip

    root = tmp_path_factory.mktemp("states")
    with gzip.open(sample_dir / "1olg.pdb.gz", "rt") as handle:
        structure = PDBParser(QUIET=True).get_structure("1olg", handle)
    paths = []
    for chain_id in ("A", "B"):
        class OneChain(Select):
            def accept_model(self, model):
                return model.id == 0

            def accept_chain(self, chain):
                return chain.id == chain_id
        io = PDBIO()
        io.set_structure(structure)
        path = root / f"state_{chain_id}.pdb"
        io.save(str(path), OneChain())
        text = path.read_text().splitlines()
        path.write_text("\n".join(line[:21] + "A" + line[22:] if line.startswith(("ATOM", "HETATM", "TER")) and len(line) > 21
                                  else line for line in text) + "\n")
        paths.append(path)
    torch.manual_seed(0)
    model = ProtMaskForMaskedLM(ProtMaskConfig(hidden_dim=32, num_encoder_layers=1, num_decoder_layers=1,
                                               num_neighbors=16, dropout=0.0, backbone_noise=0.0)).eval()
    model.save_pretrained(root / "model")
    ProtMaskTokenizer().save_pretrained(root / "model")
    return paths, model, root


def test_tied_units_are_drawn_from_the_weighted_sum_of_the_states(two_states):
    paths, model, _ = two_states
    processor = ProtMaskProcessor(ProtMaskTokenizer())
    plans = [plan_design(parse_structure(p), DesignOptions()) for p in paths]
    assert plans[0].index.labels == plans[1].index.labels  # the same numbering
    assert not np.allclose(plans[0].example.coords, plans[1].example.coords, equal_nan=True)
    states = plan_states([str(p) for p in paths], plans, [1.0, -0.4], by_number=True)
    assert len(states.groups) == int(plans[0].designed.sum())
    # one mask-predict round at temperature 1: every residue drawn with all hidden, from the weighted rule
    (design,) = design_states(model, processor, states, num_samples=1, temperature=1.0, rounds=1)
    assert design[0].sequence == design[1].sequence
    log_p = []
    for plan in plans:
        batch = processor([plan.example])
        hidden = torch.zeros(1, batch["input_ids"].shape[1], dtype=torch.bool)
        hidden[0, : len(plan.index)] = torch.from_numpy(plan.designed)
        log_p.append(log_probs_with_hidden(model, batch, hidden, processor.tokenizer.mask_token_id,
                                           torch.tensor(processor.tokenizer.amino_acid_ids))[0])
    designed = np.flatnonzero(plans[0].designed)
    for row, position in enumerate(designed):
        expected = ((1.0 * log_p[0][position] - 0.4 * log_p[1][position]) / 2).softmax(-1)
        assert torch.allclose(torch.from_numpy(design[0].sampled[row]), expected, atol=1e-5)
        assert torch.allclose(torch.from_numpy(design[1].sampled[row]), expected, atol=1e-5)
    # autoregressive: still one sequence, and a different one for opposite weights
    for weights in ([1.0, 1.0], [1.0, -1.0]):
        states = plan_states([str(p) for p in paths], plans, weights, by_number=True)
        for designs in design_states(model, processor, states, num_samples=2, temperature=0.5, decoding="autoregressive"):
            assert designs[0].sequence == designs[1].sequence


def test_states_command_dry_run_tie_items_and_fasta(two_states, tmp_path):
    paths, _, root = two_states
    run = lambda *a: subprocess.run([sys.executable, "-m", "protmask.cli", "design", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    a, b = paths[0].name, paths[1].name
    dry = run("--model", root / "model", "--states", *paths, "--state_weights", "1", "-0.5", "--tie",
              f"{a}:A330-339,{b}:A330-339", "--dry_run")
    assert dry.returncode == 0, dry.stderr
    assert "10 of them across states" in dry.stdout and f"unit: {a}:A330,{b}:A330" in dry.stdout
    assert f"state {b}: weight -0.5" in dry.stdout
    done = run("--model", root / "model", "--states", *paths, "--tie_by_number", "--state_weights", "1", "0.5",
               "--num_samples", "2", "--output", tmp_path / "states.fasta", "--decoding", "autoregressive")
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "states.fasta").read_text().splitlines()
    headers = [line for line in lines if line.startswith(">")]
    assert len(headers) == 2 + 2 * 2  # each state's native, then each sample in each state
    assert headers[2].startswith(">design_1_state_A state=state_A.pdb score=") and "state_weights=" in headers[2]
    sequences = lines[1::2]
    assert sequences[2] == sequences[3] and sequences[4] == sequences[5]
    bad = run("--model", root / "model", "--states", *paths, "--tie", "nowhere.pdb:A330,x:A1", "--dry_run")
    assert bad.returncode == 2 and "STATE:RESIDUE" in bad.stderr
    untied = run("--model", root / "model", "--states", *paths, "--dry_run")
    assert untied.returncode == 2 and "--tie_by_number" in untied.stderr


def test_score_states_reports_each_state_and_the_weighted_sum(two_states, tmp_path):
    """protmask score --states: a designed sequence scored on both backbones, and the design rule's weighted sum."""
    paths, model, root = two_states
    run = lambda *a: subprocess.run([sys.executable, "-m", "protmask.cli", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    native = next(c for c in parse_structure(paths[0]) if c.chain_id == "A").sequence
    mutant = "W" * 5 + native[5:]
    (tmp_path / "seqs.fasta").write_text(f">native\n{native}\n>mutant\n{mutant}\n")
    done = run("score", "--model", root / "model", "--states", *paths, "--state_weights", "1", "-0.5",
               "--sequences", tmp_path / "seqs.fasta", "--output", tmp_path / "states.tsv")
    assert done.returncode == 0, done.stderr
    means = {}
    for path in paths:  # each state alone, as a one-structure score run
        alone = run("score", "--model", root / "model", "--pdb", path, "--sequences", tmp_path / "seqs.fasta",
                    "--output", tmp_path / f"{path.stem}.tsv")
        assert alone.returncode == 0, alone.stderr
        for line in alone.stdout.splitlines():
            if line.startswith("# "):
                means[(line[2:].split(":")[0], path.stem)] = float(line.split("mean_log_likelihood=")[1].split()[0])
    table = (tmp_path / "states.tsv").read_text()
    for label in ("native", "mutant"):
        line = next(x for x in table.splitlines() if x.startswith(f"# {label}: states "))
        a, b = means[(label, "state_A")], means[(label, "state_B")]
        assert f"state_A={a:.5f}" in line and f"state_B={b:.5f}" in line and "weights=1,-0.5" in line
        assert float(line.split("weighted_mean_log_likelihood=")[1]) == pytest.approx(a - 0.5 * b, abs=2e-5)
    assert means[("native", "state_A")] != means[("native", "state_B")]  # two backbones, two scores
    assert "mutant@state_B" in table  # rows say which state they are on
    bad = run("score", "--model", root / "model", "--states", *paths, "--state_weights", "1",
              "--output", tmp_path / "x.tsv")
    assert bad.returncode == 2 and "--state_weights: 1 weights for 2 --states files" in bad.stderr
