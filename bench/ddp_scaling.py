"""Data-parallel scaling on CPU: train_accelerate.py with 1 rank × 1 thread and 2 ranks × 1 thread each.

Prints JSON: training residues/s of each (all ranks together, timed steps after a warm-up window) and the
scaling efficiency = residues/s(2 ranks) / (2 × residues/s(1 rank)). The per-device batch (a token
budget) is the same in both, so 2 ranks do twice the work per step.

    python bench/ddp_scaling.py                      # hidden 128, k 48, 3+3 layers, 2000-token batches
    python bench/ddp_scaling.py --steps 30 --hidden_dim 256
    python bench/ddp_scaling.py --baseline /tmp/before   # and the 1-rank speed of another checkout, alternated
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, default_pdb_path, emit, machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(ranks: int, args, save_dir: Path, checkout: Path = ROOT) -> dict:
    flags = ["--pdb_path", args.pdb_path, "--cache_dir", args.cache_dir, "--hidden_dim", str(args.hidden_dim),
             "--num_neighbors", str(args.num_neighbors), "--max_tokens_per_batch", str(args.max_tokens),
             "--max_length", str(args.max_length), "--max_train_steps", str(args.steps), "--logging_steps",
             str(args.window), "--num_workers", "0", "--torch_threads", "1", "--checkpointing_steps",
             str(10 * args.steps), "--save_dir", str(save_dir)]
    script = str(checkout / "train_accelerate.py")  # run from its folder, a checkout imports its own protmask
    if ranks == 1:
        command = [sys.executable, script] + flags
    else:
        command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
                   str(ROOT / "accelerate_configs" / "cpu.yaml"), "--num_processes", str(ranks),
                   "--main_process_port", str(free_port()), script] + flags
    environment = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=checkout)
    if done.returncode != 0:
        raise SystemExit(f"{ranks}-rank run failed:\n{done.stderr[-4000:]}")
    train = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["split"] == "train"][1:]  # the first window holds the warm-up step
    residues, seconds = sum(r["residues"] for r in train), sum(r["seconds"] for r in train)
    waiting = sum(r["data_wait_fraction"] * r["seconds"] for r in train)
    return {"ranks": ranks, "threads_per_rank": 1, "timed_steps": len(train) * args.window, "residues": residues,
            "seconds": round(seconds, 2), "residues_per_s": round(residues / seconds, 1),
            "data_wait_fraction": round(waiting / seconds, 4),
            "window_residues_per_s": [round(r["residues_per_s"], 1) for r in train]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pdb_path", default=default_pdb_path())
    parser.add_argument("--cache_dir", default=str(Path(tempfile.gettempdir()) / "protmask-bench-cache"))
    parser.add_argument("--hidden_dim", type=int, default=128)
    parser.add_argument("--num_neighbors", type=int, default=48)
    parser.add_argument("--max_tokens", type=int, default=2000, help="padded tokens per rank per step")
    parser.add_argument("--max_length", type=int, default=500)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--window", type=int, default=4, help="steps per logged window (the first is warm-up)")
    parser.add_argument("--baseline", type=Path,
                        help="another checkout (e.g. `git worktree add /tmp/before REV`): its 1-rank run is timed "
                             "alternately with this one's, for a before/after ratio")
    parser.add_argument("--output")
    args = parser.parse_args()
    result = {"benchmark": "ddp_scaling", "machine": machine(), "settings": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as scratch:
        if args.baseline:
            result["baseline_one_rank"] = run(1, args, Path(scratch) / "before", args.baseline)
        one = run(1, args, Path(scratch) / "one")
        two = run(2, args, Path(scratch) / "two")
        if args.baseline:
            again = run(1, args, Path(scratch) / "before-again", args.baseline)
            before = (result["baseline_one_rank"]["residues_per_s"] + again["residues_per_s"]) / 2
            result["baseline_one_rank_again"] = again
            result["one_rank_vs_baseline"] = round(one["residues_per_s"] / before, 3)
    result.update({"one_rank": one, "two_ranks": two,
                   "scaling_efficiency": round(two["residues_per_s"] / (2 * one["residues_per_s"]), 3),
                   "target": 0.85})
    emit(result, args.output)


if __name__ == "__main__":
    main()
