"""One optimizer step over a group of micro-batches (gradient accumulation) with one host-device
synchronisation: the numbers the host needs are summed on the device, reduced across ranks in one
all-reduce and read once."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..metrics import masked_lm_sums


@dataclass
class StepNumbers:
    """A step's totals over every rank, read from the device once."""

    loss_sum: float
    tokens: int  # scored (masked) residues
    correct: int
    residues: int
    nonfinite: bool  # some rank's loss was not finite: every rank skipped the update alike
    preempted: bool  # some rank was signalled: every rank stops after this step
    learning_rate: float = 0.0  # the rate this step's update used
    overflowed: bool = False  # fp16: the loss scaler found inf/NaN gradients and skipped the update


class OptimizerStep:
    """Forward and backward over each micro-batch, then one update.

    The loss is the mean over the masked residues of the whole global batch (all ranks, all micro-batches).
    Each micro-batch back-propagates its summed loss; after the last one, the gradients (which DDP averaged
    over ranks) are scaled by ranks / global masked residues. That count travels in the same all-reduce as
    the step's other numbers, so nothing waits for it before the forward pass.
    """

    def __init__(self, accelerator, model, optimizer, scheduler, label_smoothing: float, max_grad_norm: float):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.label_smoothing, self.max_grad_norm = label_smoothing, max_grad_norm
        self.parameters = [p for p in model.parameters() if p.requires_grad]

    def __call__(self, group: list[dict], stop_requested=lambda: False) -> StepNumbers:
        """``stop_requested()`` is read after the backward passes, just before the all-reduce: a signal that
        arrives during this step still stops the run after it, at the cost of this step and the save."""
        accelerator, device = self.accelerator, self.accelerator.device
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, tokens, correct, residues
        for index, batch in enumerate(group):
            last = index == len(group) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(self.model):
                logits = self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                loss, tokens, correct = masked_lm_sums(logits, batch["labels"], self.label_smoothing)
                accelerator.backward(loss)
            sums += torch.stack([loss.detach().double(), tokens.double(), correct.double(),
                                 batch["attention_mask"].sum().double()])
        flags = torch.stack([(~torch.isfinite(sums[0])).double(),
                             torch.full((), float(stop_requested()), dtype=torch.float64, device=device)])
        totals = accelerator.reduce(torch.cat([sums, flags]), "sum")
        grads = [p.grad for p in self.parameters if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, (accelerator.num_processes / totals[1].clamp(min=1)).to(grads[0].dtype))
        numbers = StepNumbers(*totals.tolist())  # the step's one synchronisation
        numbers.tokens, numbers.correct, numbers.residues = int(numbers.tokens), int(numbers.correct), int(numbers.residues)
        numbers.nonfinite, numbers.preempted = numbers.nonfinite > 0, numbers.preempted > 0
        numbers.learning_rate = self.optimizer.param_groups[0]["lr"]
        if not numbers.nonfinite:
            if self.max_grad_norm > 0:
                accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            scaler = getattr(accelerator, "scaler", None)  # fp16 only
            scale = scaler.get_scale() if scaler is not None else None
            self.optimizer.step()
            # The scaler lowers its scale when it skipped the update. Read it rather than the optimizer's
            # step_was_skipped: fused AdamW skips inside its kernel, and that flag stays False.
            numbers.overflowed = scaler is not None and scaler.get_scale() < scale
            if not numbers.overflowed:  # a skipped update does not advance the schedule
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return numbers
