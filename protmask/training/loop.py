"""The Accelerate training loop: build the accelerator, the data and the model, `prepare` them, train,
validate, checkpoint, resume and log. One function, `train`, reads top to bottom; checks, checkpoints and
reporting live in their own modules beside this one."""

from __future__ import annotations

import atexit
import datetime
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..runtime import ignore_stop_signals, stop_workers, tune_cpu_allocator, usable_cpus
from .arguments import MODEL_DEFAULTS
from .checkpointing import (TRAINER_STATE, claim_save_dir, list_checkpoints, run_definition,  # noqa: F401 (API)
                            save_checkpoint, save_model, write_json_atomically)
from .checks import check_arguments, check_launch, legacy_flags
from .dataset import load_data, sampling_keys, sampling_mode
from .errors import TrainingError
from .preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionWatch, exit_process
from .reporting import RunLog, TrainingWindow, describe_run, model_card
from .schedule import (build_scheduler, carry_schedule_over, effective_learning_rate, plan_steps,  # noqa: F401
                       warmup_steps)
from .slurm import adopt_slurm_ranks
from .stall import watch_for_stalls
from .step import OptimizerStep


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
        # non_blocking: host-to-device copies from pinned memory overlap with compute.
        dataloader_config=DataLoaderConfiguration(even_batches=True, non_blocking=torch.cuda.is_available()),
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
        threads = max(1, usable_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    return threads


def prepare_process(accelerator, args) -> int:
    """Per-process settings before any tensor is made; returns the CPU threads per process."""
    from accelerate.utils import set_seed

    legacy_flags(args, accelerator.print)
    check_launch(accelerator.num_processes)
    if accelerator.device.type == "cpu":
        tune_cpu_allocator()  # a CPU-only gain (see runtime.py); GPU jobs keep glibc's defaults
    elif accelerator.device.type == "cuda" and torch.cuda.get_device_capability(accelerator.device)[0] >= 8:
        # TF32 matmuls on Ampere and later: the fp32 path's tensor cores, ~1e-3 relative error.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # seed + rank: each rank draws its own dropout and backbone noise. Masks do not use these generators
    # (they are a function of seed, epoch and example), and DDP gives every rank rank 0's initial weights.
    set_seed(args.seed, device_specific=True)
    return set_cpu_threads(accelerator, args)


def claim_run(accelerator, args, model):
    """Define the run and check it against --save_dir and the checkpoint, before any long work. The main
    process walks the inputs for the fingerprint and returns that listing for its build (None elsewhere)."""
    from ..data.build import DatasetBuildError, dataset_fingerprint, is_built_dataset, list_inputs
    from ..data.arguments import build_options

    listing = None

    def decide():
        nonlocal listing
        try:
            if not is_built_dataset(args.pdb_path):
                listing = list_inputs(args.pdb_path)
            fingerprint = dataset_fingerprint(args.pdb_path, build_options(args), listing)
        except DatasetBuildError as error:
            raise TrainingError(str(error)) from None
        definition = run_definition(args, accelerator.num_processes, fingerprint, model.config)
        return claim_save_dir(args, definition, accelerator.print)

    resume_path, run = agreed(accelerator, decide)
    if args.resume_from_checkpoint == "latest" and resume_path is None:
        accelerator.print(f"--resume_from_checkpoint latest: no complete checkpoint of this run in {args.save_dir} "
                          "yet; starting from scratch.")
    if accelerator.is_main_process:
        write_json_atomically(Path(args.save_dir) / "run.json", run)
    return resume_path, run, listing


def check_hub(accelerator, args):
    if not (args.push_to_hub and accelerator.is_main_process):
        return None
    from ..hub import HubTarget

    return HubTarget.check(args.hub_model_id, accelerator.print)  # says at START when the hub cannot be reached


def start_trackers(accelerator, args) -> None:
    if args.report_to:
        config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}
        accelerator.init_trackers("protmask", config=config)  # TensorBoard: <save_dir>/protmask


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


