"""--recipe proteinmpnn: every item reaches the run (model, optimizer, schedule, loss, batches), resume is
exact across it, and two ranks follow one rank's schedule up to the stated scaling."""

import json
import math

import numpy as np
import pytest
import torch

from protmask.metrics import RESIDUE_LETTERS, masked_lm_sums
from protmask.training.arguments import parse_arguments
from runner import TINY, launch, max_difference, records, weights

#: TINY's model (hidden 32) under the recipe, with a 3-step warm-up to ProteinMPNN's peak for that width.
RECIPE = TINY + ["--recipe", "proteinmpnn", "--max_tokens_per_batch", "1024", "--warmup_steps", "3",
                 "--checkpointing_steps", "3"]


def proteinmpnn_noam_rate(step: int, hidden: int, factor: float, warmup: int) -> float:
    """ProteinMPNN's NoamOpt.rate (training/model_utils.py), its steps counted from 1."""
    return factor * (hidden ** (-0.5) * min(step ** (-0.5), step * warmup ** (-1.5)))


def test_the_recipe_sets_proteinmpnns_defaults_and_every_flag_given_wins():
    args = parse_arguments(["--recipe", "proteinmpnn"])
    assert (args.hidden_dim, args.num_neighbors, args.num_encoder_layers, args.num_decoder_layers) == (128, 48, 3, 3)
    assert (args.decoder_context, args.objective, args.message_bias_per_neighbor) == ("causal", "autoregressive", True)
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon, args.weight_decay) == (0.9, 0.98, 1e-9, 0.0)
    assert (args.lr_scheduler_type, args.warmup_steps, args.max_grad_norm, args.lr_scaling) == ("noam", 4000, 1.0, "sqrt")
    assert (args.dropout, args.backbone_noise) == (0.1, 0.2)
    assert args.label_smoothing == pytest.approx(0.1 / 1.1)
    assert (args.shuffle_chains, args.max_tokens_per_batch, args.max_length, args.sampling) == (True, 10000, 10000, "cluster")
    # get_std_opt's peak: factor 2, warm-up 4000, at hidden 128
    assert args.learning_rate == pytest.approx(proteinmpnn_noam_rate(4000, 128, 2.0, 4000))
    assert args.recipe_lines[0].startswith("recipe proteinmpnn: --hidden_dim 128 ")

    given = parse_arguments(["--recipe", "proteinmpnn", "--hidden_dim", "64", "--no-shuffle_chains",
                             "--adam_beta2", "0.999", "--warmup_steps", "30"])
    assert (given.hidden_dim, given.shuffle_chains, given.adam_beta2, given.warmup_steps) == (64, False, 0.999, 30)
    assert given.learning_rate == pytest.approx(2 / math.sqrt(64 * 4000))  # the peak follows the width
    assert "given on the command line instead: --hidden_dim 64 --adam_beta2 0.999 --warmup_steps 30 --no-shuffle_chains" \
        in given.recipe_lines[-1]
    assert parse_arguments(["--recipe", "proteinmpnn", "--learning_rate", "1e-3"]).learning_rate == 1e-3
    # Without a recipe nothing moves: the guide's defaults.
    plain = parse_arguments([])
    assert (plain.learning_rate, plain.adam_beta2, plain.lr_scheduler_type, plain.shuffle_chains, plain.recipe_lines) == (
        1e-4, 0.999, "constant", False, [])


