"""The working tree against an earlier commit, timed in one run: the same model step and a `make train`-sized run.

The commit is checked out in a temporary `git worktree`; every measurement runs in a fresh process that imports
protmask from one tree or the other, and the two trees alternate (A B A B …), so a machine that speeds up or
slows down in the middle of the run touches both alike. Prints one JSON document with each tree's figures,
their medians and the ratio working tree ÷ commit (above 1: the working tree is faster).

- **Model step**: forward, loss, backward and AdamW step of `ProtMaskForMaskedLM` on the same batches (built
  once, by the working tree's collator, and handed to both trees as tensors), for each hidden size and thread
  count: real residues/s.
- **Training run**: `train_accelerate.py` of each tree with the demo flags of the working tree's Makefile
  (`TRAIN_ARGS`) for `--train_steps` optimizer steps, validation and checkpoints included: wall-clock seconds
  (the dataset is built before timing) and the residues/s the run logged.

    python bench/revisions.py --baseline e146dd4                      # both parts, ~10 min on 2 cores
    python bench/revisions.py --baseline HEAD~3 --skip_training_run --hidden_dims 256 --threads 1
    python bench/revisions.py --baseline v0.1 --train_steps 0         # the whole demo run (make train) per tree
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, default_pdb_path, emit, machine, spawn

# ---------------------------------------------------------------------------------------------- trees


def add_worktree(revision: str, scratch: Path) -> tuple[Path, str]:
    """A detached worktree of ``revision`` under ``scratch``; returns (path, full commit id)."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{revision}^{{commit}}"], cwd=ROOT, capture_output=True,
                            text=True)
    if commit.returncode != 0:
        raise SystemExit(f"--baseline {revision}: not a commit of this repository ({commit.stderr.strip()})")
    path = scratch / f"baseline-{commit.stdout.strip()[:10]}"
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(path), commit.stdout.strip()], cwd=ROOT,
                   check=True)
    return path, commit.stdout.strip()


def remove_worktree(path: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True)
    subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True)


def describe_tree(path: Path) -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path, capture_output=True,
                           text=True)
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


# ------------------------------------------------------------------------------------------ model step

def save_batches(args, path: Path) -> list[int]:
    """The benchmark's batches, made once by the working tree and saved as tensors; returns their residues."""
    import torch
    from model_throughput import make_batches, select_batches

    dataset_path, indices = select_batches(args)
    batches = make_batches(dataset_path, indices, args.max_length, "cpu")
    torch.save(batches, path)
    return [int(b["attention_mask"].sum()) for b in batches]


def step_worker(spec: dict) -> dict:
    """In a fresh process: time training steps of the model of ``spec['tree']`` (imported from there)."""
    sys.path.insert(0, spec["tree"])
    import torch

    try:
        from protmask.runtime import tune_cpu_allocator  # trees before the allocator setting lack it
        tune_cpu_allocator()
    except ImportError:
        pass
    from protmask import ProtMaskConfig, ProtMaskForMaskedLM

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    batches = torch.load(spec["batches"], weights_only=True)
    config = ProtMaskConfig(hidden_dim=spec["hidden_dim"], num_neighbors=spec["neighbors"], num_encoder_layers=3,
                            num_decoder_layers=3, backbone_noise=0.02)
    model = ProtMaskForMaskedLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(batch):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in batches:  # warm-up: every shape once (allocator, kernels, optimizer state)
        step(batch)
    residues = sum(int(b["attention_mask"].sum()) for b in batches) * spec["passes"]
    started = time.perf_counter()
    for _ in range(spec["passes"]):
        for batch in batches:
            step(batch)
    seconds = time.perf_counter() - started
    return {"residues": residues, "seconds": round(seconds, 3), "residues_per_s": round(residues / seconds, 1)}


