"""Peak memory of training with the default flags when the data holds a giant complex.

Builds a folder of 9 ordinary sample structures and one complex of --residues residues (copies of a real
chain on a grid, bench/common.py), trains the two steps of an epoch (every entry, the giant included) with
the trainer's default flags (only --max_train_steps, --num_workers 0, no held-out splits and the folders
given), and prints JSON: the peak RSS of the training process and the batch it was told. The second variant turns cropping off (`--max_length 0`) for a
complex of --uncropped_residues, to show what the default bound saves.

    python bench/memory.py                       # 20 000 residues with defaults; 500 uncropped
    python bench/memory.py --variants default    # only the default-flag run
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, emit, machine, spawn, write_giant_complex

ORDINARY = ["1aki.cif.gz", "1a8o.pdb.gz", "1cd0.pdb.gz", "1dix.pdb.gz", "2fr2.pdb.gz", "3fh2.pdb.gz",
            "4bpy.pdb.gz", "5emb.pdb.gz", "1p3c.pdb.gz"]


def run(residues: int, extra: list[str], folder: Path) -> dict:
    from protmask.data import SAMPLE_DATA

    data = folder / f"data-{residues}"
    data.mkdir(parents=True)
    for name in ORDINARY:
        shutil.copy(SAMPLE_DATA / name, data / name)
    written = write_giant_complex(data / "giant.cif", residues)
    command = [sys.executable, str(ROOT / "train_accelerate.py"), "--pdb_path", str(data), "--cache_dir",
               str(folder / "cache"), "--save_dir", str(folder / "run"), "--max_train_steps",
               "2", "--num_workers", "0", "--validation_fraction", "0", "--test_fraction", "0", *extra]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    record = {"giant_residues": written, "flags": " ".join(extra) or "defaults", "returncode": done.returncode,
              "seconds": round(seconds, 1), "training_peak_rss_mb": round(peak, 1)}
    lines = [l for l in done.stdout.splitlines() if l.startswith(("batch per device", "model:", "world size"))]
    record["run"] = lines
    if done.returncode:
        record["error"] = done.stderr[-1500:]
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--residues", type=int, default=20000)
    parser.add_argument("--uncropped_residues", type=int, default=500)
    parser.add_argument("--variants", default="default,uncropped")
    parser.add_argument("--output")
    args = parser.parse_args()
    if args.worker:  # one variant in a process of its own, so that the peak is this variant's
        residues, *extra = args.worker
        extra = " ".join(extra).split()
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps(run(int(residues), extra, Path(folder))))
        return
    result = {"benchmark": "memory", "machine": machine()}
    if "default" in args.variants:
        result["default_flags"] = spawn(__file__, args.residues)
    if "uncropped" in args.variants:
        result["cropping_off"] = spawn(__file__, args.uncropped_residues, "--max_length 0")
    emit(result, args.output)


if __name__ == "__main__":
    main()
