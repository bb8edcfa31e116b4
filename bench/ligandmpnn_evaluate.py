"""The published models at binding sites: the converted `ligandmpnn_v_32_010_25` and `proteinmpnn_v_48_020`
scored by `protmask evaluate --split test --decoding autoregressive` on the test split of the shared set's
default build (the split of bench/proteinmpnn_recipe.py). Sites by the LigandMPNN paper's rule (side-chain
heavy atoms within 5 Å of a non-protein heavy atom of the class) and, beside them, by run.py's (virtual CB
within 8 Å); every model is scored at the same residues.

    python bench/ligandmpnn_evaluate.py --cache_dir /tmp/protmask-bench-cache   # ~16 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, default_pdb_path, emit, machine, protmask

COMMAND = ["evaluate", "--split", "test", "--decoding", "autoregressive"]
MODELS = {"ligandmpnn_v_32_010_25": ("convert-ligandmpnn", "ligandmpnn_v_32_010_25"),
          "proteinmpnn_v_48_020": ("convert-proteinmpnn", "vanilla/v_48_020")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pdb_path", default=default_pdb_path())
    parser.add_argument("--cache_dir", default=None, help="the dataset build's cache (default: a temporary one)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "ligandmpnn_evaluate.json"))
    args = parser.parse_args()
    from protmask.data.build import build_dataset

    results = {}
    with tempfile.TemporaryDirectory(prefix="protmask-bench-") as work:
        work = Path(work)
        built = build_dataset(args.pdb_path, args.cache_dir or work / "cache", log=lambda *a: None)
        for name in args.models:
            command, checkpoint = MODELS[name]
            protmask(command, "--checkpoint", checkpoint, "--output", work / name)
            start = time.perf_counter()
            protmask(*COMMAND, "--model", work / name, "--pdb_path", built.path, "--output", work / f"{name}.json")
            metrics = json.loads((work / f"{name}.json").read_text())
            metrics.pop("chains")  # one row per chain: the residues, letters and sites (kept out of the results)
            metrics["model"], metrics["pdb_path"] = name, args.pdb_path
            results[name] = dict(metrics, evaluate_seconds=round(time.perf_counter() - start, 1))
            print(json.dumps({name: results[name]["design_recovery_at_sites"]}), file=sys.stderr, flush=True)
    emit({"benchmark": "ligandmpnn_evaluate", "command": "protmask " + " ".join(COMMAND) + " --model MODEL "
          "--pdb_path BUILT_SHARED_SET", "dataset": f"{args.pdb_path}, default build (split seed 0)",
          "test_split": built.report["splits"]["test"], "machine": machine(), "models": results}, args.output)


if __name__ == "__main__":
    main()
