"""ProtMaskForMaskedLM on real chains: invariances, padding, masks, multi-chain features, round trips."""

import math

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

import protmask
from protmask import ProtMaskConfig, ProtMaskForMaskedLM, ProtMaskProcessor, ProtMaskTokenizer, parse_structure
from protmask.data.collator import IGNORE_INDEX, mask_chains, residue_index
from protmask.models.modeling_protmask import BackboneFeatures

TINY = dict(hidden_dim=32, num_encoder_layers=2, num_decoder_layers=2, num_neighbors=16, dropout=0.0,
            backbone_noise=0.0)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return ProtMaskForMaskedLM(ProtMaskConfig(**{**TINY, **overrides})).eval()


@pytest.fixture(scope="module")
def chains(sample_dir):
    return {
        "lysozyme": parse_structure(sample_dir / "1aki.cif.gz")[0],
        "short": parse_structure(sample_dir / "5emb.pdb.gz")[0],
        "long": parse_structure(sample_dir / "1a8q.pdb.gz")[0],
        "dimer": parse_structure(sample_dir / "1a28.pdb.gz"),
    }


def random_rotation(seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return torch.tensor(q, dtype=torch.float32)


def test_rotation_and_translation_leave_logits_unchanged(chains):
    model = tiny_model()
    batch = ProtMaskProcessor()([chains["lysozyme"]])
    with torch.no_grad():
        reference = model(**batch).logits
        for seed in range(3):
            moved = dict(batch)
            moved["coords"] = batch["coords"] @ random_rotation(seed).T + torch.tensor([31.0, -12.5, 77.0])
            logits = model(**moved).logits
            assert torch.allclose(logits, reference, atol=2e-4, rtol=1e-4), (logits - reference).abs().max()


def test_chain_alone_equals_chain_in_padded_batch(chains):
    model = tiny_model()
    processor = ProtMaskProcessor()
    with torch.no_grad():
        alone = model(**processor([chains["short"]])).logits[0, : len(chains["short"])]
        batch = processor([chains["long"], chains["short"], chains["lysozyme"]])
        together = model(**batch).logits[1, : len(chains["short"])]
    assert batch["input_ids"].shape[1] > len(chains["short"])
    assert torch.allclose(alone, together, atol=1e-4), (alone - together).abs().max()


def test_padding_and_missing_atom_residues_do_not_leak(chains):
    model = tiny_model()
    batch = ProtMaskProcessor()([chains["lysozyme"]])
    length = len(chains["lysozyme"])
    with torch.no_grad():
        reference = model(**batch).logits[0]
        # Break residue 40 (no N): it leaves the graph. Then moving its remaining atoms and changing its
        # residue type must not change any other residue's logits.
        broken = {k: v.clone() for k, v in batch.items()}
        broken["coords"][0, 40, 0] = float("nan")
        first = model(**broken).logits[0]
        broken["coords"][0, 40, 1:] += 5.0
        broken["input_ids"][0, 40] = 5
        # Padding: any coordinates and tokens there are ignored.
        broken["coords"][0, length:] = 3.0
        broken["input_ids"][0, length:] = 7
        second = model(**broken).logits[0]
    others = [i for i in range(length) if i != 40]
    assert torch.allclose(first[others], second[others], atol=1e-5)
    assert not torch.allclose(first[others], reference[others], atol=1e-5)  # the residue did matter before
    assert torch.isfinite(second).all()


def test_nan_coordinates_never_give_nan(chains):
    model = tiny_model()
    model.train()  # backbone noise and dropout paths too
    model.config.backbone_noise = 0.02
    processor = ProtMaskProcessor()
    batch = processor([chains["short"], chains["lysozyme"]], mask=True, seeds=[0, 1])
    batch["coords"][0, ::3] = float("nan")   # many residues missing atoms
    batch["coords"][1] = float("nan")          # an example with no usable residue at all
    output = model(**batch)
    assert torch.isfinite(output.logits).all() and torch.isfinite(output.loss)
    output.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_other_chain_class_and_chain_breaks(chains):
    model = tiny_model()
    processor = ProtMaskProcessor()
    batch = processor([chains["dimer"]])  # one two-chain example
    assert batch["chain_index"][0].unique().tolist()[-2:] == [0, 1]
    seen = {}
    def record(module, args, out):
        seen["relative"] = args[0]

    hook = model.protmask.features.position_embedding.register_forward_hook(record)
    with torch.no_grad():
        model(**batch)
    hook.remove()
    other = 2 * model.config.max_relative_position + 1
    # The interface of the dimer gives edges between residues of different chains: the extra class.
    assert (seen["relative"] == other).any()

    # A chain break: residue numbers jump, the index keeps the gap, insertion codes count one step.
    numbers = np.array([1, 2, 3, 10, 11, 11, 12])
    assert residue_index(numbers, [7]).tolist() == [0, 1, 2, 9, 10, 11, 12]
    chain = chains["lysozyme"]
    gapped = protmask.ProteinChain(chain.chain_id, chain.sequence[:30] + chain.sequence[60:],
                                   np.concatenate([chain.coords[:30], chain.coords[60:]]),
                                   np.concatenate([chain.residue_numbers[:30], chain.residue_numbers[60:]]),
                                   chain.insertion_codes[:30] + chain.insertion_codes[60:])
    out = model(**processor([gapped], mask=True, seeds=[0]))
    assert torch.isfinite(out.loss)


def test_save_and_load_with_auto_classes(chains, tmp_path):
    model = tiny_model()
    tokenizer = ProtMaskTokenizer()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json"} <= names
    assert not any(name.endswith(".py") for name in names)  # no remote code copied
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert type(loaded) is ProtMaskForMaskedLM and not loaded.training
    assert next(loaded.parameters()).dtype == torch.float32
    assert type(AutoModel.from_pretrained(tmp_path)).__name__ == "ProtMaskModel"
    assert AutoConfig.from_pretrained(tmp_path).num_neighbors == TINY["num_neighbors"]
    batch = ProtMaskProcessor()([chains["lysozyme"]])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)

    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded_tokenizer) is ProtMaskTokenizer
    for text in ("MKVLA<mask>WY", chains["short"].sequence):
        assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded_tokenizer.mask_token_id == tokenizer.mask_token_id == model.config.mask_token_id
    assert loaded_tokenizer.pad_token_id == tokenizer.pad_token_id == model.config.pad_token_id
    assert tokenizer.convert_tokens_to_ids(list("ACDX")) == [3, 4, 5, 23]
    assert tokenizer.decode(tokenizer("MKV<mask>L")["input_ids"]) == "MKV<mask>L"