def make_loaders(accelerator, args, dataset, tokenizer, with_context: bool = False):
    """Train and validation loaders; ``with_context`` (a model with atomic context) reads each entry's
    non-protein atoms too, which crops keep within reach of the kept residues."""
    from ..data.collator import MaskingCollator, ProtMaskProcessor, StructureDataset
    from ..data.sampler import LengthBucketBatchSampler, padded, sampling_clusters

    train_set = StructureDataset(dataset["train"], with_atoms=with_context)
    validation_set = StructureDataset(dataset["validation"], with_atoms=with_context)
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
                                  max_length=args.max_length, objective=args.objective,
                                  shuffle_chains=args.shuffle_chains, backbone=args.backbone,
                                  with_context=with_context)
    # Validation masks at the fixed ratio, whatever range training draws from, so numbers stay comparable.
    validation_processor = ProtMaskProcessor(tokenizer, mask_ratio=args.mask_ratio, max_length=args.max_length,
                                             objective=args.objective, backbone=args.backbone,
                                             with_context=with_context)
    # --sampling cluster: one draw per cluster and epoch, still token-budgeted and length-grouped.
    clusters = (sampling_clusters(sampling_keys(dataset["train"])) if sampling_mode(args, dataset["train"]) == "cluster"
                else None)
    train_sampler = LengthBucketBatchSampler(
        train_lengths, shuffle=True, seed=args.seed, num_replicas=accelerator.num_processes,
        group_size=accelerator.num_processes * args.gradient_accumulation_steps, clusters=clusters, **budget)
    validation_lengths = np.minimum(validation_set.lengths, cap) if len(validation_set) else []
    validation_budget = dict(budget)
    if args.max_tokens_per_batch is not None and len(validation_set):
        validation_budget["max_tokens"] = max(args.max_tokens_per_batch, padded(int(max(validation_lengths)), 8))
    validation_sampler = LengthBucketBatchSampler(validation_lengths, shuffle=False, seed=args.seed,
                                                  num_replicas=accelerator.num_processes, **validation_budget)
    loader_options = dict(num_workers=args.num_workers, pin_memory=torch.cuda.is_available(),
                          worker_init_fn=ignore_stop_signals,  # a signal to the process group is the rank's
                          persistent_workers=args.num_workers > 0,  # not re-forked every epoch and validation
                          # A private generator: creating loader iterators must not draw from the global RNG,
                          # or a resumed run's dropout would differ from an uninterrupted one.
                          generator=torch.Generator().manual_seed(args.seed))
    train_loader = torch.utils.data.DataLoader(train_set, batch_sampler=train_sampler,
                                               collate_fn=MaskingCollator(processor, args.seed), **loader_options)
    validation_loader = torch.utils.data.DataLoader(validation_set, batch_sampler=validation_sampler,
                                                    collate_fn=MaskingCollator(validation_processor, args.seed),
                                                    **loader_options)
    return train_loader, validation_loader, train_sampler


def stop_loader_workers(*loaders) -> None:
    """At exit: shut the persistent loader workers down (they ignore SIGTERM, see `ignore_stop_signals`)
    before multiprocessing's own exit handler would wait on them."""
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)
        if iterator is None:
            continue
        iterator._shutdown_workers()  # asks each worker to stop, as deleting the iterator does
        stop_workers(getattr(iterator, "_workers", []))
        loader._iterator = None


def build_model(args):
    """(tokenizer, model): a new model from the architecture flags, or a saved folder to fine-tune."""
    from ..models import ProtMaskConfig, ProtMaskForMaskedLM, ProtMaskTokenizer

    tokenizer = (ProtMaskTokenizer.from_pretrained(args.model_name_or_path) if args.model_name_or_path
                 else ProtMaskTokenizer())
    if args.model_name_or_path:
        model = ProtMaskForMaskedLM.from_pretrained(args.model_name_or_path, dtype=torch.float32)
        model.config.mask_ratio, model.config.mask_ratio_max = args.mask_ratio, args.mask_ratio_max
        apply_training_flags(model, args)
    else:
        config = ProtMaskConfig(
            vocab_size=tokenizer.vocab_size, hidden_dim=args.hidden_dim, num_encoder_layers=args.num_encoder_layers,
            num_decoder_layers=args.num_decoder_layers, num_neighbors=args.num_neighbors,
            **{flag: default if getattr(args, flag) is None else getattr(args, flag)
               for flag, default in MODEL_DEFAULTS.items()}, mask_ratio=args.mask_ratio,
            mask_ratio_max=args.mask_ratio_max, pad_token_id=tokenizer.pad_token_id,
            mask_token_id=tokenizer.mask_token_id, decoder_context=args.decoder_context,
            message_bias_per_neighbor=args.message_bias_per_neighbor, backbone=args.backbone,
            context_atoms=args.context_atoms,
        )
        model = ProtMaskForMaskedLM(config)
    if model.config.backbone != args.backbone:
        raise TrainingError(f"--model_name_or_path {args.model_name_or_path} reads {model.config.backbone!r} "
                            f"backbones; train it on such data with --backbone {model.config.backbone}")
    if args.objective == "autoregressive" and model.config.decoder_context != "causal":
        raise TrainingError("--objective autoregressive needs a causal decoder: add --decoder_context causal (or "
                            "start from a causal model such as converted ProteinMPNN weights)")
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    return tokenizer, model


