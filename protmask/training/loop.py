"""The Accelerate training loop: build the accelerator, the data and the model, `prepare` them, train,
validate, checkpoint, resume and log. One function, `train`, reads top to bottom; checks, checkpoints and
reporting live in their own modules beside this one."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..runtime import tune_cpu_allocator
from .checkpointing import (TRAINER_STATE, claim_save_dir, list_checkpoints, run_definition,  # noqa: F401 (API)
                            save_checkpoint, save_model, write_json_atomically)
from .checks import check_arguments, check_launch, legacy_flags
from .errors import TrainingError
from .preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionWatch, exit_process
from .reporting import RunLog, describe_run, model_card


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
        # Training collectives: a stalled rank ends the job after this many seconds (the dataset build waits
        # in a group of its own, see load_data).
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
    """The main process parses (or finds the cache) while the others wait in a group of their own whose timeout
    is --dataset_build_timeout, so that training collectives can keep a short --process_group_timeout."""
    from ..data.build import DatasetBuildError, build_dataset
    from .arguments import build_options

    def build(force):
        return build_dataset(args.pdb_path, args.cache_dir, build_options(args), num_proc=args.num_proc, force=force,
                             log=say if accelerator.is_main_process else (lambda *a: None))

    outcome = [None]
    if accelerator.is_main_process:
        try:
            result = build(force=args.rebuild_dataset)
            outcome[0] = "ok"
        except DatasetBuildError as error:
            outcome[0] = str(error)
    if accelerator.num_processes > 1:
        torch.distributed.broadcast_object_list(outcome, src=0, group=long_wait_group(args))
    if outcome[0] != "ok":
        raise TrainingError(outcome[0])
    if not accelerator.is_main_process:
        try:
            result = build(force=False)  # the main process's build (or this machine's own copy of it)
        except DatasetBuildError as error:
            raise TrainingError(str(error)) from None
    return result


_LONG_WAIT_GROUP = None


def long_wait_group(args):
    """A gloo group for waits that may rightly take hours (a first dataset build), created once on every rank."""
    global _LONG_WAIT_GROUP
    if _LONG_WAIT_GROUP is None:
        _LONG_WAIT_GROUP = torch.distributed.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=args.dataset_build_timeout))
    return _LONG_WAIT_GROUP


def agreed(accelerator, decide):
    """Run ``decide`` on the main process and give every rank its result, or raise its TrainingError on every
    rank (a rank that stopped alone would leave the others waiting in their next collective)."""
    outcome = [None]
    if accelerator.is_main_process:
        try:
            outcome[0] = ("ok", decide())
        except TrainingError as error:
            outcome[0] = ("error", str(error))
    if accelerator.num_processes > 1:
        torch.distributed.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise TrainingError(value)
    return value


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
        train_lengths, shuffle=True, seed=args.seed, num_replicas=accelerator.num_processes,
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


# --------------------------------------------------------------------------------------------- schedule

def effective_learning_rate(args, num_processes: int) -> float:
    factor = {"none": 1.0, "linear": float(num_processes), "sqrt": math.sqrt(num_processes)}[args.lr_scaling]
    return args.learning_rate * factor


def plan_steps(args, train_sampler, state: dict, num_processes: int) -> tuple[int, int]:
    """(steps per epoch, steps in all), in optimizer steps. A run continued on another number of processes
    counts its remaining steps at the new number, so the schedule ends where the data does."""
    per_step = num_processes * args.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(train_sampler.plan(0, per_step)) / per_step)
    if args.max_train_steps:
        return steps_per_epoch, args.max_train_steps
    if state["global_step"] == 0 or state.get("world_size", num_processes) == num_processes:
        return steps_per_epoch, args.epochs * steps_per_epoch
    remaining = len(train_sampler.plan(state["epoch"], state["epoch_group_size"])) - state["epoch_offset"]
    return steps_per_epoch, (state["global_step"] + math.ceil(max(remaining, 0) / per_step)
                             + max(args.epochs - state["epoch"] - 1, 0) * steps_per_epoch)


def carry_schedule_over(scheduler, optimizer, global_step: int, num_processes: int, learning_rate: float) -> None:
    """After loading a checkpoint written by another number of processes: the scheduler counted steps × the old
    number (Accelerate steps it once per process) from the old scaled rate. Put it at this run's position and
    rate. transformers' schedulers are all LambdaLR."""
    inner = scheduler.scheduler
    inner.base_lrs = [learning_rate for _ in inner.base_lrs]
    inner.last_epoch = global_step * num_processes
    rates = [base * rule(inner.last_epoch) for base, rule in zip(inner.base_lrs, inner.lr_lambdas)]
    for group, rate in zip(optimizer.param_groups, rates):
        group["initial_lr"], group["lr"] = learning_rate, rate
    inner._last_lr = rates