def test_gradient_checkpointing_gives_the_same_gradients(chains):
    processor = ProtMaskProcessor()
    batch = processor([chains["short"], chains["lysozyme"]], mask=True, seeds=[3, 4])
    grads = []
    for switch in (None, "activation_checkpointing_enable", "gradient_checkpointing_enable"):
        model = tiny_model(seed=1)
        model.train()
        if switch:
            getattr(model, switch)()  # transformers 5 name, and the older one it still honours
            assert model.is_activation_checkpointing
        calls = []
        model.protmask.encoder_layers[0].node_update.message.register_forward_hook(lambda *a: calls.append(1))
        model(**batch).loss.backward()
        assert len(calls) == (2 if switch else 1)  # checkpointed layers run again in the backward pass
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and torch.allclose(grads[0], grads[2], atol=1e-6)


def test_masking_counts_and_80_10_10():
    tokenizer = ProtMaskTokenizer()
    rng = np.random.default_rng(0)
    residue_ids = tokenizer.amino_acid_ids
    lengths = [57, 130, 13]
    tokens = rng.choice(residue_ids, size=sum(lengths))
    scorable = np.ones(sum(lengths), dtype=bool)
    scorable[5:12] = False  # residues without a complete backbone are never chosen
    hidden = random = unchanged = 0
    for draw in range(400):
        input_ids, labels = mask_chains(tokens, scorable, lengths, 0.15, rng, tokenizer.mask_token_id, residue_ids)
        start = 0
        for length in lengths:
            valid = int(scorable[start:start + length].sum())
            chosen = labels[start:start + length] != IGNORE_INDEX
            assert chosen.sum() == max(1, math.floor(0.15 * valid + 0.5))
            start += length
        chosen = labels != IGNORE_INDEX
        assert not chosen[5:12].any()
        assert (labels[chosen] == tokens[chosen]).all()
        assert (input_ids[~chosen] == tokens[~chosen]).all()
        hidden += (input_ids[chosen] == tokenizer.mask_token_id).sum()
        changed = (input_ids[chosen] != tokenizer.mask_token_id) & (input_ids[chosen] != tokens[chosen])
        random += changed.sum()
        unchanged += (input_ids[chosen] == tokens[chosen]).sum()
        assert np.isin(input_ids[chosen][input_ids[chosen] != tokenizer.mask_token_id], residue_ids).all()
    total = hidden + random + unchanged
    # A random replacement equals the true residue 1 time in 20, so "unchanged" gets 10 % + 0.5 %.
    assert abs(hidden / total - 0.80) < 0.02
    assert abs(random / total - 0.10 * 19 / 20) < 0.015
    assert abs(unchanged / total - (0.10 + 0.10 / 20)) < 0.015


def test_processor_masks_are_seeded_and_ratio_range(chains):
    processor = ProtMaskProcessor(mask_ratio=0.15)
    a = processor([chains["lysozyme"], chains["short"]], mask=True, seeds=[(0, 1), (0, 2)])
    b = processor([chains["lysozyme"], chains["short"]], mask=True, seeds=[(0, 1), (0, 2)])
    c = processor([chains["lysozyme"], chains["short"]], mask=True, seeds=[(1, 1), (1, 2)])
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["labels"], c["labels"])
    assert a["input_ids"].shape[1] % 8 == 0
    wide = ProtMaskProcessor(mask_ratio=0.15, mask_ratio_max=1.0)
    fractions = []
    for seed in range(30):
        labels = wide([chains["lysozyme"]], mask=True, seeds=[seed])["labels"]
        fractions.append(float((labels != IGNORE_INDEX).sum()) / len(chains["lysozyme"]))
    assert min(fractions) < 0.4 and max(fractions) > 0.7