def apply_training_flags(model, args) -> None:
    """--dropout, --backbone_noise and --label_smoothing given with --model_name_or_path change the loaded
    model (its config, saved with it, and its modules); flags not given keep the saved model's values."""
    from ..models.modeling_protmask import Dropout

    for flag in MODEL_DEFAULTS:
        value = getattr(args, flag)
        if value is None:
            continue
        setattr(model.config, flag, value)
        if flag == "dropout":
            for module in model.modules():
                if isinstance(module, Dropout):
                    module.p = value
        elif flag == "backbone_noise":
            for module in model.modules():
                if hasattr(module, "backbone_noise"):
                    module.backbone_noise = value


def build_optimizer(model, args, learning_rate, device):
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (no_decay if parameter.ndim < 2 or "norm" in name else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused AdamW: one kernel for all parameters on CUDA; elsewhere PyTorch's default (foreach) path. With
    # weight decay 0 it is Adam (ProteinMPNN's optimiser).
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                             fused=device.type == "cuda" or None)


# --------------------------------------------------------------------------------------------- resume

def restore(accelerator, args, resume_path, state: dict, scheduler, optimizer, learning_rate: float) -> None:
    """Load the checkpoint; on another number of processes, carry the schedule over and seed afresh."""
    from accelerate.utils import set_seed

    accelerator.load_state(str(resume_path))
    if state["world_size"] != accelerator.num_processes:
        carry_schedule_over(scheduler, optimizer, state["global_step"], accelerator.num_processes, learning_rate)
        # Per-rank random states cannot be mapped onto another number of ranks: seed them afresh.
        set_seed(args.seed + state["global_step"], device_specific=True)
        accelerator.print(
            f"--allow_world_size_change: continuing a {state['world_size']}-process run on {accelerator.num_processes}; "
            f"learning rate now {scheduler.get_last_lr()[0]:.3g}, random state re-seeded (the result will differ "
            "from a run that kept its processes)")
    state["world_size"] = accelerator.num_processes
    accelerator.print(f"resumed from {resume_path}: step {state['global_step']}, epoch {state['epoch']}, "
                      f"batch {state['epoch_offset']} of that epoch")
    accelerator.wait_for_everyone()


def initial_state(resume_path, run: dict, train_sampler, num_processes: int, accumulation: int) -> dict:
    """The trainer state a run starts from: fresh, or the checkpoint's (older checkpoints counted batches per
    rank; the offset into the epoch is now counted in the epoch's global batches)."""
    group_size = num_processes * accumulation
    state = {"global_step": 0, "epoch": 0, "epoch_offset": 0, "epoch_group_size": group_size,
             "best_validation_loss": None, "skipped_nonfinite_steps": 0, "skipped_overflow_steps": 0}
    if resume_path is not None:
        saved = json.loads((resume_path / TRAINER_STATE).read_text())
        if "epoch_offset" not in saved:
            saved["epoch_offset"] = saved.pop("batches_in_epoch", 0) * num_processes
            saved["epoch_group_size"] = group_size
        state.update(saved)
    state.update(run_id=run["run_id"], definition=run["definition"])
    state.setdefault("world_size", num_processes)
    if state["epoch_offset"] >= len(train_sampler.plan(state["epoch"], state["epoch_group_size"])):
        state.update(epoch=state["epoch"] + 1, epoch_offset=0, epoch_group_size=group_size)  # saved at its end
    return state


# --------------------------------------------------------------------------------------------- evaluation

def evaluate(accelerator, model, loader, beat=lambda where: None) -> dict:
    """Validation on fixed masks. Each rank sums over its own batches (padding batches are empty, so no
    example is seen twice) and the sums are reduced once. The unwrapped model runs: no DDP collectives, so
    ranks may hold different numbers of non-empty batches."""
    from ..metrics import MaskedLMStats, SiteStats

    network = accelerator.unwrap_model(model)
    was_training = network.training
    network.eval()
    stats = MaskedLMStats(device=accelerator.device)
    # A model with atomic context: accuracy at binding sites too (the batches carry the atoms).
    sites = SiteStats(device=accelerator.device) if network.config.context_atoms else None
    with torch.no_grad():
        for number, batch in enumerate(loader):
            beat(f"validation batch {number}")
            if batch is None:
                continue
            with accelerator.autocast():
                logits = network(**{k: v for k, v in batch.items() if k != "labels"}).logits
            stats.update(logits, batch["labels"], batch["chain_index"])
            if sites is not None:
                sites.update(logits, batch)
    network.train(was_training)
    return {**stats.reduce(accelerator), **(sites.reduce(accelerator) if sites is not None else {})}


