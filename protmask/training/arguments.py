"""Every command-line flag, typed and with help text. The guide's flags keep their names and meanings."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..data import SAMPLE_DATA


def default_cache_dir() -> str:
    return os.environ.get("PROTMASK_CACHE") or str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "protmask")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--pdb_path", default=str(SAMPLE_DATA),
                       help="folder of PDB/mmCIF files (.gz or not, searched recursively), one file, a list file "
                            "(.txt, one path a line) or a dataset built earlier (default: the shipped sample)")
    group.add_argument("--cache_dir", default=default_cache_dir(),
                       help="where built datasets are kept; the same inputs and options reuse the cache "
                            "(default: $PROTMASK_CACHE or ~/.cache/protmask)")
    group.add_argument("--num_proc", type=positive_int, default=None,
                       help="parallel parsing processes for a build (default: all CPU cores)")
    group.add_argument("--min_length", type=positive_int, default=20,
                       help="drop chains with fewer residues that have a complete backbone (default: 20)")
    group.add_argument("--max_resolution", type=float, default=None,
                       help="drop entries whose stated resolution is worse (larger) than this, in Å; entries "
                            "with no stated resolution (NMR) are kept (default: no limit)")
    group.add_argument("--max_unknown_fraction", type=fraction, default=0.5,
                       help="drop chains where more than this fraction of residues are unknown (X) (default: 0.5)")
    group.add_argument("--validation_fraction", type=fraction, default=0.1,
                       help="fraction of entries held out for validation (default: 0.1)")
    group.add_argument("--test_fraction", type=fraction, default=0.1,
                       help="fraction of entries held out for testing (default: 0.1)")
    group.add_argument("--cluster_file", default=None,
                       help="TSV of chain (1abc_A) → cluster id, or ProteinMPNN's list.csv; whole clusters go to "
                            "one split. Without it, identical chain sequences stay together")
    group.add_argument("--max_file_mb", type=positive_int, default=512,
                       help="refuse (and report) structure files larger than this many MB once inflated; parsing "
                            "holds several times a file's size in memory")
    group.add_argument("--rebuild_dataset", action="store_true",
                       help="build the dataset again even when a cached build matches (e.g. after damage)")
    group.add_argument("--seed", type=int, default=0, help="seed for splits, masking, shuffling and initialisation")


def build_options(args):
    from ..data.build import BuildOptions

    return BuildOptions(
        min_length=args.min_length,
        max_resolution=args.max_resolution,
        max_unknown_fraction=args.max_unknown_fraction,
        validation_fraction=args.validation_fraction,
        test_fraction=args.test_fraction,
        cluster_file=args.cluster_file,
        seed=args.seed,
        max_file_mb=args.max_file_mb,
    )


SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "inverse_sqrt")


def checkpointing_steps(text: str):
    if text == "epoch":
        return text
    try:
        return positive_int(text)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"must be a positive number of steps or 'epoch', got {text}") from None


def report_to(text: str) -> list[str]:
    choices = {"tensorboard", "wandb", "all", "none"}
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in choices]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"must be tensorboard, wandb, all or none (comma-separated), got {text}")
    if "none" in values:
        return []
    if "all" in values:
        return ["tensorboard", "wandb"]
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_accelerate.py",
        description="Train ProtMaskForMaskedLM on structure files with Hugging Face Accelerate. The same command "
                    "runs under python, accelerate launch and torchrun, on CPU, one GPU or many.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_data_arguments(parser)

    model = parser.add_argument_group("model")
    model.add_argument("--hidden_dim", type=positive_int, default=256, help="node and edge state width")
    model.add_argument("--num_encoder_layers", type=non_negative_int, default=3, help="structure encoder layers")
    model.add_argument("--num_decoder_layers", type=non_negative_int, default=3, help="sequence decoder layers")
    model.add_argument("--num_neighbors", type=positive_int, default=48, help="k nearest neighbours per residue (CA)")
    model.add_argument("--dropout", type=fraction, default=0.1, help="dropout on residual updates")
    model.add_argument("--backbone_noise", type=float, default=0.02,
                       help="std (Å) of Gaussian noise added to coordinates in training")
    model.add_argument("--mask_ratio", type=fraction, default=0.15, help="fraction of each chain's residues hidden")
    model.add_argument("--mask_ratio_max", type=fraction, default=None,
                       help="draw each chain's mask ratio uniformly from [--mask_ratio, this]; 1.0 trains for "
                            "whole-sequence design as well as fill-in")
    model.add_argument("--label_smoothing", type=fraction, default=0.0, help="label smoothing of the loss")
    model.add_argument("--objective", choices=("masked", "autoregressive"), default="masked",
                       help="masked: hide --mask_ratio of each chain and predict it; autoregressive: predict every "
                            "residue in a random decoding order (ProteinMPNN's objective; needs --decoder_context "
                            "causal or a causal model such as converted ProteinMPNN weights)")
    model.add_argument("--decoder_context", choices=("masked", "causal"), default="masked",
                       help="a new model's decoder: masked (every visible residue seen by all) or causal "
                            "(ProteinMPNN's: residues see those decoded before them)")
    model.add_argument("--model_name_or_path", default=None,
                       help="start from a saved protmask model folder, e.g. converted ProteinMPNN weights, to "
                            "fine-tune it (then the architecture flags are ignored)")
    model.add_argument("--gradient_checkpointing", action="store_true",
                       help="recompute layer activations in the backward pass: less memory, ~20-35%% slower")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=positive_int, default=50, help="passes over the training split")
    train.add_argument("--batch_size", type=positive_int, default=8,
                       help="examples per device per step (global batch = this × processes × accumulation)")
    train.add_argument("--max_tokens_per_batch", type=positive_int, default=None,
                       help="padded-token budget per device per step, with length-bucketed batches; caps "
                            "--batch_size examples too when both are given")
    train.add_argument("--max_length", type=positive_int, default=None,
                       help="crop longer examples to this many residues (a contiguous window; a spatial crop "
                            "for complexes)")
    train.add_argument("--learning_rate", type=float, default=1e-4, help="base learning rate (before scaling)")
    train.add_argument("--lr_scaling", choices=("none", "linear", "sqrt"), default="linear",
                       help="multiply the base LR by the number of processes (linear) or its square root")
    train.add_argument("--lr_scheduler_type", choices=SCHEDULERS, default="constant",
                       help="transformers' get_scheduler type (constant keeps the guide's fixed LR)")
    train.add_argument("--warmup_steps", type=non_negative_int, default=0, help="LR warm-up, in optimizer steps")
    train.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (not on biases/norms)")
    train.add_argument("--gradient_accumulation_steps", type=positive_int, default=1,
                       help="batches per optimizer step on each device")
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="clip gradients to this norm (0: no clipping)")
    train.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                       help="autocast precision (default: what accelerate launch / its config says, else no)")
    train.add_argument("--num_workers", type=non_negative_int, default=4, help="data-loader worker processes")
    train.add_argument("--max_train_steps", type=positive_int, default=None,
                       help="stop after this many optimizer steps (overrides --epochs)")
    train.add_argument("--eval_steps", type=positive_int, default=None,
                       help="validate every N optimizer steps (always at the end of each epoch)")
    train.add_argument("--logging_steps", type=positive_int, default=10, help="log training metrics every N steps")
    train.add_argument("--checkpointing_steps", type=checkpointing_steps, default="epoch",
                       help="save a resumable checkpoint every N steps, or each 'epoch'")
    train.add_argument("--save_total_limit", type=positive_int, default=None,
                       help="keep only the newest N resumable checkpoints")
    train.add_argument("--resume_from_checkpoint", default=None,
                       help="a checkpoint folder, or 'latest' for the newest complete one of this run in --save_dir; "
                            "the flags that define the run must match the checkpoint's")
    train.add_argument("--allow_world_size_change", action="store_true",
                       help="resume on another number of processes: the data position and LR schedule carry over, "
                            "per-rank random states are seeded afresh")
    train.add_argument("--overwrite_save_dir", action="store_true",
                       help="remove the checkpoints, models and metrics of a run already in --save_dir and start anew")
    train.add_argument("--save_dir", default="checkpoints", help="where checkpoints, final/ and best/ go")
    train.add_argument("--report_to", type=report_to, default=[],
                       help="trackers: tensorboard, wandb, all or none (metrics.jsonl is always written)")
    train.add_argument("--max_nonfinite_steps", type=positive_int, default=20,
                       help="stop after this many consecutive steps with a non-finite loss")
    train.add_argument("--process_group_timeout", type=positive_int, default=600,
                       help="seconds a rank waits for the others in a training collective: a stalled or dead rank "
                            "ends the job after this long")
    train.add_argument("--dataset_build_timeout", type=positive_int, default=86400,
                       help="seconds the other ranks wait for the main process to build the dataset")
    train.add_argument("--torch_threads", type=positive_int, default=None,
                       help="CPU threads per process (default: cores ÷ processes on this machine)")

    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="push final/ with its model card at the end")
    hub.add_argument("--hub_model_id", default=None, help="repository name on the Hub, e.g. user/protmask-small")

    legacy = parser.add_argument_group("accepted from older command lines (no effect)")
    legacy.add_argument("--ddp", action="store_true", help=argparse.SUPPRESS)
    legacy.add_argument("--master_port", type=int, default=None, help=argparse.SUPPRESS)
    return parser
