"""Training curves from a run's metrics.jsonl: loss, perplexity, masked accuracy and learning rate."""

from __future__ import annotations

import json
from pathlib import Path

PLOT_NAME = "training_curves.png"


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --run must be a --save_dir of train_accelerate.py")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir, output=None) -> Path:
    """Write a 2×2 PNG of the run's curves against optimizer steps and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    # A resumed run appends to the same file; keep the last record of each (split, step).
    latest = {(r["split"], r["step"]): r for r in records}
    series = {split: sorted((r for (s, _), r in latest.items() if s == split), key=lambda r: r["step"])
              for split in ("train", "validation")}
    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [("loss", "loss (masked NLL)"), ("perplexity", "perplexity"), ("accuracy", "masked accuracy"),
              ("learning_rate", "learning rate")]
    for axis, (key, title) in zip(axes.flat, panels):
        for split, style in (("train", "-"), ("validation", "o-")):
            points = [(r["step"], r[key]) for r in series[split] if key in r]
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, style, label=split, markersize=3)
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        if key == "perplexity":
            axis.set_yscale("log")
        if axis.lines:
            axis.legend()
    figure.suptitle(f"protmask run: {Path(run_dir).resolve().name}")
    figure.tight_layout()
    output = Path(output) if output else Path(run_dir) / PLOT_NAME
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output
