"""Design, fill-in and evaluation with real structures and real (small, quickly trained) models."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from protmask import ProtMaskConfig, ProtMaskForMaskedLM, ProtMaskProcessor, ProtMaskTokenizer, parse_structure
from protmask.data.collator import StructureDataset
from protmask.design import DesignError, design_sequences, parse_fix
from protmask.evaluation import evaluate, examples_from

SMALL = dict(hidden_dim=64, num_encoder_layers=2, num_decoder_layers=2, num_neighbors=16, dropout=0.0,
             backbone_noise=0.0)


def train_quickly(examples, steps, seed=0, lr=2e-3, max_length=None, **config):
    """Plain PyTorch training with the package's processor; masks drawn over 15 %-100 % so design works."""
    torch.manual_seed(seed)
    model = ProtMaskForMaskedLM(ProtMaskConfig(**{**SMALL, **config}))
    processor = ProtMaskProcessor(mask_ratio=0.15, mask_ratio_max=1.0, max_length=max_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        batch = processor(examples, mask=True, seeds=[(seed, step, i) for i in range(len(examples))])
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), ProtMaskProcessor(ProtMaskTokenizer(), mask_ratio=0.15)


@pytest.fixture(scope="module")
def memorised(sample_dir):
    chain = parse_structure(sample_dir / "5emb.pdb.gz")[0]
    model, processor = train_quickly([chain], steps=150, lr=1e-3)
    return model, processor, chain


def test_design_recovers_a_memorised_chain_and_is_seeded(memorised, sample_dir):
    model, processor, chain = memorised
    greedy = design_sequences(model, processor, [chain], temperature=0.0)
    assert greedy.designs[0].recovery > 0.8
    autoregressive = design_sequences(model, processor, [chain], temperature=0.0, decoding="autoregressive")
    assert autoregressive.designs[0].recovery > 0.8
    # Sampling: an untrained model spreads its probability, so seeds show.
    torch.manual_seed(0)
    fresh = ProtMaskForMaskedLM(ProtMaskConfig(**SMALL)).eval()
    a = design_sequences(fresh, processor, [chain], temperature=1.0, seed=5, num_samples=2)
    b = design_sequences(fresh, processor, [chain], temperature=1.0, seed=5, num_samples=2)
    c = design_sequences(fresh, processor, [chain], temperature=1.0, seed=6, num_samples=2)
    assert [d.sequence for d in a.designs] == [d.sequence for d in b.designs]
    assert [d.sequence for d in a.designs] != [d.sequence for d in c.designs]
    assert a.designs[1].sequence == c.designs[0].sequence  # sample i uses seed + i, whatever num_samples
    assert all(0.0 <= d.mean_probability <= 1.0 for d in a.designs)
    assert set(a.designs[0].sequence) <= set("ACDEFGHIKLMNPQRSTVWY")


def test_untrained_model_sits_near_chance(sample_dir):
    torch.manual_seed(0)
    model = ProtMaskForMaskedLM(ProtMaskConfig(**SMALL)).eval()
    processor = ProtMaskProcessor()
    recoveries = [design_sequences(model, processor, sample_dir / name, temperature=0.0).designs[0].recovery
                  for name in ("1aki.cif.gz", "5emb.pdb.gz", "1a8q.pdb.gz")]
    assert np.mean(recoveries) < 0.2


def test_fixed_positions_keep_native_residues(memorised, sample_dir):
    model, processor, _ = memorised
    chains = parse_structure(sample_dir / "1a28.pdb.gz")
    result = design_sequences(model, processor, chains, chains=["A"], fix="A700-720,A730", temperature=1.0,
                              seed=1)
    native, designed = result.native, result.designs[0].sequence
    chain = chains[0]
    kept = [i for i, n in enumerate(chain.residue_numbers.tolist()) if 700 <= n <= 720 or n == 730]
    assert kept and all(designed[i] == native[i] for i in kept)
    assert result.designed_positions == int(chain.backbone_complete.sum()) - len(kept)
    assert "/" not in designed and len(designed) == len(chain)
    with pytest.raises(DesignError, match="chains in this file"):
        parse_fix("Z5", chains)
    with pytest.raises(DesignError, match="no such residue"):
        parse_fix("A5000", chains)


def test_fill_designs_only_masked_positions(memorised):
    model, processor, chain = memorised
    text = list(chain.sequence)
    holes = [3, 10, 11, 12, 40]
    for i in holes:
        text[i] = "_"
    text[20] = "W" if chain.sequence[20] != "W" else "A"  # a residue the user changed is used as written
    result = design_sequences(model, processor, [chain], fill="".join(text), temperature=0.0)
    designed = result.designs[0].sequence
    assert result.designed_positions == len(holes)
    assert [designed[i] for i in range(len(chain)) if i not in holes] == [text[i] for i in range(len(chain)) if i not in holes]
    assert sum(designed[i] == chain.sequence[i] for i in holes) >= 3  # memorised: the holes are filled back
    with pytest.raises(DesignError, match="residues; the designed chains"):
        design_sequences(model, processor, [chain], fill="AC_")