def parameters_in_sync(accelerator, model) -> bool:
    """True when every rank holds bit-identical parameters (compares a float64 fingerprint of them)."""
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten() for p in accelerator.unwrap_model(model).parameters()])
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device).remainder(97)
        fingerprint = torch.stack([flat.sum(), (flat * weights).sum(), flat.square().sum()])
    gathered = accelerator.gather(fingerprint[None]).reshape(-1, 3)
    return bool((gathered == gathered[0]).all())


# --------------------------------------------------------------------------------------------- the loop

def micro_batch_groups(loader, accumulation: int):
    """(the micro-batches of one optimizer step, seconds spent waiting for them), until the loader is done."""
    iterator = iter(loader)
    while True:
        group, started = [], time.perf_counter()
        for batch in itertools.islice(iterator, accumulation):
            group.append(batch)
        if not group:
            return
        yield group, time.perf_counter() - started


class Validation:
    """Validation at a step (once per step at most): log it, keep the best model, remember the numbers."""

    def __init__(self, accelerator, args, model, loader, tokenizer, log, has_examples: bool, beat):
        self.accelerator, self.args, self.model, self.loader = accelerator, args, model, loader
        self.tokenizer, self.log, self.has_examples, self.beat = tokenizer, log, has_examples, beat
        self.last, self.done_at = {}, None

    def __call__(self, state: dict, epoch: int) -> dict:
        if not self.has_examples or self.done_at == state["global_step"]:
            return self.last
        self.done_at = state["global_step"]
        # Plain cross-entropy, as `protmask evaluate` reports.
        metrics = evaluate(self.accelerator, self.model, self.loader, self.beat)
        record = {"step": state["global_step"], "epoch": epoch, "split": "validation", **metrics}
        self.log.write(record)
        self.accelerator.print(
            f"validation at step {state['global_step']}: loss {metrics['loss']:.4f}, perplexity "
            f"{metrics['perplexity']:.2f}, accuracy {metrics['accuracy']:.3f}, recovery {metrics['recovery']:.3f} "
            f"({metrics['tokens']} masked residues, {metrics['chains']} chains)")
        if state["best_validation_loss"] is None or metrics["loss"] < state["best_validation_loss"]:
            state["best_validation_loss"] = metrics["loss"]
            save_model(self.accelerator, self.model, self.tokenizer, Path(self.args.save_dir) / "best",
                       model_card(self.args, self.accelerator, record, "best"))
        self.last = metrics
        return metrics


def preempt(accelerator, args, state: dict, preemption) -> None:
    """Some rank was signalled: every rank checkpoints this same step and stops, status 75."""
    path = save_checkpoint(accelerator, args, dict(state))
    accelerator.print(f"preempted: checkpoint of step {state['global_step']} in {path}; continue the run with "
                      f"--resume_from_checkpoint latest (exit status {PREEMPTED_EXIT_CODE})")
    accelerator.end_training()
    if accelerator.num_processes > 1:
        exit_process(PREEMPTED_EXIT_CODE)
    preemption.uninstall()
    raise Preempted(str(path))