def test_label_smoothing_is_proteinmpnns_loss_smoothed():
    from protmask.models import ProtMaskTokenizer
    from protmask.models.convert_proteinmpnn import PROTEINMPNN_ALPHABET, SPECIAL_TOKEN_LOGIT

    tokenizer = ProtMaskTokenizer()
    assert "".join(tokenizer.all_tokens[-RESIDUE_LETTERS:]) == PROTEINMPNN_ALPHABET  # the letters end the vocabulary
    generator = torch.Generator().manual_seed(0)
    letters = torch.randn(2, 7, RESIDUE_LETTERS, generator=generator) * 3
    # A converted head: the special tokens at -1e4, so protmask's 24-way softmax is ProteinMPNN's 21-way one.
    logits = torch.cat([torch.full((2, 7, 3), SPECIAL_TOKEN_LOGIT), letters], dim=-1)
    S = torch.randint(0, RESIDUE_LETTERS, (2, 7), generator=generator)
    scored = torch.rand(2, 7, generator=generator) < 0.7
    labels = torch.where(scored, S + 3, torch.full_like(S, -100))

    # ProteinMPNN's loss_smoothed (weight 0.1), summed over the scored positions
    log_probs = letters.log_softmax(-1)
    target = torch.nn.functional.one_hot(S, 21).float() + 0.1 / 21
    target = target / target.sum(-1, keepdim=True)
    expected = (-(target * log_probs).sum(-1) * scored).sum()

    loss, tokens, _ = masked_lm_sums(logits, labels, label_smoothing=0.1 / 1.1)
    assert int(tokens) == int(scored.sum())
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    plain, _, _ = masked_lm_sums(logits, labels)
    assert float(plain) == pytest.approx(float((-log_probs.gather(-1, S[..., None])[..., 0] * scored).sum()), rel=1e-5)
    assert abs(float(loss) - float(plain)) > 0.1  # the smoothing term is there


def test_shuffle_chains_reorders_each_training_example_and_keeps_its_residues(sample_dir):
    from protmask.data.collator import ProtMaskProcessor
    from protmask.structure import parse_structure

    chains = parse_structure(sample_dir / "1olg.pdb.gz")  # p53 tetramerisation domain: four chains
    assert len(chains) == 4
    shuffled = ProtMaskProcessor(objective="autoregressive", shuffle_chains=True)
    plain = ProtMaskProcessor(objective="autoregressive")
    orders = set()
    for seed in range(6):
        batch = shuffled([chains], mask=True, seeds=[(seed,)])
        coords = batch["coords"][0].numpy()
        # which chain each block of the shuffled example is, by its coordinates (the four sequences are equal)
        order, position = [], 0
        while position < int(batch["attention_mask"][0].sum()):
            match = next(c for c in range(4) if c not in order and np.array_equal(
                coords[position:position + len(chains[c])], chains[c].coords, equal_nan=True))
            order.append(match)
            position += len(chains[match])
        assert sorted(order) == [0, 1, 2, 3]
        orders.add(tuple(order))
        # the labels travel with their residues; positions restart per chain; chain numbers follow the new order
        sequence = "".join(chains[c].sequence for c in order)
        assert plain.encode_sequence(sequence).tolist() == batch["labels"][0, :len(sequence)].tolist()
        assert int(batch["residue_index"][0, len(chains[order[0]])]) == 0
        assert int(batch["chain_index"][0, len(chains[order[0]])]) == 1
    assert len(orders) > 1
    # Without mask=True (validation, evaluation, design) the order is the file's.
    assert torch.equal(shuffled([chains])["input_ids"], plain([chains])["input_ids"])


