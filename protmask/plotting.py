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


def plot_mutation_scan(scan, output) -> Path:
    """A position × amino-acid heat map of a `MutationScan` (Δ log-likelihood against native; the native
    residue of each position is outlined). Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .residues import AMINO_ACIDS

    values = np.asarray(scan.values).T  # [20, positions]
    limit = float(np.nanmax(np.abs(values))) or 1.0
    width = min(40.0, 2.0 + 0.12 * values.shape[1])
    figure, axis = plt.subplots(figsize=(width, 4.2))
    image = axis.imshow(values, aspect="auto", cmap="RdBu", vmin=-limit, vmax=limit, interpolation="nearest")
    for column, native in enumerate(scan.natives):
        if native in AMINO_ACIDS:
            axis.add_patch(plt.Rectangle((column - 0.5, AMINO_ACIDS.index(native) - 0.5), 1, 1, fill=False, lw=0.6))
    axis.set_yticks(range(len(AMINO_ACIDS)), list(AMINO_ACIDS))
    step = max(1, len(scan.labels) // 40)
    axis.set_xticks(range(0, len(scan.labels), step), scan.labels[::step], rotation=90, fontsize=7)
    axis.set_xlabel("position")
    axis.set_ylabel("amino acid")
    axis.set_title(f"{scan.name}: log p(mutant) - log p(native), masked marginal")
    figure.colorbar(image, ax=axis, fraction=0.02, pad=0.01)
    figure.tight_layout()
    output = Path(output)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output
