"""The Accelerate training loop: build the accelerator, the data and the model, `prepare` them, train,
validate, checkpoint, resume and log. One function, `train`, reads top to bottom."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..runtime import tune_cpu_allocator
from .preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionWatch, exit_process

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


class TrainingError(RuntimeError):
    """A problem with the flags, the data or the run, explained for the user."""


# ----------------------------------------------------------------------------------------- checks up front

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


# ------------------------------------------------------------------------------------------- checkpoints

def list_checkpoints(save_dir) -> list[Path]:
    """Complete checkpoints, oldest first. A folder without trainer_state.json (a save that was killed) is
    never listed: the state file is written last and the folder is renamed into place after it."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = []
    for path in save_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def checkpoint_damage(path: Path) -> str | None:
    """What makes a checkpoint unusable (a file truncated, unreadable or missing), or None when it loads."""
    from safetensors import safe_open

    try:
        json.loads((path / TRAINER_STATE).read_text())
        weights = sorted(path.glob("*.safetensors")) or [path / "model.safetensors"]
        for file in weights:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    handle.get_tensor(key)
        for file in sorted(path.glob("*.bin")):
            torch.load(str(file), map_location="cpu", weights_only=True)
        for file in sorted(path.glob("random_states_*.pkl")):
            # Our own file, written by accelerate.save_state: numpy and Python RNG states need full unpickling.
            torch.load(str(file), map_location="cpu", weights_only=False)
    except Exception as error:  # any failure means the same for a resume: this checkpoint cannot restore the run
        return f"{type(error).__name__}: {error}".splitlines()[0][:300]
    return None