@pytest.fixture(scope="module")
def recipe_run(cache, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("recipe-whole")
    done = launch(RECIPE + ["--cache_dir", cache, "--max_train_steps", "6", "--save_dir", save_dir])
    return save_dir, done.stdout


def test_every_item_of_the_recipe_reaches_the_model_optimizer_and_schedule(recipe_run):
    save_dir, stdout = recipe_run
    assert "recipe proteinmpnn: --decoder_context causal --objective autoregressive" in stdout
    assert "schedule noam, 3 warm-up steps" in stdout
    config = json.loads((save_dir / "final" / "config.json").read_text())
    assert (config["decoder_context"], config["message_bias_per_neighbor"], config["dropout"], config["backbone_noise"]) == (
        "causal", True, 0.1, 0.2)
    assert config["label_smoothing"] == pytest.approx(1 / 11)
    optimizer = torch.load(save_dir / "checkpoint-00000006" / "optimizer.bin", weights_only=True)
    for group in optimizer["param_groups"]:
        assert (tuple(group["betas"]), group["eps"], group["weight_decay"]) == ((0.9, 0.98), 1e-9, 0.0)
    # Each step's rate is ProteinMPNN's NoamOpt at that step, its factor chosen so that a 3-step warm-up reaches
    # get_std_opt's peak for hidden 32 (factor 2, warm-up 4000).
    peak = 2 / math.sqrt(32 * 4000)
    factor = peak * math.sqrt(32) * math.sqrt(3)
    rates = {r["step"]: r["learning_rate"] for r in records(save_dir, "train")}
    for step in range(1, 7):
        assert rates[step] == pytest.approx(proteinmpnn_noam_rate(step, 32, factor, 3), rel=1e-6), step
    assert max(rates.values()) == pytest.approx(peak)
    run = json.loads((save_dir / "run.json").read_text())
    assert run["definition"]["shuffle_chains"] is True and run["definition"]["objective"] == "autoregressive"


def test_a_recipe_run_resumes_exactly(cache, recipe_run, tmp_path):
    # Noise, dropout, chain shuffles and decoding orders are all random: only restored state makes this exact.
    whole, _ = recipe_run
    launch(RECIPE + ["--cache_dir", cache, "--max_train_steps", "3", "--save_dir", tmp_path])
    resumed = launch(RECIPE + ["--cache_dir", cache, "--max_train_steps", "6", "--save_dir", tmp_path,
                               "--resume_from_checkpoint", "latest"])
    assert "resumed from" in resumed.stdout
    assert max_difference(weights(tmp_path), weights(whole)) == 0.0
    assert [r["learning_rate"] for r in records(tmp_path, "train")] == [r["learning_rate"] for r in records(whole, "train")]


def test_two_ranks_follow_one_ranks_schedule_times_the_square_root_of_two(cache, recipe_run, tmp_path):
    whole, _ = recipe_run
    two = launch(RECIPE + ["--cache_dir", cache, "--max_train_steps", "6", "--save_dir", tmp_path], launcher="accelerate")
    assert "world size: 2 process(es)" in two.stdout and "(sqrt scaling over 2 processes)" in two.stdout
    one_rank = {r["step"]: r["learning_rate"] for r in records(whole, "train")}
    two_ranks = {r["step"]: r["learning_rate"] for r in records(tmp_path, "train")}
    assert sorted(two_ranks) == sorted(one_rank) == list(range(1, 7))
    for step, rate in one_rank.items():
        assert two_ranks[step] == pytest.approx(math.sqrt(2) * rate, rel=1e-6), step


def test_the_masked_recipe_trains_protmasks_model_with_proteinmpnns_optimiser(cache, tmp_path):
    args = parse_arguments(["--recipe", "masked"])
    assert (args.objective, args.decoder_context, args.hidden_dim, args.num_neighbors) == ("masked", "masked", 256, 48)
    assert (args.mask_ratio, args.mask_ratio_max, args.lr_scheduler_type, args.warmup_steps) == (0.5, 1.0, "noam", 4000)
    assert (args.adam_beta2, args.adam_epsilon, args.lr_scaling, args.shuffle_chains) == (0.98, 1e-9, "sqrt", False)
    assert args.learning_rate == pytest.approx(2 / math.sqrt(256 * 4000))

    done = launch(TINY + ["--recipe", "masked", "--warmup_steps", "3", "--cache_dir", cache, "--max_train_steps", "4",
                          "--checkpointing_steps", "4", "--save_dir", tmp_path])
    assert "recipe masked: --objective masked --decoder_context masked --mask_ratio 0.5 --mask_ratio_max 1" in done.stdout
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert (config["decoder_context"], config["mask_ratio"], config["mask_ratio_max"]) == ("masked", 0.5, 1.0)
    assert config["label_smoothing"] == pytest.approx(1 / 11)
    optimizer = torch.load(tmp_path / "checkpoint-00000004" / "optimizer.bin", weights_only=True)
    assert all((tuple(g["betas"]), g["eps"]) == ((0.9, 0.98), 1e-9) for g in optimizer["param_groups"])
    rates = [r["learning_rate"] for r in records(tmp_path, "train")]
    assert max(rates) == pytest.approx(2 / math.sqrt(32 * 4000)) and rates.index(max(rates)) == 2  # peak at step 3
