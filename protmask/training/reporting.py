"""What a run tells: metrics.jsonl, trackers, the console summary before training, and model cards."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


class RunLog:
    """metrics.jsonl, trackers and the console, on the main process only."""

    def __init__(self, accelerator, save_dir: Path, forget_after: int | None = None):
        self.accelerator = accelerator
        self.path = save_dir / "metrics.jsonl"
        if forget_after is not None:
            self.forget_after(forget_after)

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


class TrainingWindow:
    """Training numbers summed between two log records."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.tokens, self.correct, self.residues, self.seconds, self.waiting = 0.0, 0, 0, 0, 0.0, 0.0

    def add(self, numbers, seconds: float, waiting: float) -> None:
        if not numbers.nonfinite:
            self.loss_sum += numbers.loss_sum
            self.tokens += numbers.tokens
        self.correct += numbers.correct
        self.residues += numbers.residues
        self.seconds += seconds
        self.waiting += waiting

    def record(self, step: int, epoch: int, learning_rate: float, state: dict) -> dict:
        loss = self.loss_sum / max(self.tokens, 1)
        record = {
            "step": step, "epoch": epoch, "split": "train", "loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "accuracy": self.correct / max(self.tokens, 1), "learning_rate": learning_rate,
            "residues": self.residues, "seconds": self.seconds,
            "residues_per_s": self.residues / max(self.seconds, 1e-9),
            "data_wait_fraction": self.waiting / max(self.seconds, 1e-9),
            "skipped_nonfinite_steps": state["skipped_nonfinite_steps"],
            "skipped_overflow_steps": state.get("skipped_overflow_steps", 0),
        }
        self.reset()
        return record


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


def describe_run(accelerator, args, built, threads: int, learning_rate: float, steps_per_epoch: int,
                 max_train_steps: int, model, warmup: int, train_sampler) -> str:
    """What the run actually got, printed before training: check this first when something looks wrong."""
    processes, accumulation = accelerator.num_processes, args.gradient_accumulation_steps
    machines = processes // int(os.environ.get("LOCAL_WORLD_SIZE", processes))
    per_device = (f"up to {args.max_tokens_per_batch} padded residues" if args.max_tokens_per_batch
                  else f"{args.batch_size} examples")
    global_batch = (f"{args.max_tokens_per_batch * processes * accumulation} padded residues" if args.max_tokens_per_batch
                    else f"{args.batch_size * processes * accumulation} examples")
    clusters = train_sampler.sampler.clusters
    sampling = (f"cluster (one entry from each of {len(clusters)} clusters per epoch)" if clusters is not None
                else "uniform (every entry once per epoch)")
    return "\n".join([
        f"world size: {processes} process(es) on {machines} machine(s); device: {accelerator.device}; "
        f"mixed precision: {accelerator.mixed_precision}; CPU threads per process: {threads}",
        f"batch per device: {per_device}; global batch: {global_batch} (× {processes} processes × {accumulation} "
        "accumulation)",
        f"learning rate: {args.learning_rate:g} × {learning_rate / args.learning_rate:g} ({args.lr_scaling} scaling over "
        f"{processes} processes) = {learning_rate:g}; schedule {args.lr_scheduler_type}, {warmup} "
        f"warm-up steps{' (the default when scaling raises the rate)' if args.warmup_steps is None and warmup else ''}",
        f"data: {len(built.dataset['train'])} training / {len(built.dataset['validation'])} validation examples from "
        f"{built.path}; {steps_per_epoch} steps per epoch, {max_train_steps} steps in all",
        f"split: by {built.report.get('split_by', 'identical chain sequence')}; sampling: {sampling}",
        f"model: {sum(p.numel() for p in model.parameters()):,} parameters; saving to {args.save_dir}",
    ])