def model_step(args, trees: dict, batches_path: Path) -> list[dict]:
    rows = []
    for hidden in args.hidden_dims:
        for threads in args.threads:
            runs = {name: [] for name in trees}
            for _ in range(args.repeats):
                for name, tree in trees.items():
                    spec = {"tree": str(tree), "batches": str(batches_path), "hidden_dim": hidden, "threads": threads,
                            "neighbors": args.neighbors, "passes": args.passes}
                    runs[name].append(spawn(__file__, "step", json.dumps(spec),
                                            env={"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}))
                    print(f"model step, hidden {hidden}, {threads} thread(s), {name}: "
                          f"{runs[name][-1]['residues_per_s']} residues/s", file=sys.stderr)
            rows.append(compare({"hidden_dim": hidden, "threads": threads, "neighbors": args.neighbors},
                                runs, "residues_per_s", higher_is_better=True))
    return rows


# ---------------------------------------------------------------------------------------- training run

def demo_flags(makefile: Path) -> list[str]:
    """TRAIN_ARGS of the Makefile, without the flags a benchmark run sets itself."""
    text = makefile.read_text().replace("\\\n", " ")
    match = re.search(r"^TRAIN_ARGS \?=(.*)$", text, re.MULTILINE)
    if not match:
        raise SystemExit(f"{makefile}: no TRAIN_ARGS line")
    flags, dropped = shlex.split(match.group(1)), {"--save_dir", "--resume_from_checkpoint"}
    kept, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag in dropped:
            skip = True
        else:
            kept.append(flag)
    return kept


def training_run(tree: Path, flags: list[str], save_dir: Path) -> dict:
    command = [sys.executable, str(tree / "train_accelerate.py"), *flags, "--save_dir", str(save_dir)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=tree, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1"))
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"training run of {tree} failed (a flag it does not know?):\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r["split"] == "train"]
    train = train[1:] if len(train) > 1 else train  # the first window holds the warm-up steps
    residues, step_seconds = sum(r["residues"] for r in train), sum(r["seconds"] for r in train)
    final = json.loads((save_dir / "final_metrics.json").read_text())
    return {"wall_seconds": round(seconds, 1), "steps": final["global_step"],
            "residues_per_s": round(residues / max(step_seconds, 1e-9), 1),
            "validation_loss": final.get("validation_loss")}


def training_runs(args, trees: dict, scratch: Path) -> dict:
    flags = demo_flags(ROOT / "Makefile") + ["--pdb_path", args.training_pdb_path]
    if args.train_steps:
        flags += ["--max_train_steps", str(args.train_steps)]
    caches = {name: ["--cache_dir", str(scratch / f"cache-{name}")] for name in trees}
    for name, tree in trees.items():  # build each tree's dataset (untimed): a run then times training alone
        training_run(tree, flags + caches[name] + ["--max_train_steps", "1"], scratch / f"build-{name}")
    runs = {name: [] for name in trees}
    for repeat in range(args.training_repeats):
        for name, tree in trees.items():
            runs[name].append(training_run(tree, flags + caches[name], scratch / f"run-{name}-{repeat}"))
            print(f"training run, {name}: {runs[name][-1]}", file=sys.stderr)
    row = compare({"flags": " ".join(flags)}, runs, "wall_seconds", higher_is_better=False)
    row["residues_per_s_ratio"] = compare({}, runs, "residues_per_s", higher_is_better=True)["ratio"]
    return row


# ------------------------------------------------------------------------------------------- reporting

def compare(row: dict, runs: dict, key: str, higher_is_better: bool) -> dict:
    """Each tree's runs and median of ``key``; ratio > 1 means the working tree is better."""
    medians = {name: round(statistics.median(r[key] for r in results), 1) for name, results in runs.items()}
    ratio = (medians["working_tree"] / medians["baseline"] if higher_is_better
             else medians["baseline"] / medians["working_tree"])
    return {**row, "runs": runs, f"median_{key}": medians, "ratio": round(ratio, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--baseline", required=False, help="the commit to compare with (any git revision)")
    parser.add_argument("--pdb_path", default=default_pdb_path(), help="structures for the model-step batches")
    parser.add_argument("--cache_dir", default=str(Path(tempfile.gettempdir()) / "protmask-bench-cache"))
    parser.add_argument("--hidden_dims", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--neighbors", type=int, default=48)
    parser.add_argument("--max_tokens", type=int, default=1000, help="padded tokens per model-step batch")
    parser.add_argument("--max_length", type=int, default=500)
    parser.add_argument("--num_batches", type=int, default=4)
    parser.add_argument("--passes", type=int, default=2, help="timed passes over the batches per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per tree, alternating")
    parser.add_argument("--skip_training_run", action="store_true")
    parser.add_argument("--training_pdb_path", default=None,
                        help="structures of the training run (default: the shipped sample, as make train)")
    parser.add_argument("--train_steps", type=int, default=140, help="steps of each training run; 0: the whole demo")
    parser.add_argument("--training_repeats", type=int, default=2)
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(step_worker(json.loads(args.worker[1]))))
        return
    if not args.baseline:
        parser.error("--baseline REVISION is required")
    if args.training_pdb_path is None:
        from protmask.data import SAMPLE_DATA

        args.training_pdb_path = str(SAMPLE_DATA)

    with tempfile.TemporaryDirectory(prefix="protmask-revisions-") as scratch_name:
        scratch = Path(scratch_name)
        baseline, commit = add_worktree(args.baseline, scratch)
        try:
            trees = {"baseline": baseline, "working_tree": ROOT}
            result = {"benchmark": "revisions", "machine": machine(),
                      "baseline": {"revision": args.baseline, "commit": commit},
                      "working_tree": describe_tree(ROOT),
                      "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "output")}}
            batches_path = scratch / "batches.pt"
            result["settings"]["batch_residues"] = save_batches(args, batches_path)
            result["model_step"] = model_step(args, trees, batches_path)
            if not args.skip_training_run:
                result["training_run"] = training_runs(args, trees, scratch)
        finally:
            remove_worktree(baseline)
    emit(result, args.output)


if __name__ == "__main__":
    main()