def test_evaluate_trained_checkpoint_on_the_sample_beats_baselines(sample_build, sample_dir):
    train = StructureDataset(sample_build.dataset["train"])
    rows = train.__getitems__(list(range(len(train))))
    model, processor = train_quickly(rows, steps=60, lr=2e-3, max_length=128)
    examples, failed = examples_from(sample_dir)
    assert not failed and len(examples) == 45
    metrics = evaluate(model, processor, examples, max_length=128, rounds=4)
    for key in ("masked_accuracy", "design_recovery_mean", "design_recovery_median"):
        assert 0.0 <= metrics[key] <= 1.0
        assert metrics[key] > metrics["baselines"]["uniform_random"][key]
        assert metrics[key] > metrics["baselines"]["most_frequent_residue"][key], key
    assert metrics["perplexity"] < 20.0
    assert metrics["num_chains"] == sum(b["num_chains"] for b in metrics["design_recovery_by_length"].values())


def test_command_line_design_evaluate_plot(memorised, sample_dir, edge_dir, tmp_path):
    model, processor, chain = memorised
    model.save_pretrained(tmp_path / "model")
    processor.tokenizer.save_pretrained(tmp_path / "model")
    run = lambda *args: subprocess.run([sys.executable, "-m", "protmask.cli", *map(str, args)], capture_output=True,
                                       text=True, timeout=300)
    done = run("design", "--model", tmp_path / "model", "--pdb", sample_dir / "5emb.pdb.gz", "--num_samples", "3",
               "--temperature", "0.2", "--output", tmp_path / "out.fasta", "--probabilities", tmp_path / "p.tsv")
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "out.fasta").read_text().splitlines()
    chains = parse_structure(sample_dir / "5emb.pdb.gz")
    assert lines[0].startswith(">5emb_native chains=A,B") and lines[1] == "/".join(c.sequence for c in chains)
    assert len(lines) == 8 and "recovery=" in lines[2] and "mean_probability=" in lines[2]
    designed = sum(int(c.backbone_complete.sum()) for c in chains)
    assert f"designed_positions={designed}" in lines[0]
    assert len((tmp_path / "p.tsv").read_text().splitlines()) == 1 + 3 * designed
    bad = run("design", "--model", tmp_path / "model", "--pdb", sample_dir / "5emb.pdb.gz", "--chains", "Q",
              "--output", tmp_path / "x.fasta")
    assert bad.returncode == 2 and "--chains Q" in bad.stderr

    done = run("evaluate", "--model", tmp_path / "model", "--pdb_path", edge_dir, "--output", tmp_path / "m.json",
               "--rounds", "2")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    failed = {item["file"].split("/")[-1] for item in metrics["files_failed"]}
    assert {"empty.pdb", "truncated_1crn.pdb", "ca_only_1crn.pdb"} <= failed  # listed, not fatal
    assert metrics["num_chains"] >= 2 and "design recovery" in done.stdout

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "split": "train", "loss": 3.0, "perplexity": 20.1, "accuracy": 0.05, "learning_rate": 1e-4},
        {"step": 2, "split": "train", "loss": 2.8, "perplexity": 16.4, "accuracy": 0.08, "learning_rate": 1e-4},
        {"step": 2, "split": "validation", "loss": 2.9, "perplexity": 18.2, "accuracy": 0.07, "recovery": 0.07},
    ]))
    done = run("plot", "--run", tmp_path / "run")
    assert done.returncode == 0 and (tmp_path / "run" / "training_curves.png").stat().st_size > 10_000
    assert run("plot", "--run", tmp_path / "nowhere").returncode == 2


def test_evaluate_reads_a_built_split_lazily_and_crops_by_default(memorised, sample_build):
    from protmask.evaluation import EVALUATE_MAX_LENGTH, SplitExamples

    model, processor, _ = memorised
    examples, failed = examples_from(sample_build.path, "test")
    assert isinstance(examples, SplitExamples) and not failed  # rows are read a batch at a time
    assert len(examples) == len(sample_build.dataset["test"]) and examples[0].name == sample_build.dataset["test"][0]["name"]
    assert EVALUATE_MAX_LENGTH == 1024  # the default of `protmask evaluate --max_length`, in its --help
    metrics = evaluate(model, processor, examples, rounds=1, max_length=40)
    longest = max(len(examples[i]) for i in range(len(examples)))
    assert longest > 40 and metrics["num_structures"] == len(examples)
    assert sum(b["num_chains"] for b in metrics["design_recovery_by_length"].values()) == metrics["num_chains"]
    assert metrics["design_recovery_by_length"][">300"]["num_chains"] == 0  # every example cropped to 40
