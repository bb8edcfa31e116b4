"""Every check that needs no data, run before any work: flags, their combinations, and whether the launcher
started the processes it was asked for."""

from __future__ import annotations

import math
import os
import shlex
from pathlib import Path

import torch

from .checkpointing import TRAINER_STATE
from .errors import TrainingError


def check_arguments(args) -> None:
    """Every check that needs no data: a bad flag or combination fails here, before any work."""
    problems = []
    float_rules = [  # every float flag: finite and in range (NaN passes any comparison, so test it first)
        ("--learning_rate", args.learning_rate, lambda v: v > 0, "positive"),
        ("--weight_decay", args.weight_decay, lambda v: v >= 0, "zero or more"),
        ("--max_grad_norm", args.max_grad_norm, lambda v: v >= 0, "zero or more (0: no clipping)"),
        ("--backbone_noise", args.backbone_noise, lambda v: v >= 0, "zero or more (Å)"),
        ("--dropout", args.dropout, lambda v: 0 <= v < 1, "in [0, 1)"),
        ("--label_smoothing", args.label_smoothing, lambda v: 0 <= v < 1, "in [0, 1)"),
        ("--max_resolution", args.max_resolution, lambda v: v > 0, "positive (Å)"),
        ("--adam_beta1", args.adam_beta1, lambda v: 0 <= v < 1, "in [0, 1)"),
        ("--adam_beta2", args.adam_beta2, lambda v: 0 <= v < 1, "in [0, 1)"),
        ("--adam_epsilon", args.adam_epsilon, lambda v: v > 0, "positive"),
    ]
    for flag, value, rule, wanted in float_rules:
        if value is not None and not (math.isfinite(value) and rule(value)):
            problems.append(f"{flag} must be a finite number, {wanted}; got {value}")
    if not 0.0 < args.mask_ratio <= 1.0:
        problems.append(f"--mask_ratio must be in (0, 1], got {args.mask_ratio}")
    if args.mask_ratio_max is not None and args.mask_ratio_max < args.mask_ratio:
        problems.append(f"--mask_ratio_max ({args.mask_ratio_max}) must be at least --mask_ratio ({args.mask_ratio})")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        problems.append("--mixed_precision fp16 needs a CUDA GPU; on CPU use bf16 or no")
    if args.push_to_hub and not args.hub_model_id:
        problems.append("--push_to_hub needs --hub_model_id (e.g. your-name/protmask-small)")
    if "wandb" in args.report_to:
        try:
            import wandb  # noqa: F401
        except ImportError:
            problems.append("--report_to wandb needs the wandb package: pip install wandb")
    if "tensorboard" in args.report_to:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            problems.append("--report_to tensorboard needs TensorBoard: pip install 'protmask[tensorboard]'")
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        if not Path(args.resume_from_checkpoint, TRAINER_STATE).is_file():
            problems.append(f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a complete protmask "
                            "checkpoint (no trainer_state.json); give a checkpoint-N folder or 'latest'")
    if args.overwrite_save_dir and args.resume_from_checkpoint:
        problems.append("--overwrite_save_dir removes the run that --resume_from_checkpoint would continue; give one")
    if args.model_name_or_path and not Path(args.model_name_or_path, "config.json").is_file():
        problems.append(f"--model_name_or_path {args.model_name_or_path} is not a saved model folder (no config.json)")
    if problems:
        raise TrainingError("\n".join(problems))


def legacy_flags(args, say) -> None:
    if args.ddp:
        say("--ddp is no longer needed: the launcher decides. Use `accelerate launch --num_processes N "
            "train_accelerate.py ...` or `torchrun --nproc_per_node N train_accelerate.py ...`.")
    if args.master_port is not None:
        say(f"--master_port is no longer read: use `accelerate launch --main_process_port {args.master_port}` "
            f"or `MASTER_PORT={args.master_port} torchrun ...`.")


def requested_processes() -> tuple[int, str] | None:
    """(processes, how they were asked for) when this process was started by ``accelerate launch``: its command
    line (``--num_processes``) or the config file it read. None when that cannot be read."""
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    words = [w.decode(errors="replace") for w in parent if w]
    if not any(Path(w).name == "accelerate" for w in words[:3]) or "launch" not in words:
        return None
    words = words[words.index("launch") + 1:]

    def option(name):
        for i, word in enumerate(words):
            if word == name and i + 1 < len(words):
                return words[i + 1]
            if word.startswith(name + "="):
                return word.split("=", 1)[1]
        return None

    command = "accelerate launch " + " ".join(shlex.quote(w) for w in words[:6]) + " ..."
    if option("--num_processes"):
        return int(option("--num_processes")), command
    config_file = option("--config_file") or default_accelerate_config()
    if config_file and Path(config_file).is_file():
        import yaml

        try:
            config = yaml.safe_load(Path(config_file).read_text()) or {}
        except yaml.YAMLError:
            return None
        if isinstance(config, dict) and isinstance(config.get("num_processes"), int):
            return config["num_processes"], f"{command} (num_processes: {config['num_processes']} in {config_file})"
    return None


def default_accelerate_config() -> str | None:
    from accelerate.commands.config.config_args import default_config_file

    return default_config_file


def check_launch(num_processes: int) -> None:
    """Refuse a run that got fewer processes than its launcher was asked for (accelerate launch --cpu or a
    MULTI_CPU config start ONE process on a machine without GPUs, silently)."""
    requested = requested_processes()
    if requested is None or requested[0] <= num_processes:
        return
    count, how = requested
    raise TrainingError(
        f"{how} asked for {count} processes but this run has {num_processes}: accelerate starts one process for "
        "--cpu or a distributed_type MULTI_CPU config. For CPU ranks use `accelerate launch --config_file "
        f"accelerate_configs/cpu.yaml ...` or `accelerate launch --multi_gpu --num_processes {count} ...` (the "
        f"script then joins them as CPU ranks), or `torchrun --nproc_per_node {count} train_accelerate.py ...`")
