"""Every command-line flag, typed and with help text. The guide's flags keep their names and meanings."""

from __future__ import annotations

import argparse

from ..data.arguments import add_data_arguments, build_options, default_cache_dir, fraction, positive_int  # noqa: F401
from .recipes import RECIPES, apply_recipe


#: Defaults of the flags that a --model_name_or_path run takes from the saved config unless they are given.
MODEL_DEFAULTS = {"dropout": 0.1, "backbone_noise": 0.02, "label_smoothing": 0.0}


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {text}")
    return value


#: Default crop: 8 examples × 192 residues (1536 per device) train the default model in fp32 within an 8 GB
#: GPU (bench/memory.py; about 3 MB per residue). Giant complexes (10^4-10^5 residues) are cropped spatially.
DEFAULT_MAX_LENGTH = 192
DEFAULT_BATCH_GB = 6


def length_or_off(text: str) -> int | None:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of residues, or 0 for no cropping; got {text}")
    return value or None


SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "inverse_sqrt", "noam")


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
    model.add_argument("--dropout", type=fraction, default=None,
                       help=f"dropout on residual updates (default {MODEL_DEFAULTS['dropout']}; with "
                            "--model_name_or_path the saved model's, unless given)")
    model.add_argument("--backbone_noise", type=float, default=None,
                       help=f"std (Å) of Gaussian noise added to coordinates in training (default "
                            f"{MODEL_DEFAULTS['backbone_noise']}; with --model_name_or_path the saved model's, unless given)")
    model.add_argument("--mask_ratio", type=fraction, default=0.15, help="fraction of each chain's residues hidden")
    model.add_argument("--mask_ratio_max", type=fraction, default=None,
                       help="draw each chain's mask ratio uniformly from [--mask_ratio, this]; 1.0 trains for "
                            "whole-sequence design as well as fill-in")
    model.add_argument("--label_smoothing", type=fraction, default=None,
                       help="label smoothing of the training loss, over the 21 residue letters (default 0; with "
                            "--model_name_or_path the saved model's, unless given). Validation and best/ use plain cross-entropy, as evaluate does")
    model.add_argument("--objective", choices=("masked", "autoregressive"), default="masked",
                       help="masked: hide --mask_ratio of each chain and predict it; autoregressive: predict every "
                            "residue in a random decoding order (ProteinMPNN's objective; needs --decoder_context "
                            "causal or a causal model such as converted ProteinMPNN weights)")
    model.add_argument("--decoder_context", choices=("masked", "causal"), default="masked",
                       help="a new model's decoder: masked (every visible residue seen by all) or causal "
                            "(ProteinMPNN's: residues see those decoded before them)")
    model.add_argument("--message_bias_per_neighbor", action=argparse.BooleanOptionalAction, default=False,
                       help="a new model adds each message MLP's last bias once per neighbour, as ProteinMPNN does "
                            "(its converted weights set it), instead of once per residue")
    model.add_argument("--context_atoms", type=non_negative_int, default=0,
                       help="atomic context (LigandMPNN's): a new model reads each residue's this many nearest "
                            "non-protein heavy atoms (small molecules, metals, nucleic acids kept by the build); 25 "
                            "as the published models, 0 a residue-only model. A model loaded with "
                            "--model_name_or_path keeps its own")
    model.add_argument("--model_name_or_path", default=None,
                       help="start from a saved protmask model folder, e.g. converted ProteinMPNN weights, to "
                            "fine-tune it (then the architecture flags are ignored)")
    model.add_argument("--torch_compile", action="store_true",
                       help="compile the model with torch.compile (first steps slower, later ones faster on GPU)")
    model.add_argument("--gradient_checkpointing", action="store_true",
                       help="recompute layer activations in the backward pass: less memory, ~20-35%% slower")

    train = parser.add_argument_group("training")
    train.add_argument("--sampling", choices=("auto", "cluster", "uniform"), default="auto",
                       help="cluster: each epoch draws one entry per chain cluster (ProteinMPNN's scheme: redundant "
                            "families no longer dominate; an epoch is one pass over clusters), from the dataset's "
                            "clusters (--cluster_identity, --cluster_file) or else identical chain sequences; "
                            "uniform: every entry once per epoch; auto: cluster when the dataset has clusters")
    train.add_argument("--seed", type=int, default=0,
                       help="seed of masking, shuffling, dropout and initialisation (the split has --split_seed)")
    train.add_argument("--epochs", type=positive_int, default=50, help="passes over the training split")
    train.add_argument("--batch_size", type=positive_int, default=8,
                       help="examples per device per step (global batch = this × processes × accumulation)")
    train.add_argument("--max_tokens_per_batch", type=positive_int, default=None,
                       help="padded-residue budget per device per step instead of --batch_size examples, with "
                            "length-bucketed batches")
    train.add_argument("--shuffle_chains", action=argparse.BooleanOptionalAction, default=False,
                       help="put the chains of each training example in a random order (ProteinMPNN's featurize "
                            "does), drawn per example and epoch")
    train.add_argument("--max_length", type=length_or_off, default=DEFAULT_MAX_LENGTH,
                       help="crop longer examples to this many residues (a contiguous window of a chain; a spatial "
                            "crop of a complex); 0 turns cropping off. With the defaults no batch holds more than "
                            f"--batch_size × this = {8 * DEFAULT_MAX_LENGTH} padded residues per device, which "
                            f"trains the default model in about {DEFAULT_BATCH_GB} GB (fp32)")
    train.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                       help="a named set of defaults, printed at start; any flag given still wins. proteinmpnn: "
                            "ProteinMPNN's training/training.py (its model, Adam 0.9/0.98/1e-9, Noam schedule, "
                            "label smoothing 0.1, dropout 0.1, 0.2 A noise, chain order shuffled, 10000-residue "
                            "batches, cluster sampling; clipping stays at 1.0); masked: protmask's masked model with "
                            "ProteinMPNN's optimiser, Noam schedule and label smoothing and --mask_ratio_max 1.0 "
                            "(measured against the others in docs/figures.md); see docs/published-weights.md")
    train.add_argument("--learning_rate", type=float, default=1e-4,
                       help="base learning rate (before scaling); the peak rate of --lr_scheduler_type noam")
    train.add_argument("--lr_scaling", choices=("none", "linear", "sqrt"), default="linear",
                       help="multiply the base LR by the number of processes (linear) or its square root")
    train.add_argument("--lr_scheduler_type", choices=SCHEDULERS, default="constant",
                       help="transformers' get_scheduler type (constant keeps the guide's fixed LR), or noam: "
                            "ProteinMPNN's, a linear warm-up to --learning_rate over --warmup_steps, then decay as "
                            "1/sqrt(step)")
    train.add_argument("--warmup_steps", type=non_negative_int, default=None,
                       help="LR warm-up, in optimizer steps (default: 5%% of the run, at most 1000, when LR scaling "
                            "raises the rate; else none)")
    train.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (not on biases/norms)")
    train.add_argument("--adam_beta1", type=fraction, default=0.9, help="AdamW's first-moment decay")
    train.add_argument("--adam_beta2", type=fraction, default=0.999, help="AdamW's second-moment decay")
    train.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW's epsilon")
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


def parse_arguments(argv=None) -> argparse.Namespace:
    """The command line, with a --recipe's defaults under the flags given (see `recipes.apply_recipe`)."""
    return apply_recipe(build_parser(), argv)
