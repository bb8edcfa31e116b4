"""Cluster-balanced against uniform sampling on a deliberately redundant set.

The structure set (../shared/data/pdb when present, else the shipped sample) plus many renamed copies of a
few of its training entries, the way the PDB holds hundreds of lysozymes. One build (MMseqs2 clusters at
--cluster_identity), then the same model trained for the same steps twice, with --sampling uniform and
--sampling cluster, each evaluated the same way on the test split (which the copies never enter: they are
copies of training entries). Prints JSON (also written to --output): the set, the clusters, and for each run
its training time and test-split design recovery (mean and median per chain), masked accuracy, perplexity.

    python bench/cluster_sampling.py                        # about 10 minutes on 2 CPU cores
    python bench/cluster_sampling.py --copied 10 --copies 100 --steps 300
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, default_pdb_path, emit, machine

MODEL = ["--hidden_dim", "64", "--num_neighbors", "16", "--num_encoder_layers", "2", "--num_decoder_layers", "2",
         "--max_tokens_per_batch", "2000", "--max_length", "300", "--learning_rate", "1e-3", "--warmup_steps", "30",
         "--num_workers", "0", "--logging_steps", "50", "--checkpointing_steps", "100000"]


def redundant_set(source: Path, folder: Path, cache: Path, copied: int, copies: int, identity: float) -> dict:
    """Links to every file of ``source``, plus ``copies`` renamed copies of each of ``copied`` training
    entries (the longest between 100 and 300 residues, a fixed choice)."""
    from protmask.data.build import BuildOptions, build_dataset, find_structure_files

    files, root = find_structure_files(source)
    folder.mkdir(parents=True)
    for file in files:
        target = folder / file.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(file.resolve())
    base = build_dataset(folder, cache, BuildOptions(cluster_identity=identity), log=lambda *a: None)
    train = base.dataset["train"]
    chosen = sorted(zip(train["length"], train["source"], train["name"]), reverse=True)
    chosen = [(source_file, name) for length, source_file, name in chosen if 100 <= length <= 300][:copied]
    for number in range(copies):
        for source_file, name in chosen:
            suffix = "".join(Path(source_file).suffixes)
            (folder / "copies" / str(number)).mkdir(parents=True, exist_ok=True)
            # Real copies: the build reads a file reached through several links once.
            shutil.copyfile(Path(source_file).resolve(), folder / "copies" / str(number) / f"{Path(name).name}{suffix}")
    return {"files": len(files), "copied_entries": [name for _, name in chosen], "copies_each": copies}


def train_and_evaluate(dataset: str, sampling: str, steps: int, save_dir: Path, seed: int) -> dict:
    started = time.perf_counter()
    command = [sys.executable, str(ROOT / "train_accelerate.py"), "--pdb_path", dataset, *MODEL,
               "--max_train_steps", str(steps), "--sampling", sampling, "--seed", str(seed), "--save_dir", str(save_dir)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"training failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    seconds = time.perf_counter() - started
    summary = next(line for line in done.stdout.splitlines() if line.startswith("split: "))
    metrics_file = save_dir / "test_metrics.json"
    evaluated = subprocess.run([str(Path(sys.executable).parent / "protmask"), "evaluate", "--model", str(save_dir / "final"),
                                "--pdb_path", dataset, "--split", "test", "--output", str(metrics_file)],
                               capture_output=True, text=True, cwd=ROOT)
    if evaluated.returncode != 0:
        raise SystemExit(f"evaluation failed:\n{evaluated.stderr[-3000:]}")
    metrics = json.loads(metrics_file.read_text())
    return {"sampling": sampling, "train_seconds": round(seconds, 1), "summary": summary, **pick(metrics)}


def pick(metrics: dict) -> dict:
    """The headline numbers of `protmask evaluate`'s JSON."""
    wanted = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and any(word in key for word in ("recovery", "accuracy", "perplexity",
                                                                              "chains", "structures")):
            wanted[key] = value
    return wanted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pdb_path", default=default_pdb_path())
    parser.add_argument("--copied", type=int, default=10, help="training entries to copy")
    parser.add_argument("--copies", type=int, default=100, help="renamed copies of each")
    parser.add_argument("--cluster_identity", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "cluster_sampling.json"))
    args = parser.parse_args()
    from protmask.data.build import BuildOptions, build_dataset

    with tempfile.TemporaryDirectory(prefix="protmask-bench-") as work:
        work = Path(work)
        described = redundant_set(Path(args.pdb_path), work / "pdb", work / "cache", args.copied, args.copies,
                                  args.cluster_identity)
        built = build_dataset(work / "pdb", work / "cache", BuildOptions(cluster_identity=args.cluster_identity),
                              log=lambda *a: None)
        report = built.report
        if report["files_seen"] != described["files"] + len(described["copied_entries"]) * args.copies:
            raise SystemExit(f"the redundant set holds {report['files_seen']} files, not the originals and every copy")
        described.update(files_with_copies=report["files_seen"], entries={s: report["splits"][s]["entries"] for s in report["splits"]},
                         clusters=report.get("clusters"), split_by=report["split_by"])
        runs = [train_and_evaluate(str(built.path), sampling, args.steps, work / sampling, args.seed)
                for sampling in ("uniform", "cluster")]
    emit({"benchmark": "cluster_sampling", "machine": machine(), "set": described, "steps": args.steps,
          "model": " ".join(MODEL), "seed": args.seed, "runs": runs}, args.output)


if __name__ == "__main__":
    main()