def initial_state(resume_path, run: dict, num_processes: int, group_size: int) -> dict:
    """The trainer state a run starts from: fresh, or the checkpoint's (older checkpoints counted batches per
    rank; the offset into the epoch is now counted in the epoch's global batches)."""
    state = {"global_step": 0, "epoch": 0, "epoch_offset": 0, "epoch_group_size": group_size,
             "best_validation_loss": None, "skipped_nonfinite_steps": 0}
    if resume_path is not None:
        saved = json.loads((resume_path / TRAINER_STATE).read_text())
        if "epoch_offset" not in saved:
            saved["epoch_offset"] = saved.pop("batches_in_epoch", 0) * num_processes
            saved["epoch_group_size"] = group_size
        state.update(saved)
    state.update(run_id=run["run_id"], definition=run["definition"])
    state.setdefault("world_size", num_processes)
    return state


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

    from ..data.build import DatasetBuildError, dataset_fingerprint
    from ..models import ProtMaskTokenizer, masked_lm_loss
    from .arguments import build_options

    tune_cpu_allocator()
    transformers.utils.logging.disable_progress_bar()  # one progress bar: ours
    datasets.disable_progress_bars()
    check_arguments(args)
    preemption = PreemptionWatch().install()
    accelerator = build_accelerator(args)
    say = accelerator.print
    legacy_flags(args, say)
    check_launch(accelerator.num_processes)
    threads = set_cpu_threads(accelerator, args)
    set_seed(args.seed)
    save_dir = Path(args.save_dir)

    # What defines this run, checked against --save_dir and the checkpoint before any long work.
    tokenizer = (ProtMaskTokenizer.from_pretrained(args.model_name_or_path) if args.model_name_or_path
                 else ProtMaskTokenizer())
    model = build_model(args, tokenizer)
    try:
        fingerprint = dataset_fingerprint(args.pdb_path, build_options(args))
    except DatasetBuildError as error:
        raise TrainingError(str(error)) from None
    definition = run_definition(args, accelerator.num_processes, fingerprint, model.config)
    resume_path, run = agreed(accelerator, lambda: claim_save_dir(args, definition, say))
    if args.resume_from_checkpoint == "latest" and resume_path is None:
        say(f"--resume_from_checkpoint latest: no complete checkpoint of this run in {save_dir} yet; starting from scratch.")
    if accelerator.is_main_process:
        write_json_atomically(save_dir / "run.json", run)

    hub = None
    if args.push_to_hub and accelerator.is_main_process:
        from ..hub import HubTarget

        hub = HubTarget.check(args.hub_model_id, say)  # says at START when the hub cannot be reached

    # Data, and where in it this run starts.
    built = load_data(accelerator, args, say)
    train_loader, validation_loader, train_sampler = make_loaders(accelerator, args, built.dataset, tokenizer)
    group_size = accelerator.num_processes * args.gradient_accumulation_steps
    state = initial_state(resume_path, run, accelerator.num_processes, group_size)
    if state["epoch_offset"] >= len(train_sampler.plan(state["epoch"], state["epoch_group_size"])):
        state.update(epoch=state["epoch"] + 1, epoch_offset=0, epoch_group_size=group_size)

    # Optimizer and schedule. Accelerate's prepared scheduler steps once per process per optimizer step, so
    # warm-up and total are given in those units to get the curve asked for in optimizer steps.
    learning_rate = effective_learning_rate(args, accelerator.num_processes)
    optimizer = build_optimizer(model, args, learning_rate)
    steps_per_epoch, max_train_steps = plan_steps(args, train_sampler, state, accelerator.num_processes)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer,
                              num_warmup_steps=args.warmup_steps * accelerator.num_processes,
                              num_training_steps=max_train_steps * accelerator.num_processes)
    model, optimizer, train_loader, validation_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, validation_loader, scheduler)

    if args.report_to:
        tracker_config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}
        accelerator.init_trackers("protmask", config=tracker_config)  # TensorBoard: <save_dir>/protmask
    say(describe_run(accelerator, args, built, threads, learning_rate, steps_per_epoch, max_train_steps, model))

    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        if state["world_size"] != accelerator.num_processes:
            carry_schedule_over(scheduler, optimizer, state["global_step"], accelerator.num_processes, learning_rate)
            # Per-rank random states cannot be mapped onto another number of ranks: seed them afresh.
            set_seed(args.seed + state["global_step"], device_specific=True)
            say(f"--allow_world_size_change: continuing a {state['world_size']}-process run on "
                f"{accelerator.num_processes}; learning rate now {scheduler.get_last_lr()[0]:.3g}, random state "
                "re-seeded (the result will differ from a run that kept its processes)")
        state["world_size"] = accelerator.num_processes
        say(f"resumed from {resume_path}: step {state['global_step']}, epoch {state['epoch']}, "
            f"batch {state['epoch_offset']} of that epoch")
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

    with progress:  # closed before an error is printed, so the message gets a line of its own
        finished = state["global_step"] >= max_train_steps
        epoch = state["epoch"]
        while not finished and (args.max_train_steps or epoch < args.epochs):
            state["epoch"] = epoch
            if state["epoch_offset"] == 0:
                state["epoch_group_size"] = group_size
            train_sampler.resume_epoch(epoch, state["epoch_offset"], state["epoch_group_size"])
            train_loader.set_epoch(epoch)
            iterator = iter(train_loader)
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
                state["epoch_offset"] += len(group) * accelerator.num_processes
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
                state["epoch"], state["epoch_offset"] = epoch + 1, 0
                validate(epoch)
                if args.checkpointing_steps == "epoch" and not finished:
                    save_checkpoint(accelerator, args, dict(state))
            epoch += 1

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
    accelerator.wait_for_everyone()
    accelerator.end_training()
    say(f"done: {state['global_step']} steps; model in {save_dir / 'final'}"
        + (f", best validation loss {state['best_validation_loss']:.4f} in {save_dir / 'best'}"
           if state["best_validation_loss"] is not None else ""))
    if hub is not None:  # after the last collective: an upload may take longer than --process_group_timeout
        hub.push(save_dir / "final", say)
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
    except RuntimeError as error:  # gloo raises a plain RuntimeError, NCCL a DistBackendError (a subclass)
        if "timed out" not in str(error).lower():
            raise
        print(f"train_accelerate.py: error: another process stopped answering for --process_group_timeout "
              f"{args.process_group_timeout} s ({str(error).splitlines()[0][:200]}); the job stops. See "
              "'A rank hangs' in the README's troubleshooting.", file=sys.stderr)
        return 1
    return 0
