"""The learning rate: scaling with the number of processes, a default warm-up, a schedule in optimizer
steps, and carrying it over when a run continues on another number of processes."""

from __future__ import annotations

import functools
import math


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


def warmup_steps(args, num_processes: int, max_train_steps: int) -> int:
    """--warmup_steps, or by default, when LR scaling raises the rate (several processes), a warm-up of 5 % of
    the run (at most 1000 optimizer steps): starting 8 GPUs at 8x the rate without one diverges easily."""
    if args.warmup_steps is not None:
        return args.warmup_steps
    if effective_learning_rate(args, num_processes) > args.learning_rate:
        return max(1, min(1000, round(0.05 * max_train_steps)))
    return 0


def build_scheduler(args, optimizer, max_train_steps: int, num_processes: int, state: dict):
    """transformers' schedule in optimizer steps. Accelerate's prepared scheduler steps once per process per
    optimizer step, so warm-up and total are given times the processes to get the curve asked for. A resumed
    run keeps the default warm-up its run started with (it depends on the run's length, which may change).

    Why not Accelerator(step_scheduler_with_optimizer=False), which steps once: checkpoints already written
    count scheduler steps per process, and would resume at the wrong place in their schedule."""
    from transformers import get_scheduler

    if args.warmup_steps is None and state.get("warmup_steps") is not None:
        warmup = state["warmup_steps"]
    else:
        warmup = warmup_steps(args, num_processes, max_train_steps)
    state["warmup_steps"] = warmup
    if args.lr_scheduler_type == "noam":
        from torch.optim.lr_scheduler import LambdaLR

        return LambdaLR(optimizer, functools.partial(noam_factor, warmup=warmup, processes=num_processes))
    kind = "constant_with_warmup" if args.lr_scheduler_type == "constant" and warmup else args.lr_scheduler_type
    return get_scheduler(kind, optimizer, num_warmup_steps=warmup * num_processes,
                         num_training_steps=max_train_steps * num_processes)


def noam_factor(scheduler_steps: int, *, warmup: int, processes: int) -> float:
    """ProteinMPNN's Noam schedule as a fraction of its peak: the update after k optimizer steps uses
    min((k + 1) / warmup, sqrt(warmup / (k + 1))), as NoamOpt, which counts its steps from 1. Accelerate steps
    the scheduler once per process per optimizer step, so k = scheduler_steps / processes."""
    step = scheduler_steps / processes + 1
    warmup = max(warmup, 1)
    return min(step / warmup, math.sqrt(warmup / step))


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