def resolve_resume(args, say=print) -> Path | None:
    """The checkpoint to resume from. ``latest`` takes the newest one that loads, saying which it skipped and
    why; a named checkpoint that does not load is an error (resuming from a damaged state is never exact)."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        for checkpoint in reversed(list_checkpoints(args.save_dir)):
            damage = checkpoint_damage(checkpoint)
            if damage is None:
                return checkpoint
            say(f"--resume_from_checkpoint latest: skipping {checkpoint.name}, it does not load ({damage})")
        return None
    path = Path(args.resume_from_checkpoint)
    damage = checkpoint_damage(path)
    if damage is not None:
        raise TrainingError(f"--resume_from_checkpoint {path} does not load ({damage}); resume from an earlier "
                            f"checkpoint-N in {path.parent}, or 'latest' to take the newest one that loads")
    return path


def save_checkpoint(accelerator, args, state: dict) -> Path:
    """All ranks write into a temporary folder; the main process adds trainer_state.json and renames it."""
    save_dir = Path(args.save_dir)
    final = save_dir / f"checkpoint-{state['global_step']:08d}"
    staging = save_dir / f"{final.name}.tmp"
    if accelerator.is_main_process:
        for stale in save_dir.glob("checkpoint-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomically(staging / TRAINER_STATE, state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        if args.save_total_limit:
            for old in list_checkpoints(save_dir)[: -args.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def write_json_atomically(path: Path, data) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def save_model(accelerator, model, tokenizer, folder: Path, card: str, extra_files=()) -> None:
    """A `save_pretrained` folder (hub format) with tokenizer and model card, swapped into place whole."""
    if not accelerator.is_main_process:
        return
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "README.md").write_text(card)
    for extra in extra_files:
        shutil.copy(extra, staging / Path(extra).name)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)


# -------------------------------------------------------------------------------------------------- setup

def build_accelerator(args):
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    # Without CUDA, ask for CPU explicitly: then `accelerate launch --multi_gpu` and torchrun start real gloo
    # ranks instead of N processes that each believe they are alone.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        log_with=args.report_to or None,
        project_dir=args.save_dir,
        dataloader_config=DataLoaderConfiguration(even_batches=True),
        # The main process builds the dataset while the others wait: give that wait room.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=args.process_group_timeout)),
                         # Without decoder layers the residue embedding is unused; DDP must be told.
                         DistributedDataParallelKwargs(find_unused_parameters=args.num_decoder_layers == 0)],
    )
    return accelerator


def set_cpu_threads(accelerator, args) -> int:
    """On CPU, split the cores between the processes of this machine (each rank is one process)."""
    if accelerator.device.type != "cpu":
        return torch.get_num_threads()
    if args.torch_threads:
        threads = args.torch_threads
    elif "OMP_NUM_THREADS" in os.environ:  # torchrun and accelerate launch set 1 for several processes
        threads = int(os.environ["OMP_NUM_THREADS"])
    else:
        threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    return threads


def load_data(accelerator, args, say):
    from ..data.build import DatasetBuildError, build_dataset
    from .arguments import build_options

    # The main process parses (or finds the cache); the others wait, then read the finished build.
    with accelerator.main_process_first():
        try:
            result = build_dataset(args.pdb_path, args.cache_dir, build_options(args), num_proc=args.num_proc,
                                   log=say if accelerator.is_main_process else (lambda *a: None))
        except DatasetBuildError as error:
            raise TrainingError(str(error)) from None
    return result


def make_loaders(accelerator, args, dataset, tokenizer):
    from ..data.collator import MaskingCollator, ProtMaskProcessor, StructureDataset
    from ..data.sampler import LengthBucketBatchSampler, padded

    train_set = StructureDataset(dataset["train"])
    validation_set = StructureDataset(dataset["validation"])
    if len(train_set) == 0:
        raise TrainingError(f"the training split of {args.pdb_path} is empty; give more structures or lower "
                            "--validation_fraction / --test_fraction")
    cap = args.max_length or 10**9
    train_lengths = np.minimum(train_set.lengths, cap)
    longest = padded(int(train_lengths.max()), 8)
    if args.max_tokens_per_batch is not None and longest > args.max_tokens_per_batch:
        raise TrainingError(
            f"--max_tokens_per_batch {args.max_tokens_per_batch} is smaller than the longest training example "
            f"({longest} padded residues{' after --max_length ' + str(args.max_length) if args.max_length else ''}); "
            "raise the budget or crop with --max_length")
    budget = dict(max_tokens=args.max_tokens_per_batch,
                  max_examples=args.batch_size if args.max_tokens_per_batch is None else None)
    processor = ProtMaskProcessor(tokenizer, mask_ratio=args.mask_ratio, mask_ratio_max=args.mask_ratio_max,
                                  max_length=args.max_length, objective=args.objective)
    # Validation masks at the fixed ratio, whatever range training draws from, so numbers stay comparable.
    validation_processor = ProtMaskProcessor(tokenizer, mask_ratio=args.mask_ratio, max_length=args.max_length,
                                             objective=args.objective)
    train_sampler = LengthBucketBatchSampler(
        train_lengths, shuffle=True, seed=args.seed,
        group_size=accelerator.num_processes * args.gradient_accumulation_steps, **budget)
    validation_lengths = np.minimum(validation_set.lengths, cap) if len(validation_set) else []
    validation_budget = dict(budget)
    if args.max_tokens_per_batch is not None and len(validation_set):
        validation_budget["max_tokens"] = max(args.max_tokens_per_batch, padded(int(max(validation_lengths)), 8))
    validation_sampler = LengthBucketBatchSampler(validation_lengths, shuffle=False, seed=args.seed,
                                                  num_replicas=accelerator.num_processes, **validation_budget)
    loader_options = dict(num_workers=args.num_workers, pin_memory=torch.cuda.is_available(),
                          # A private generator: creating loader iterators must not draw from the global RNG,
                          # or a resumed run's dropout would differ from an uninterrupted one.
                          generator=torch.Generator().manual_seed(args.seed))
    train_loader = torch.utils.data.DataLoader(train_set, batch_sampler=train_sampler,
                                               collate_fn=MaskingCollator(processor, args.seed), **loader_options)
    validation_loader = torch.utils.data.DataLoader(validation_set, batch_sampler=validation_sampler,
                                                    collate_fn=MaskingCollator(validation_processor, args.seed),
                                                    **loader_options)
    return train_loader, validation_loader, train_sampler


def build_model(args, tokenizer):
    from ..models import ProtMaskConfig, ProtMaskForMaskedLM

    if args.model_name_or_path:
        model = ProtMaskForMaskedLM.from_pretrained(args.model_name_or_path, dtype=torch.float32)
        model.config.mask_ratio, model.config.mask_ratio_max = args.mask_ratio, args.mask_ratio_max
    else:
        config = ProtMaskConfig(
            vocab_size=tokenizer.vocab_size, hidden_dim=args.hidden_dim, num_encoder_layers=args.num_encoder_layers,
            num_decoder_layers=args.num_decoder_layers, num_neighbors=args.num_neighbors, dropout=args.dropout,
            backbone_noise=args.backbone_noise, label_smoothing=args.label_smoothing, mask_ratio=args.mask_ratio,
            mask_ratio_max=args.mask_ratio_max, pad_token_id=tokenizer.pad_token_id,
            mask_token_id=tokenizer.mask_token_id, decoder_context=args.decoder_context,
        )
        model = ProtMaskForMaskedLM(config)
    if args.objective == "autoregressive" and model.config.decoder_context != "causal":
        raise TrainingError("--objective autoregressive needs a causal decoder: add --decoder_context causal (or "
                            "start from a causal model such as converted ProteinMPNN weights)")
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    return model


def build_optimizer(model, args, learning_rate):
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (no_decay if parameter.ndim < 2 or "norm" in name else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate)


def effective_learning_rate(args, num_processes: int) -> float:
    factor = {"none": 1.0, "linear": float(num_processes), "sqrt": math.sqrt(num_processes)}[args.lr_scaling]
    return args.learning_rate * factor


# ----------------------------------------------------------------------------------------------- logging

class RunLog:
    """metrics.jsonl, trackers and the console, on the main process only."""

    def __init__(self, accelerator, save_dir: Path):
        self.accelerator = accelerator
        self.path = save_dir / "metrics.jsonl"

    def forget_after(self, step: int) -> None:
        """A resumed run replays the steps after its checkpoint: drop their records, so none appears twice."""
        if not self.accelerator.is_main_process or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text("".join(line + "\n" for line in kept))
        os.replace(temporary, self.path)

    def write(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        numbers = {f"{record['split']}/{k}": v for k, v in record.items()
                   if isinstance(v, (int, float)) and k not in ("step", "split")}
        if self.accelerator.trackers:
            self.accelerator.log(numbers, step=record["step"])


def model_card(args, accelerator, metrics: dict, kind: str, with_plot: bool = False) -> str:
    config = {k: v for k, v in vars(args).items() if k not in ("ddp", "master_port")}
    lines = [
        "---", "library_name: transformers", "tags:", "- protmask", "- protein", "- inverse-folding", "---", "",
        f"# protmask model ({kind})", "",
        "A structure-conditioned masked protein language model (`ProtMaskForMaskedLM`). Load it with:", "",
        "```python", "import protmask  # registers the model with the Auto classes",
        "from transformers import AutoModelForMaskedLM, AutoTokenizer",
        "model = AutoModelForMaskedLM.from_pretrained(PATH)", "tokenizer = AutoTokenizer.from_pretrained(PATH)", "```", "",
        f"Trained on {accelerator.num_processes} process(es), device {accelerator.device.type}, "
        f"mixed precision {accelerator.mixed_precision}.", "",
        "## Metrics", "", "| metric | value |", "|---|---|",
    ]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    if with_plot:
        lines += ["", "## Training curves", "", "![training curves](training_curves.png)", "",
                  "Redraw them from the run's metrics.jsonl with `protmask plot --run SAVE_DIR`."]
    lines += ["",
              "## Training configuration", "", "```json", json.dumps(config, indent=1, default=str), "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- evaluation

def evaluate(accelerator, model, loader, label_smoothing: float) -> dict:
    """Validation on fixed masks. Each rank sums over its own batches (padding batches are empty, so no
    example is seen twice) and the sums are reduced once. The unwrapped model runs: no DDP collectives, so
    ranks may hold different numbers of non-empty batches."""
    from ..metrics import MaskedLMStats

    network = accelerator.unwrap_model(model)
    was_training = network.training
    network.eval()
    stats = MaskedLMStats(device=accelerator.device)
    with torch.no_grad():
        for batch in loader:
            if batch is None:
                continue
            with accelerator.autocast():
                logits = network(**{k: v for k, v in batch.items() if k != "labels"}).logits
            stats.update(logits, batch["labels"], batch["chain_index"], label_smoothing)
    network.train(was_training)
    return stats.reduce(accelerator)


def parameters_in_sync(accelerator, model) -> bool:
    """True when every rank holds bit-identical parameters (compares a float64 fingerprint of them)."""
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten() for p in accelerator.unwrap_model(model).parameters()])
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device).remainder(97)
        fingerprint = torch.stack([flat.sum(), (flat * weights).sum(), flat.square().sum()])
    gathered = accelerator.gather(fingerprint[None]).reshape(-1, 3)
    return bool((gathered == gathered[0]).all())


# --------------------------------------------------------------------------------------------- the loop

def train(args) -> dict:
    """Train from parsed arguments; returns the final validation metrics."""
    import datasets
    import transformers
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from ..models import ProtMaskTokenizer, masked_lm_loss

    tune_cpu_allocator()
    transformers.utils.logging.disable_progress_bar()  # one progress bar: ours
    datasets.disable_progress_bars()
    check_arguments(args)
    preemption = PreemptionWatch().install()
    accelerator = build_accelerator(args)
    say = accelerator.print
    legacy_flags(args, say)
    threads = set_cpu_threads(accelerator, args)
    set_seed(args.seed)
    save_dir = Path(args.save_dir)
    if accelerator.is_main_process:
        save_dir.mkdir(parents=True, exist_ok=True)
    resume_path = resolve_resume(args, say)
    if args.resume_from_checkpoint == "latest" and resume_path is None:
        say(f"--resume_from_checkpoint latest: no complete checkpoint in {save_dir} yet; starting from scratch.")

    hub = None
    if args.push_to_hub and accelerator.is_main_process:
        from ..hub import HubTarget

        hub = HubTarget.check(args.hub_model_id, say)  # says at START when the hub cannot be reached

    # Data.
    built = load_data(accelerator, args, say)
    tokenizer = (ProtMaskTokenizer.from_pretrained(args.model_name_or_path) if args.model_name_or_path
                 else ProtMaskTokenizer())
    train_loader, validation_loader, train_sampler = make_loaders(accelerator, args, built.dataset, tokenizer)

    # Model, optimizer, schedule. Accelerate's prepared scheduler steps once per process per optimizer step,
    # so warm-up and total are given in those units to get the curve asked for in optimizer steps.
    model = build_model(args, tokenizer)
    learning_rate = effective_learning_rate(args, accelerator.num_processes)
    optimizer = build_optimizer(model, args, learning_rate)
    batches_per_rank = math.ceil(len(train_sampler) / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_rank / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.epochs * steps_per_epoch
    epochs = math.ceil(max_train_steps / steps_per_epoch)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer,
                              num_warmup_steps=args.warmup_steps * accelerator.num_processes,
                              num_training_steps=max_train_steps * accelerator.num_processes)
    model, optimizer, train_loader, validation_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, validation_loader, scheduler)

    if args.report_to:
        tracker_config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}
        accelerator.init_trackers("protmask", config=tracker_config)  # TensorBoard: <save_dir>/protmask
    per_device = (f"up to {args.max_tokens_per_batch} padded residues" if args.max_tokens_per_batch
                  else f"{args.batch_size} examples")
    global_batch = (f"{args.max_tokens_per_batch * accelerator.num_processes * args.gradient_accumulation_steps} padded residues"
                    if args.max_tokens_per_batch else
                    f"{args.batch_size * accelerator.num_processes * args.gradient_accumulation_steps} examples")
    say("\n".join([
        f"world size: {accelerator.num_processes} process(es) on "
        f"{accelerator.num_processes // int(os.environ.get('LOCAL_WORLD_SIZE', accelerator.num_processes))} machine(s); "
        f"device: {accelerator.device}; mixed precision: {accelerator.mixed_precision}; CPU threads per process: {threads}",
        f"batch per device: {per_device}; global batch: {global_batch} "
        f"(× {accelerator.num_processes} processes × {args.gradient_accumulation_steps} accumulation)",
        f"learning rate: {args.learning_rate:g} × {learning_rate / args.learning_rate:g} ({args.lr_scaling} scaling over "
        f"{accelerator.num_processes} processes) = {learning_rate:g}; schedule {args.lr_scheduler_type}, "
        f"{args.warmup_steps} warm-up steps",
        f"data: {len(built.dataset['train'])} training / {len(built.dataset['validation'])} validation examples from "
        f"{built.path}; {steps_per_epoch} steps per epoch, {max_train_steps} steps in all ({epochs} epochs)",
        f"model: {sum(p.numel() for p in model.parameters()):,} parameters; saving to {save_dir}",
    ]))

    # Resume.
    state = {"global_step": 0, "epoch": 0, "batches_in_epoch": 0, "best_validation_loss": None,
             "skipped_nonfinite_steps": 0}
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        state.update(json.loads((resume_path / TRAINER_STATE).read_text()))
        train_sampler.set_epoch(state["epoch"])  # batch counts vary a little between epochs
        if state["batches_in_epoch"] >= math.ceil(len(train_sampler) / accelerator.num_processes):
            state["epoch"], state["batches_in_epoch"] = state["epoch"] + 1, 0
        say(f"resumed from {resume_path}: step {state['global_step']}, epoch {state['epoch']}, "
            f"batch {state['batches_in_epoch']} of that epoch")
    accelerator.wait_for_everyone()

    log = RunLog(accelerator, save_dir)
    if resume_path is not None:
        log.forget_after(state["global_step"])
    network = accelerator.unwrap_model(model)
    label_smoothing = network.config.label_smoothing
    progress = tqdm(total=max_train_steps, initial=state["global_step"], disable=not accelerator.is_local_main_process,
                    desc="training", dynamic_ncols=True)
    consecutive_nonfinite = 0
    window = {"loss_sum": 0.0, "tokens": 0, "correct": 0, "residues": 0, "seconds": 0.0, "waiting": 0.0, "steps": 0}
    last_validation = {}

    has_validation = len(built.dataset["validation"]) > 0
    validated_at = None

    def validate(epoch):
        nonlocal last_validation, validated_at
        if not has_validation or validated_at == state["global_step"]:
            return last_validation
        validated_at = state["global_step"]
        metrics = evaluate(accelerator, model, validation_loader, label_smoothing)
        record = {"step": state["global_step"], "epoch": epoch, "split": "validation", **metrics}
        log.write(record)
        say(f"validation at step {state['global_step']}: loss {metrics['loss']:.4f}, perplexity "
            f"{metrics['perplexity']:.2f}, accuracy {metrics['accuracy']:.3f}, recovery {metrics['recovery']:.3f} "
            f"({metrics['tokens']} masked residues, {metrics['chains']} chains)")
        if state["best_validation_loss"] is None or metrics["loss"] < state["best_validation_loss"]:
            state["best_validation_loss"] = metrics["loss"]
            save_model(accelerator, model, tokenizer, save_dir / "best", model_card(args, accelerator, record, "best"))
        last_validation = metrics
        return metrics

    finished = state["global_step"] >= max_train_steps
    for epoch in range(state["epoch"], epochs):
        if finished:
            break
        state["epoch"] = epoch
        train_loader.set_epoch(epoch)
        loader = train_loader
        if state["batches_in_epoch"]:
            from accelerate import skip_first_batches

            loader = skip_first_batches(train_loader, state["batches_in_epoch"])
            loader.set_epoch(epoch)
        iterator = iter(loader)
        exhausted = False
        while not exhausted and not finished:
            step_started = time.perf_counter()
            group, waiting = [], 0.0
            for _ in range(args.gradient_accumulation_steps):
                fetch_started = time.perf_counter()
                try:
                    group.append(next(iterator))
                except StopIteration:
                    exhausted = True
                    break
                finally:
                    waiting += time.perf_counter() - fetch_started
            if not group:
                break
            # The loss is the mean over the masked residues of the whole global batch: count them on every
            # rank first, so that neither batch boundaries nor accumulation change what is averaged.
            local_tokens = sum(int((b["labels"] != -100).sum()) for b in group)
            global_tokens = int(accelerator.reduce(torch.tensor(local_tokens, device=accelerator.device), "sum"))
            loss_sum, correct, residues = 0.0, 0, 0
            for index, batch in enumerate(group):
                sync = index == len(group) - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                    summed = masked_lm_loss(logits, batch["labels"], label_smoothing, reduction="sum")
                    # DDP averages gradients over ranks; the factor undoes that to get a global-token mean.
                    accelerator.backward(summed * accelerator.num_processes / max(global_tokens, 1))
                loss_sum += float(summed.detach())
                scored = batch["labels"] != -100
                correct += int((logits.detach().argmax(-1)[scored] == batch["labels"][scored]).sum())
                residues += int(batch["attention_mask"].sum())
            totals = accelerator.reduce(torch.tensor([loss_sum, correct, residues, 0.0 if math.isfinite(loss_sum) else 1.0,
                                                      float(preemption.requested)],
                                                     dtype=torch.float64, device=accelerator.device), "sum")
            if totals[3] > 0:  # non-finite on some rank: every rank skips this step alike
                optimizer.zero_grad(set_to_none=True)
                consecutive_nonfinite += 1
                state["skipped_nonfinite_steps"] += 1
                say(f"step {state['global_step'] + 1}: non-finite loss, step skipped "
                    f"({consecutive_nonfinite} in a row, {state['skipped_nonfinite_steps']} in all)")
                if consecutive_nonfinite >= args.max_nonfinite_steps:
                    raise TrainingError(
                        f"{consecutive_nonfinite} consecutive steps had a non-finite loss; stopping. Lower "
                        "--learning_rate, keep --max_grad_norm on, or try --mixed_precision bf16/no instead of fp16.")
            else:
                consecutive_nonfinite = 0
                if args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state["global_step"] += 1
            state["batches_in_epoch"] += len(group)
            progress.update(1)

            seconds = time.perf_counter() - step_started
            window["loss_sum"] += float(totals[0]) if totals[3] == 0 else 0.0
            window["tokens"] += global_tokens if totals[3] == 0 else 0
            window["correct"] += int(totals[1])
            window["residues"] += int(totals[2])
            window["seconds"] += seconds
            window["waiting"] += waiting
            window["steps"] += 1
            if state["global_step"] % args.logging_steps == 0 or state["global_step"] == max_train_steps:
                loss = window["loss_sum"] / max(window["tokens"], 1)
                record = {
                    "step": state["global_step"], "epoch": epoch, "split": "train", "loss": loss,
                    "perplexity": math.exp(min(loss, 50.0)), "accuracy": window["correct"] / max(window["tokens"], 1),
                    "learning_rate": scheduler.get_last_lr()[0],
                    "residues": window["residues"], "seconds": window["seconds"],
                    "residues_per_s": window["residues"] / max(window["seconds"], 1e-9),
                    "data_wait_fraction": window["waiting"] / max(window["seconds"], 1e-9),
                    "skipped_nonfinite_steps": state["skipped_nonfinite_steps"],
                }
                log.write(record)
                progress.set_postfix(loss=f"{loss:.3f}", lr=f"{record['learning_rate']:.2e}",
                                     res_per_s=f"{record['residues_per_s']:.0f}")
                window = dict.fromkeys(window, 0) | {"loss_sum": 0.0, "seconds": 0.0, "waiting": 0.0}

            finished = state["global_step"] >= max_train_steps
            if totals[4] > 0 and not finished:  # some rank was signalled: all stop after this same step
                path = save_checkpoint(accelerator, args, dict(state))
                say(f"preempted: checkpoint of step {state['global_step']} in {path}; continue the run with "
                    f"--resume_from_checkpoint latest (exit status {PREEMPTED_EXIT_CODE})")
                accelerator.end_training()
                if accelerator.num_processes > 1:
                    exit_process(PREEMPTED_EXIT_CODE)
                preemption.uninstall()
                raise Preempted(str(path))
            if args.eval_steps and state["global_step"] % args.eval_steps == 0:
                validate(epoch)
            if isinstance(args.checkpointing_steps, int) and state["global_step"] % args.checkpointing_steps == 0 \
                    and not finished:
                save_checkpoint(accelerator, args, dict(state))
        if exhausted:  # a whole epoch: validate, and checkpoint when asked per epoch
            state["epoch"], state["batches_in_epoch"] = epoch + 1, 0
            validate(epoch)
            if args.checkpointing_steps == "epoch" and not finished:
                save_checkpoint(accelerator, args, dict(state))
    progress.close()

    # The end: a resumable checkpoint (a later run may continue with a larger --max_train_steps), the model.
    validate(state["epoch"])
    save_checkpoint(accelerator, args, dict(state))
    final_metrics = {"global_step": state["global_step"], "ranks": accelerator.num_processes,
                     "ranks_in_sync": parameters_in_sync(accelerator, model),
                     "skipped_nonfinite_steps": state["skipped_nonfinite_steps"],
                     **{f"validation_{k}": v for k, v in last_validation.items()}}
    plots = []
    if accelerator.is_main_process:
        try:
            from ..plotting import plot_run

            plots.append(plot_run(save_dir))
        except ImportError:
            say("matplotlib is not installed: no training_curves.png (pip install 'protmask[plot]')")
    save_model(accelerator, model, tokenizer, save_dir / "final",
               model_card(args, accelerator, final_metrics, "final", with_plot=bool(plots)), plots)
    if accelerator.is_main_process:
        write_json_atomically(save_dir / "final_metrics.json", final_metrics)
        if hub is not None:
            hub.push(save_dir / "final", say)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    say(f"done: {state['global_step']} steps; model in {save_dir / 'final'}"
        + (f", best validation loss {state['best_validation_loss']:.4f} in {save_dir / 'best'}"
           if state["best_validation_loss"] is not None else ""))
    if accelerator.num_processes > 1:
        # Everything is saved and every rank passed the last barrier. Tearing down DDP and gloo objects when
        # this frame unwinds has deadlocked a rank now and then (a native mutex, seen once in ~30 2-rank runs),
        # leaving the launcher waiting; exit as torchrun expects instead: flushed, status 0.
        exit_process(0)
    preemption.uninstall()
    return final_metrics


def main(argv=None) -> int:
    from .arguments import build_parser

    args = build_parser().parse_args(argv)
    try:
        train(args)
    except TrainingError as error:
        print(f"train_accelerate.py: error: {error}", file=sys.stderr)
        return 2
    except Preempted:
        return PREEMPTED_EXIT_CODE
    return 0