def train(args) -> dict:
    """Train from parsed arguments; returns the final validation metrics."""
    from tqdm.auto import tqdm

    check_arguments(args)
    preemption = PreemptionWatch().install()
    from_slurm = adopt_slurm_ranks()  # before the accelerator reads the rendezvous variables
    accelerator = build_accelerator(args)
    say = accelerator.print
    for line in getattr(args, "recipe_lines", []):
        say(line)
    if from_slurm:
        say(from_slurm)
    threads = prepare_process(accelerator, args)
    tokenizer, model = build_model(args)
    resume_path, run, listing = claim_run(accelerator, args, model)
    hub = check_hub(accelerator, args)

    built = load_data(accelerator, args, say, listing)
    train_loader, validation_loader, train_sampler = make_loaders(accelerator, args, built.dataset, tokenizer,
                                                                 with_context=model.config.context_atoms > 0)
    state = initial_state(resume_path, run, train_sampler, accelerator.num_processes, args.gradient_accumulation_steps)
    learning_rate = effective_learning_rate(args, accelerator.num_processes)
    optimizer = build_optimizer(model, args, learning_rate, accelerator.device)
    steps_per_epoch, max_train_steps = plan_steps(args, train_sampler, state, accelerator.num_processes)
    scheduler = build_scheduler(args, optimizer, max_train_steps, accelerator.num_processes, state)
    model, optimizer, train_loader, validation_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, validation_loader, scheduler)
    if args.num_workers:
        atexit.register(stop_loader_workers, train_loader, validation_loader)  # runs before torch's own exit flag
    if args.torch_compile:
        # After prepare and in place: compiling the DDP wrapper lets dynamo split the graph at DDP's gradient
        # buckets, so the all-reduce overlaps the backward; in place, state dicts keep their plain keys, so
        # checkpoints, best/ and final/ load with or without --torch_compile.
        model.compile()
    start_trackers(accelerator, args)
    say(describe_run(accelerator, args, built, threads, learning_rate, steps_per_epoch, max_train_steps, model,
                     state["warmup_steps"], train_sampler))
    if resume_path is not None:
        restore(accelerator, args, resume_path, state, scheduler, optimizer, learning_rate)

    # A fresh start forgets every record (a run that died before its first checkpoint left some), a resumed
    # one those after its checkpoint.
    log = RunLog(accelerator, Path(args.save_dir), forget_after=state["global_step"])
    step = OptimizerStep(accelerator, model, optimizer, scheduler, accelerator.unwrap_model(model).config.label_smoothing,
                         args.max_grad_norm)
    # Multi-process runs: a rank left waiting in a collective says so before NCCL's watchdog ends it.
    stall_watch = watch_for_stalls(accelerator, args.process_group_timeout)
    beat = stall_watch.beat if stall_watch else (lambda where: None)
    validate = Validation(accelerator, args, model, validation_loader, tokenizer, log,
                          has_examples=len(built.dataset["validation"]) > 0, beat=beat)
    window = TrainingWindow()
    finished = state["global_step"] >= max_train_steps
    with tqdm(total=max_train_steps, initial=state["global_step"], disable=not accelerator.is_local_main_process,
              desc="training", dynamic_ncols=True) as progress:
        while not finished and (args.max_train_steps or state["epoch"] < args.epochs):
            epoch = state["epoch"]
            start_epoch(train_loader, train_sampler, state, accelerator.num_processes * args.gradient_accumulation_steps)
            for group, waiting in micro_batch_groups(train_loader, args.gradient_accumulation_steps):
                started = time.perf_counter()
                numbers = step(group, lambda: preemption.requested)
                state["global_step"] += 1
                state["epoch_offset"] += len(group) * accelerator.num_processes
                beat(f"step {state['global_step']}")
                count_nonfinite(state, numbers, args, say)
                window.add(numbers, time.perf_counter() - started + waiting, waiting)
                progress.update(1)
                finished = state["global_step"] >= max_train_steps
                if state["global_step"] % args.logging_steps == 0 or finished:
                    record = window.record(state["global_step"], epoch, numbers.learning_rate, state)
                    log.write(record)
                    progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['learning_rate']:.2e}",
                                         res_per_s=f"{record['residues_per_s']:.0f}")
                if numbers.preempted and not finished:
                    preempt(accelerator, args, state, preemption)
                if args.eval_steps and state["global_step"] % args.eval_steps == 0:
                    validate(state, epoch)
                if checkpoint_due(args, state) and not finished:
                    save_checkpoint(accelerator, args, dict(state))
                if finished:
                    break
            else:  # the whole epoch: validate, and checkpoint when asked per epoch
                state.update(epoch=epoch + 1, epoch_offset=0)
                validate(state, epoch)
                if args.checkpointing_steps == "epoch" and not finished:
                    save_checkpoint(accelerator, args, dict(state))

    validate(state, state["epoch"])
    beat("the end of training")
    final_metrics = finish(accelerator, args, model, tokenizer, state, validate.last)
    if stall_watch:
        stall_watch.close()
    if hub is not None:  # after the last collective: an upload may take longer than --process_group_timeout
        hub.push(Path(args.save_dir) / "final", say)
    if accelerator.num_processes > 1:
        # Everything is saved and every rank passed the last barrier. Tearing down DDP and gloo objects when
        # this frame unwinds has deadlocked a rank now and then (a native mutex, seen once in ~30 2-rank runs),
        # leaving the launcher waiting; exit as torchrun expects instead: flushed, status 0.
        exit_process(0)
    preemption.uninstall()
    return final_metrics


