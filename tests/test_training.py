"""train_accelerate.py end to end on CPU: real ranks, resume, kills, uneven data, schedules, flags."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from protmask.training.arguments import build_parser
from protmask.training.loop import effective_learning_rate, list_checkpoints
from runner import (BIN, RESUME, ROOT, SCRIPT, TINY, free_port, launch, max_difference, rank_processes, records,
                    resumed_equals_uninterrupted, wait_for_training, weights)


def test_two_ranks_equal_one_rank_with_the_same_global_batch(cache, tmp_path):
    # Deterministic model (no dropout, no noise). Two ranks each take one token-budget batch per step; one rank
    # with two accumulation steps takes the same two batches. The loss is the mean over the global batch's
    # masked residues in both, so the updates agree up to float summation order.
    common = TINY + ["--cache_dir", cache, "--max_tokens_per_batch", "1024", "--dropout", "0", "--backbone_noise", "0",
                     "--lr_scaling", "none", "--learning_rate", "1e-3", "--max_train_steps", "2"]
    two = launch(common + ["--save_dir", tmp_path / "two"], launcher="accelerate")
    assert "world size: 2 process(es)" in two.stdout and "device: cpu" in two.stdout
    launch(common + ["--save_dir", tmp_path / "one", "--gradient_accumulation_steps", "2"])
    final = json.loads((tmp_path / "two" / "final_metrics.json").read_text())
    assert final["ranks"] == 2 and final["ranks_in_sync"] is True
    # No scaling, no warm-up: every update of both runs used the base rate.
    for save_dir in (tmp_path / "two", tmp_path / "one"):
        assert {r["learning_rate"] for r in records(save_dir, "train")} == {1e-3}
    assert max_difference(weights(tmp_path / "two"), weights(tmp_path / "one")) < 1e-5
    # The same validation examples and masks were scored, each exactly once.
    a, b = records(tmp_path / "two", "validation")[-1], records(tmp_path / "one", "validation")[-1]
    assert (a["tokens"], a["chains"]) == (b["tokens"], b["chains"])
    assert abs(a["loss"] - b["loss"]) < 1e-4


def test_resume_continues_exactly(cache, uninterrupted, tmp_path):
    # Dropout and backbone noise are on: only restored RNG state, sampler epoch and batch offset make this exact.
    launch(RESUME + ["--cache_dir", cache, "--max_train_steps", "4", "--save_dir", tmp_path])
    resumed = launch(RESUME + ["--cache_dir", cache, "--max_train_steps", "7", "--save_dir", tmp_path,
                               "--resume_from_checkpoint", "latest"])
    assert "resumed from" in resumed.stdout and "checkpoint-00000004" in resumed.stdout
    assert max_difference(weights(tmp_path), weights(uninterrupted)) == 0.0
    # The epoch boundary (5 batches an epoch here) was crossed after resuming.
    assert records(tmp_path, "train")[-1]["epoch"] == 1


@pytest.mark.faults
def test_sigkill_resumes_from_last_complete_checkpoint(cache, uninterrupted, tmp_path):
    import random

    command = [sys.executable, SCRIPT] + RESUME + ["--cache_dir", cache, "--max_train_steps", "100000",
                                                   "--save_dir", str(tmp_path)]
    # Half the runs kill while checkpoint 6 is being written (its staging folder exists only then), the others
    # right after checkpoint 4 is complete.
    inside_save = random.random() < 0.5
    marker = tmp_path / ("checkpoint-00000006.tmp" if inside_save else "checkpoint-00000004")
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while not marker.is_dir() and time.time() < deadline and process.poll() is None:
            time.sleep(0.002)
        assert marker.is_dir(), f"{marker.name} never appeared"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    # Whatever the kill interrupted, every listed checkpoint is complete; half-written ones are .tmp folders.
    for checkpoint in list_checkpoints(tmp_path):
        assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "model.safetensors").is_file()
    newest = int(list_checkpoints(tmp_path)[-1].name.split("-")[1])
    target, reference = (7, uninterrupted) if newest < 7 else (newest + 2, tmp_path / "reference")
    if reference != uninterrupted:
        launch(RESUME + ["--cache_dir", cache, "--max_train_steps", target, "--save_dir", reference])
    launch(RESUME + ["--cache_dir", cache, "--max_train_steps", target, "--save_dir", tmp_path,
                     "--resume_from_checkpoint", "latest"])
    assert max_difference(weights(tmp_path), weights(reference)) == 0.0
    # The steps replayed after the checkpoint are logged once, as in the uninterrupted run.
    assert [r["step"] for r in records(tmp_path, "train")] == [r["step"] for r in records(reference, "train")]


def test_uneven_data_torchrun_schedule_and_exactly_once_validation(sample_dir, tmp_path):
    # 7 validation entries over 2 ranks, token-budget batches whose count does not divide by the ranks,
    # a warm-up then linear decay, linear LR scaling: launched with torchrun.
    cache = str(tmp_path / "cache")
    common = TINY + ["--cache_dir", cache, "--validation_fraction", "0.15", "--max_tokens_per_batch", "768",
                     "--lr_scheduler_type", "linear", "--warmup_steps", "3", "--max_train_steps", "8",
                     "--learning_rate", "1e-3", "--eval_steps", "4"]
    two = launch(common + ["--save_dir", tmp_path / "two"], launcher="torchrun", timeout=300)
    one = launch(common + ["--save_dir", tmp_path / "one", "--ddp", "--master_port", "1234"])
    assert "learning rate: 0.001 × 2 (linear scaling over 2 processes) = 0.002" in two.stdout
    assert "--ddp is no longer needed" in one.stdout and "--main_process_port 1234" in one.stdout

    for save_dir, base in ((tmp_path / "one", 1e-3), (tmp_path / "two", 2e-3)):
        # The rate each step's update used (read from the optimizer): step k follows k - 1 finished steps.
        learning_rates = {r["step"]: r["learning_rate"] for r in records(save_dir, "train")}
        for step in range(1, 9):
            done = step - 1
            expected = base * (done / 3 if done < 3 else max(0.0, (8 - done) / (8 - 3)))
            assert learning_rates[step] == pytest.approx(expected, rel=1e-6, abs=1e-12), (save_dir.name, step)

    # Validation: every example once, with the same fixed masks, on 1 and 2 ranks.
    from protmask.data.build import build_dataset
    from protmask.data.collator import MaskingCollator, ProtMaskProcessor, StructureDataset
    from protmask.training.arguments import build_options

    args = build_parser().parse_args(common)
    validation = build_dataset(sample_dir, cache, build_options(args), log=lambda *a: None).dataset["validation"]
    assert len(validation) % 2 == 1
    dataset = StructureDataset(validation)
    batch = MaskingCollator(ProtMaskProcessor(max_length=128), seed=0)(dataset.__getitems__(list(range(len(dataset)))))
    scored = batch["labels"] != -100
    expected_tokens = int(scored.sum())
    expected_chains = sum(len(batch["chain_index"][b][scored[b]].unique()) for b in range(len(dataset)))
    for save_dir in (tmp_path / "one", tmp_path / "two"):
        for record in records(save_dir, "validation"):
            assert (record["tokens"], record["chains"]) == (expected_tokens, expected_chains)


def two_machines(tmp_path, caches, save_dir):
    """Two one-process "machines" on loopback, each with its own --cache_dir (the same folder = shared storage)."""
    port = free_port()
    processes = []
    for rank in (0, 1):
        command = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
                   "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                   SCRIPT] + TINY + ["--cache_dir", str(caches[rank]), "--max_train_steps", "3",
                                     "--max_tokens_per_batch", "1024", "--save_dir", str(save_dir)]
        processes.append(subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs[0][-3000:] + outputs[1][-3000:]
    assert "world size: 2 process(es) on 2 machine(s)" in outputs[0]
    final = json.loads((save_dir / "final_metrics.json").read_text())
    assert final["ranks"] == 2 and final["ranks_in_sync"] and final["global_step"] == 3
    return outputs


def built_by(cache) -> list[str]:
    return [json.loads(report.read_text())["built_by"] for report in Path(cache).glob("*/build_report.json")]


def test_two_machines_on_one_host_share_one_build(tmp_path):
    # A fresh shared --cache_dir: one machine builds, the other waits for its lock and reuses the result.
    outputs = two_machines(tmp_path, [tmp_path / "shared"] * 2, tmp_path / "run")
    assert len(built_by(tmp_path / "shared")) == 1
    assert any("reusing the dataset" in output for output in outputs)


@pytest.mark.faults
def test_two_machines_with_node_local_caches_build_one_copy_each(tmp_path):
    two_machines(tmp_path, [tmp_path / "node0", tmp_path / "node1"], tmp_path / "run")
    (first,), (second,) = built_by(tmp_path / "node0"), built_by(tmp_path / "node1")
    assert first != second  # each machine's first process built its own copy, once


def test_final_model_loads_and_reproduces_validation_loss(uninterrupted, sample_build):
    import protmask  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForMaskedLM

    from protmask.data.collator import MaskingCollator, ProtMaskProcessor, StructureDataset
    from protmask.metrics import MaskedLMStats

    model = AutoModelForMaskedLM.from_pretrained(uninterrupted / "final")
    final = json.loads((uninterrupted / "final_metrics.json").read_text())
    card = (uninterrupted / "final" / "README.md").read_text()
    assert "validation_loss" in card and "hidden_dim" in card
    dataset = StructureDataset(sample_build.dataset["validation"])  # the run reused this very build
    collator = MaskingCollator(ProtMaskProcessor(mask_ratio=model.config.mask_ratio, max_length=128), seed=0)
    stats = MaskedLMStats()
    with torch.no_grad():
        batch = collator(dataset.__getitems__(list(range(len(dataset)))))
        stats.update(model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"],
                     batch["chain_index"])
    assert stats.reduce()["loss"] == pytest.approx(final["validation_loss"], abs=1e-4)


def test_nonfinite_losses_stop_the_run_with_a_clear_message(cache, tmp_path):
    done = launch(TINY + ["--cache_dir", cache, "--max_tokens_per_batch", "1024", "--learning_rate", "1e30",
                          "--max_grad_norm", "0", "--max_nonfinite_steps", "3", "--max_train_steps", "50",
                          "--save_dir", tmp_path], check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "consecutive steps had a non-finite loss" in done.stderr
    assert "non-finite loss, step skipped" in done.stdout


def test_tensorboard_and_offline_hub_warning_at_start(cache, tmp_path):
    done = launch(TINY + ["--cache_dir", cache, "--max_tokens_per_batch", "1024", "--max_train_steps", "3",
                          "--report_to", "tensorboard", "--push_to_hub", "--hub_model_id", "someone/protmask-test",
                          "--save_dir", tmp_path], env={"HF_HUB_OFFLINE": "1"})
    warning = done.stdout.index("will NOT be pushed")
    assert warning < done.stdout.index("world size:")  # said before training, not after
    assert (tmp_path / "final" / "model.safetensors").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((tmp_path / "protmask").rglob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    assert {"train/loss", "train/learning_rate", "validation/loss", "validation/accuracy"} <= set(tags)
    assert (tmp_path / "training_curves.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch_size", "0"], "--batch_size: must be a positive integer"),
        (["--checkpointing_steps", "often"], "must be a positive number of steps or 'epoch'"),
        (["--report_to", "mlflow"], "must be tensorboard, wandb, all or none"),
        (["--lr_scaling", "cubic"], "invalid choice"),
        (["--resume_from_checkpoint", "/nowhere/checkpoint-5"], "is not a complete protmask checkpoint"),
        (["--mixed_precision", "fp16"], "needs a CUDA GPU"),
        (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
        (["--max_tokens_per_batch", "64"], "is smaller than the longest training example"),
        (["--pdb_path", "/nowhere"], "--pdb_path /nowhere does not exist"),
        (["--objective", "autoregressive"], "--objective autoregressive needs a causal decoder"),
        (["--learning_rate", "inf"], "--learning_rate must be a finite number, positive; got inf"),
        (["--learning_rate", "nan"], "--learning_rate must be a finite number"),
        (["--weight_decay", "nan"], "--weight_decay must be a finite number"),
        (["--backbone_noise", "nan"], "--backbone_noise must be a finite number"),
        (["--max_grad_norm", "nan"], "--max_grad_norm must be a finite number"),
        (["--dropout", "1.0"], "--dropout must be a finite number, in [0, 1)"),
        (["--label_smoothing", "1.0"], "--label_smoothing must be a finite number, in [0, 1)"),
    ],
)
def test_bad_flags_fail_before_work(cache, tmp_path, flags, message):
    if flags == ["--mixed_precision", "fp16"] and torch.cuda.is_available():
        pytest.skip("fp16 is valid where CUDA is")
    done = launch(TINY + ["--cache_dir", cache, "--save_dir", tmp_path] + flags, check=False, timeout=120)
    assert done.returncode == 2
    assert message in done.stderr
    assert not (tmp_path / "final").exists()


def test_learning_rate_scaling_rules():
    from protmask.training.loop import warmup_steps

    args = build_parser().parse_args(["--learning_rate", "1e-4"])
    assert warmup_steps(args, 1, 1000) == 0  # one process: the guide's behaviour, no warm-up
    assert warmup_steps(args, 8, 1000) == 50 and warmup_steps(args, 8, 10**6) == 1000  # 5 %, at most 1000
    assert warmup_steps(build_parser().parse_args(["--warmup_steps", "0"]), 8, 1000) == 0
    assert effective_learning_rate(args, 8) == pytest.approx(8e-4)
    args.lr_scaling = "sqrt"
    assert effective_learning_rate(args, 4) == pytest.approx(2e-4)
    args.lr_scaling = "none"
    assert effective_learning_rate(args, 8) == pytest.approx(1e-4)
    defaults = build_parser().parse_args([])
    assert (defaults.epochs, defaults.batch_size, defaults.learning_rate, defaults.hidden_dim, defaults.mask_ratio,
            defaults.num_encoder_layers, defaults.num_decoder_layers, defaults.save_dir, defaults.num_workers) == (
        50, 8, 1e-4, 256, 0.15, 3, 3, "checkpoints", 4)
    # Safe by default: examples cropped, so a batch holds at most batch_size × 192 residues; 0 turns it off.
    assert defaults.max_length == 192 and build_parser().parse_args(["--max_length", "0"]).max_length is None


def test_fine_tuning_converted_proteinmpnn_on_two_ranks_resumes_exactly(cache, tmp_path):
    # Published weights → protmask folder → 2-rank fine-tuning with ProteinMPNN's own objective (dropout and
    # backbone noise on, as the converted config says), interrupted and resumed: the same weights at the end.
    from protmask.models.convert_proteinmpnn import convert_proteinmpnn

    convert_proteinmpnn("vanilla/v_48_020", tmp_path / "v_48_020")
    common = ["--model_name_or_path", tmp_path / "v_48_020", "--objective", "autoregressive", "--cache_dir", cache,
              "--max_length", "128", "--max_tokens_per_batch", "1024", "--num_workers", "0", "--logging_steps", "1",
              "--learning_rate", "1e-4", "--checkpointing_steps", "2"]
    resumed_equals_uninterrupted(common, tmp_path)
    published = load_file(str(tmp_path / "v_48_020" / "model.safetensors"))
    assert max_difference(weights(tmp_path / "whole"), published) > 0.0  # it did train
    config = json.loads((tmp_path / "whole" / "final" / "config.json").read_text())
    assert config["decoder_context"] == "causal" and config["message_bias_per_neighbor"] is True
    # Validation is ProteinMPNN's teacher-forced accuracy, which the published weights already do well at.
    assert records(tmp_path / "whole", "validation")[-1]["accuracy"] > 0.3


def checkpoint_step(stdout: str) -> int:
    import re

    match = re.search(r"preempted: checkpoint of step (\d+)", stdout)
    assert match, stdout[-2000:]
    return int(match.group(1))


@pytest.mark.faults
def test_sigterm_finishes_the_step_checkpoints_and_resumes_identically(cache, uninterrupted, tmp_path):
    from protmask.training.preemption import PREEMPTED_EXIT_CODE

    command = [sys.executable, SCRIPT] + RESUME + ["--cache_dir", cache, "--max_train_steps", "100000",
                                                   "--save_dir", str(tmp_path)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    wait_for_training(tmp_path, process)
    os.kill(process.pid, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert "received SIGTERM: finishing this optimizer step" in stderr
    step = checkpoint_step(stdout)
    assert list_checkpoints(tmp_path)[-1].name == f"checkpoint-{step:08d}" and not (tmp_path / "final").exists()
    # SLURM's requeue runs the same command with --resume_from_checkpoint latest: it ends where an
    # uninterrupted run ends, bit for bit.
    target = 7 if step < 7 else step + 2
    reference = uninterrupted
    if target != 7:
        reference = tmp_path / "reference"
        launch(RESUME + ["--cache_dir", cache, "--max_train_steps", target, "--save_dir", reference])
    launch(RESUME + ["--cache_dir", cache, "--max_train_steps", target, "--save_dir", tmp_path,
                     "--resume_from_checkpoint", "latest"])
    assert max_difference(weights(tmp_path), weights(reference)) == 0.0


@pytest.mark.faults
@pytest.mark.parametrize("second", ["SIGINT", "SIGTERM after the repeat window"])
def test_a_second_signal_stops_at_once(sample_dir, tmp_path, second):
    # The first signal arrives during the dataset build (a fresh cache, one parse process), the second soon
    # after: the run must not wait for the build and the first training step. A different signal, or the
    # same one after the repeat window (1 s here), is a second request; a repeat within it is not.
    cache = tmp_path / "cache"
    command = [sys.executable, SCRIPT] + TINY + ["--cache_dir", str(cache), "--num_proc", "1",
                                                 "--save_dir", str(tmp_path / "run")]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PROTMASK_SIGNAL_REPEAT_WINDOW="1"))
    deadline = time.time() + 120
    while not (cache.is_dir() and any(p.name.startswith(".protmask-dataset") for p in cache.iterdir())):
        assert time.time() < deadline and process.poll() is None, "the build did not start"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGTERM)
    time.sleep(0.1)
    os.kill(process.pid, signal.SIGTERM)  # the same request
    time.sleep(0.1 if second == "SIGINT" else 1.2)
    os.kill(process.pid, signal.SIGINT if second == "SIGINT" else signal.SIGTERM)
    stopped = time.time()
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + (signal.SIGINT if second == "SIGINT" else signal.SIGTERM), stderr[-3000:]
    assert stderr.count("received SIGTERM: finishing") == 1 and "again: stopping now" in stderr
    assert time.time() - stopped < 5 and not list_checkpoints(tmp_path / "run")


@pytest.mark.faults
def test_sigint_to_one_of_two_ranks_stops_both_after_the_same_step(cache, tmp_path):
    # A warm-up of fixed length: the default one depends on --max_train_steps, which differs between the runs.
    common = RESUME + ["--cache_dir", cache, "--dropout", "0.1", "--warmup_steps", "0"]
    prefix = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu.yaml"),
              "--main_process_port", str(free_port()), SCRIPT]
    process = subprocess.Popen(prefix + [str(a) for a in common + ["--max_train_steps", "100000",
                                                                   "--save_dir", tmp_path / "preempted"]],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    wait_for_training(tmp_path / "preempted", process)
    ranks = rank_processes(process.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[-1], signal.SIGINT)  # one rank only: the other learns of it in the step's all-reduce
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode != 0
    step = checkpoint_step(stdout)
    checkpoint = tmp_path / "preempted" / f"checkpoint-{step:08d}"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    target = step + 2
    launch(common + ["--max_train_steps", target, "--save_dir", tmp_path / "preempted",
                     "--resume_from_checkpoint", "latest"], launcher="accelerate")
    launch(common + ["--max_train_steps", target, "--save_dir", tmp_path / "whole"], launcher="accelerate")
    assert max_difference(weights(tmp_path / "preempted"), weights(tmp_path / "whole")) == 0.0


def test_latest_skips_a_damaged_checkpoint_and_a_named_one_is_refused(cache, uninterrupted, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    newest, previous = list_checkpoints(run)[-1], list_checkpoints(run)[-2]
    weights_file = newest / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[: weights_file.stat().st_size // 2])  # truncated
    resumed = launch(RESUME + ["--cache_dir", cache, "--max_train_steps", "8", "--save_dir", run,
                               "--resume_from_checkpoint", "latest"])
    assert f"skipping {newest.name}, it does not load" in resumed.stdout
    assert f"resumed from {previous}" in resumed.stdout

    (previous / "random_states_0.pkl").write_bytes(b"not a pickle")
    refused = launch(RESUME + ["--cache_dir", cache, "--max_train_steps", "8", "--save_dir", run,
                               "--resume_from_checkpoint", previous], check=False)
    assert refused.returncode == 2
    assert f"--resume_from_checkpoint {previous} does not load" in refused.stderr


def test_flags_given_with_a_loaded_model_apply_and_validation_is_plain_cross_entropy(cache, tmp_path):
    base = tmp_path / "base"
    launch(RESUME + ["--cache_dir", cache, "--max_train_steps", "1", "--save_dir", base])
    tune = RESUME + ["--cache_dir", cache, "--max_train_steps", "1", "--model_name_or_path", base / "final",
                     "--learning_rate", "1e-12"]  # weights stay put: only the flags differ
    launch(tune + ["--dropout", "0.25", "--label_smoothing", "0.5", "--backbone_noise", "0", "--save_dir", tmp_path / "a"])
    launch(tune + ["--save_dir", tmp_path / "b"])
    saved = json.loads((base / "final" / "config.json").read_text())
    a = json.loads((tmp_path / "a" / "final" / "config.json").read_text())
    b = json.loads((tmp_path / "b" / "final" / "config.json").read_text())
    assert (a["dropout"], a["label_smoothing"], a["backbone_noise"]) == (0.25, 0.5, 0.0)  # applied
    assert (b["dropout"], b["label_smoothing"], b["backbone_noise"]) == (saved["dropout"], 0.0, saved["backbone_noise"])
    # Training losses differ (smoothed, other dropout), validation is the same plain cross-entropy for both.
    assert records(tmp_path / "a", "train")[0]["loss"] != records(tmp_path / "b", "train")[0]["loss"]
    assert records(tmp_path / "a", "validation")[-1]["loss"] == pytest.approx(
        records(tmp_path / "b", "validation")[-1]["loss"], rel=1e-6)


@pytest.mark.faults
def test_a_restart_before_the_first_checkpoint_starts_a_clean_log(cache, tmp_path):
    command = [sys.executable, SCRIPT] + RESUME + ["--cache_dir", cache, "--max_train_steps", "100000",
                                                   "--checkpointing_steps", "100000", "--save_dir", str(tmp_path)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    wait_for_training(tmp_path, process)
    os.kill(process.pid, signal.SIGKILL)  # no checkpoint yet
    process.wait()
    assert records(tmp_path, "train") and not list_checkpoints(tmp_path)
    launch(RESUME + ["--cache_dir", cache, "--max_train_steps", "3", "--save_dir", tmp_path,
                     "--resume_from_checkpoint", "latest"])
    assert [r["step"] for r in records(tmp_path, "train")] == [1, 2, 3]


@pytest.mark.parametrize("launcher", [None, pytest.param("accelerate", marks=pytest.mark.faults)])
def test_cluster_sampling_resumes_exactly_across_epochs(sample_dir, tmp_path, launcher):
    # A redundant set: 8 structures, two of them with 6 renamed copies each (identical chains, one cluster
    # each). --sampling cluster draws 8 entries an epoch, not 20; interrupted and resumed (1 and 2 ranks,
    # dropout and noise on, across epoch boundaries), it ends bit-identical to the uninterrupted run.
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    names = ["1a8q.pdb.gz", "5emb.pdb.gz", "1aki.cif.gz", "2fr2.pdb.gz", "3fh2.pdb.gz", "4bpy.pdb.gz",
             "1p3c.pdb.gz", "5pti.cif.gz"]
    for name in names:
        shutil.copy(sample_dir / name, data / name)
    for copy in range(6):
        for name in names[:2]:
            shutil.copy(sample_dir / name, data / f"copy{copy}_{name}")
    common = TINY + ["--pdb_path", data, "--cache_dir", tmp_path / "cache", "--validation_fraction", "0",
                     "--test_fraction", "0", "--max_tokens_per_batch", "512", "--sampling", "cluster",
                     "--checkpointing_steps", "3"]
    whole = launch(common + ["--max_train_steps", "6", "--save_dir", tmp_path / "whole"], launcher=launcher)
    assert "sampling: cluster (one entry from each of 8 clusters per epoch)" in whole.stdout, whole.stdout[-3000:]
    launch(common + ["--max_train_steps", "3", "--save_dir", tmp_path / "parts"], launcher=launcher)
    resumed = launch(common + ["--max_train_steps", "6", "--save_dir", tmp_path / "parts",
                               "--resume_from_checkpoint", "latest"], launcher=launcher)
    assert "resumed from" in resumed.stdout
    assert max_difference(weights(tmp_path / "parts"), weights(tmp_path / "whole")) == 0.0
    epochs = [r["epoch"] for r in records(tmp_path / "whole", "train")]
    assert epochs[-1] >= 2 and epochs[2] < epochs[-1]  # epoch boundaries after the resume point