def test_bf16_autocast_forward(chains):
    model = tiny_model()
    batch = ProtMaskProcessor()([chains["short"]], mask=True, seeds=[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(**batch)
    assert torch.isfinite(output.loss)


def test_small_model_overfits_a_handful_of_real_chains(chains):
    torch.manual_seed(0)
    model = ProtMaskForMaskedLM(ProtMaskConfig(hidden_dim=64, num_encoder_layers=2, num_decoder_layers=2,
                                               num_neighbors=16, dropout=0.0, backbone_noise=0.0))
    examples = [chains["short"], chains["lysozyme"], chains["dimer"][0]]
    processor = ProtMaskProcessor(mask_ratio=0.3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(160):
        batch = processor(examples, mask=True, seeds=[(step, i) for i in range(3)])
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for seed in range(5):
            batch = processor(examples, mask=True, seeds=[(10_000 + seed, i) for i in range(3)])
            logits = model(**batch).logits
            scored = batch["labels"] != IGNORE_INDEX
            correct += (logits.argmax(-1)[scored] == batch["labels"][scored]).sum().item()
            total += scored.sum().item()
    assert correct / total > 0.9, correct / total


def test_config_rejects_bad_values():
    with pytest.raises(Exception, match="dropout"):
        ProtMaskConfig(dropout=1.5)
    with pytest.raises(Exception, match="mask_ratio"):
        ProtMaskConfig(mask_ratio=0.0)


def test_backbone_features_exclude_missing_residues_from_neighbours(chains):
    config = ProtMaskConfig(**TINY)
    features = BackboneFeatures(config).eval()
    batch = ProtMaskProcessor()([chains["short"]])
    batch["coords"][0, 10, 2] = float("nan")  # residue 10 loses its C
    _, neighbor_index, node_mask, edge_mask = features(
        batch["coords"], batch["attention_mask"], batch["residue_index"], batch["chain_index"])
    assert node_mask[0, 10] == 0
    assert not ((neighbor_index[0] == 10) & (edge_mask[0] > 0)).any()
    length = len(chains["short"])
    assert not ((neighbor_index[0, :length] >= length) & (edge_mask[0, :length] > 0)).any()


def test_autoregressive_objective_scores_every_residue_in_a_seeded_order(sample_dir):
    from protmask.data.collator import IGNORE_INDEX

    chains = parse_structure(sample_dir / "2bsh.pdb.gz")  # a residue with missing backbone atoms
    processor = ProtMaskProcessor(objective="autoregressive")
    batch = processor([chains], mask=True, seeds=[(0, 1)])
    length = sum(len(c) for c in chains)
    plain = processor([chains])
    assert torch.equal(batch["input_ids"], plain["input_ids"])  # nothing is hidden: the order does the work
    scorable = torch.isfinite(plain["coords"]).all(-1).all(-1) & torch.isin(
        plain["input_ids"], torch.tensor(processor.tokenizer.amino_acid_ids))
    assert torch.equal(batch["labels"] != IGNORE_INDEX, scorable) and (~scorable[0, :length]).any()
    assert sorted(batch["decoding_rank"][0, :length].tolist()) == list(range(length))
    assert torch.equal(batch["decoding_rank"], processor([chains], mask=True, seeds=[(0, 1)])["decoding_rank"])
    assert not torch.equal(batch["decoding_rank"], processor([chains], mask=True, seeds=[(0, 2)])["decoding_rank"])


def test_cpu_dropout_keeps_the_rate_scale_and_seed_of_pytorchs():
    from protmask.models.modeling_protmask import Dropout

    dropout = Dropout(0.1).train()
    edges = torch.ones(64, 256, 48, requires_grad=True)
    torch.manual_seed(5)
    out = dropout(edges)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.002  # 786 432 draws: 0.9 ± 5 standard deviations
    assert torch.allclose(out[kept], torch.tensor(65536 / (65536 - round(0.1 * 65536))))
    out.sum().backward()
    assert torch.equal(edges.grad, out.detach())  # the gradient passes exactly where the value did
    torch.manual_seed(5)
    assert torch.equal(dropout(edges), out)  # seeded: a resumed run repeats it
    assert torch.equal(dropout.eval()(edges), edges)
    # The mask is uniform over positions: no lane of the 64-bit words it is cut from is biased.
    lanes = kept.flatten()[: kept.numel() // 4 * 4].view(-1, 4).float().mean(0)
    assert (lanes - 0.9).abs().max() < 0.004