def count_nonfinite(state: dict, numbers, args, say) -> None:
    """A non-finite loss on any rank skipped the step on every rank; too many in a row stop the run."""
    if numbers.overflowed:  # fp16 loss scaling: expected now and then, the scaler adjusts
        state["skipped_overflow_steps"] = state.get("skipped_overflow_steps", 0) + 1
    if not numbers.nonfinite:
        state["consecutive_nonfinite"] = 0
        return
    state["consecutive_nonfinite"] = state.get("consecutive_nonfinite", 0) + 1
    state["skipped_nonfinite_steps"] += 1
    say(f"step {state['global_step']}: non-finite loss, step skipped ({state['consecutive_nonfinite']} in a row, "
        f"{state['skipped_nonfinite_steps']} in all)")
    if state["consecutive_nonfinite"] >= args.max_nonfinite_steps:
        raise TrainingError(
            f"{state['consecutive_nonfinite']} consecutive steps had a non-finite loss; stopping. Lower "
            "--learning_rate, keep --max_grad_norm on, or try --mixed_precision bf16/no instead of fp16.")


def checkpoint_due(args, state: dict) -> bool:
    return isinstance(args.checkpointing_steps, int) and state["global_step"] % args.checkpointing_steps == 0


def start_epoch(train_loader, train_sampler, state: dict, group_size: int) -> None:
    """Point the sampler at this epoch, from where a resumed run left it, in the epoch's own batch order."""
    if state["epoch_offset"] == 0:
        state["epoch_group_size"] = group_size
    train_sampler.resume_epoch(state["epoch"], state["epoch_offset"], state["epoch_group_size"])
    train_loader.set_epoch(state["epoch"])


def finish(accelerator, args, model, tokenizer, state: dict, last_validation: dict) -> dict:
    """A resumable checkpoint (a later run may continue with a larger --max_train_steps), final/ with its
    model card and curves, final_metrics.json."""
    save_dir = Path(args.save_dir)
    save_checkpoint(accelerator, args, dict(state))
    final_metrics = {"global_step": state["global_step"], "ranks": accelerator.num_processes,
                     "ranks_in_sync": parameters_in_sync(accelerator, model),
                     "skipped_nonfinite_steps": state["skipped_nonfinite_steps"],
                     "skipped_overflow_steps": state.get("skipped_overflow_steps", 0),
                     **{f"validation_{k}": v for k, v in last_validation.items()}}
    plots = []
    if accelerator.is_main_process:
        try:
            from ..plotting import plot_run

            plots.append(plot_run(save_dir))
        except ImportError:
            accelerator.print("matplotlib is not installed: no training_curves.png (pip install 'protmask[plot]')")
    save_model(accelerator, model, tokenizer, save_dir / "final",
               model_card(args, accelerator, final_metrics, "final", with_plot=bool(plots)), plots)
    if accelerator.is_main_process:
        write_json_atomically(save_dir / "final_metrics.json", final_metrics)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(f"done: {state['global_step']} steps; model in {save_dir / 'final'}"
                      + (f", best validation loss {state['best_validation_loss']:.4f} in {save_dir / 'best'}"
                         if state["best_validation_loss"] is not None else ""))
    return final_metrics


def is_collective_timeout(error: BaseException) -> bool:
    """gloo says "Timed out waiting ..."; NCCL's watchdog "Watchdog caught collective operation timeout: ...
    ran for N milliseconds before timing out"."""
    text = str(error).lower()
    return "timed out" in text or "operation timeout" in text or "before timing out" in text


def main(argv=None) -> int:
    from .arguments import parse_arguments

    args = parse_arguments(argv)
    try:
        train(args)
    except TrainingError as error:
        print(f"train_accelerate.py: error: {error}", file=sys.stderr)
        return 2
    except Preempted:
        return PREEMPTED_EXIT_CODE
    except RuntimeError as error:  # gloo raises a plain RuntimeError, NCCL a DistBackendError (a subclass)
        if not is_collective_timeout(error):
            raise
        print(f"train_accelerate.py: error: another process stopped answering for --process_group_timeout "
              f"{args.process_group_timeout} s ({str(error).splitlines()[0][:200]}); the job stops. See "
              "'A rank hangs' in docs/troubleshooting.md.", file=sys.stderr)
        return 1
    return 0
