"""Dataset build speed: `build_dataset` over a whole structure folder against plain Biopython parsing.

Prints JSON: files/s, chains/s and peak RSS of protmask's build (parallel, and on one process) and of a
single-process Biopython loop that only parses each file (the loading example of the data's README), all on
the same files, each in its own process.

    python bench/build_dataset.py                       # ../shared/data/pdb when present, else the sample
    python bench/build_dataset.py --pdb_path DIR --num_proc 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

from common import default_pdb_path, emit, machine, peak_rss_mb, spawn


def children_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def worker_protmask(pdb_path: str, num_proc: int) -> dict:
    from protmask.data.build import build_dataset

    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        result = build_dataset(pdb_path, cache, num_proc=num_proc, log=lambda *a: None)
        seconds = time.perf_counter() - started
        report = result.report
    return {"files": report["files_seen"], "chains": report["chains_seen"], "chains_kept": report["chains_kept"],
            "files_failed": len(report["files_failed"]), "seconds": round(seconds, 2),
            "files_per_s": round(report["files_seen"] / seconds, 1), "chains_per_s": round(report["chains_seen"] / seconds, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1), "peak_rss_worker_mb": round(children_peak_rss_mb(), 1),
            "num_proc": num_proc}


def worker_biopython(pdb_path: str) -> dict:
    import gzip
    import io
    import warnings
    from pathlib import Path

    from Bio.PDB import MMCIFParser, PDBParser
    from Bio.PDB.Polypeptide import is_aa

    from protmask.data.build import find_structure_files

    files, _ = find_structure_files(pdb_path)
    pdb_parser, cif_parser = PDBParser(QUIET=True), MMCIFParser(QUIET=True)
    chains = failed = 0
    started = time.perf_counter()
    for path in files:
        name = path.name.lower()
        opener = gzip.open if name.endswith(".gz") else open
        try:
            with opener(path, "rt") as handle, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                parser = cif_parser if ".cif" in name else pdb_parser
                structure = parser.get_structure(Path(path).stem, io.StringIO(handle.read()))
            model = next(iter(structure))
            chains += sum(1 for chain in model if any(is_aa(r, standard=False) for r in chain))
        except Exception:
            failed += 1
    seconds = time.perf_counter() - started
    return {"files": len(files), "chains": chains, "files_failed": failed, "seconds": round(seconds, 2),
            "files_per_s": round(len(files) / seconds, 1), "chains_per_s": round(chains / seconds, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1), "num_proc": 1}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--pdb_path", default=default_pdb_path())
    parser.add_argument("--num_proc", type=int, default=os.cpu_count())
    parser.add_argument("--output")
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        result = worker_protmask(rest[0], int(rest[1])) if kind == "protmask" else worker_biopython(rest[0])
        print(json.dumps(result))
        return
    baseline = spawn(__file__, "biopython", args.pdb_path)
    single = spawn(__file__, "protmask", args.pdb_path, 1)
    parallel = spawn(__file__, "protmask", args.pdb_path, args.num_proc)
    emit({
        "benchmark": "build_dataset",
        "machine": machine(),
        "pdb_path": args.pdb_path,
        "biopython_single_process": baseline,
        "protmask_build_1_process": single,
        f"protmask_build_{args.num_proc}_processes": parallel,
        "speedup_parallel_vs_biopython": round(parallel["files_per_s"] / baseline["files_per_s"], 2),
        "overhead_1_process_vs_biopython": round(baseline["files_per_s"] / single["files_per_s"], 2),
    }, args.output)


if __name__ == "__main__":
    main()
