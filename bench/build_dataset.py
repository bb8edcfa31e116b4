"""Dataset build speed: `build_dataset` over a whole structure folder against plain Biopython parsing.

Prints JSON: files/s, chains/s and peak RSS of protmask's build (parallel, and on one process) and of a
single-process Biopython loop that only parses each file (the loading example of the data's README), all on
the same files, each in its own process.

    python bench/build_dataset.py                       # ../shared/data/pdb when present, else the sample
    python bench/build_dataset.py --pdb_path DIR --num_proc 8
    python bench/build_dataset.py --scale 1 4           # 1× and 4× the set, and a rebuild after touching 1 %
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

from pathlib import Path

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



def scaled_copy(pdb_path: str, scale: int, folder: Path) -> Path:
    """``scale`` copies of the structure files as hard links under new names (no disk space, new entries)."""
    from protmask.data.build import find_structure_files

    files, _ = find_structure_files(pdb_path)
    target = folder / f"x{scale}"
    for copy in range(scale):
        (target / f"copy{copy}").mkdir(parents=True)
        for file in files:
            link = target / f"copy{copy}" / file.name
            try:
                os.link(file, link)
            except OSError:  # another file system: a symbolic link reads the same
                link.symlink_to(file)
    return target


class TreeMemory:
    """Peak resident memory of this process and all its descendants together, sampled from /proc."""

    def __init__(self, interval: float = 0.1):
        import threading

        self.peak_mb, self.interval, self._stop = 0.0, interval, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree_rss_mb(self) -> float:
        children, total = {}, 0
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    children.setdefault(int(fields[1]), []).append((int(entry.name), int(fields[21])))
                except (OSError, IndexError, ValueError):
                    continue
        frontier = [os.getpid()]
        total = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[21])
        while frontier:
            for pid, rss in children.get(frontier.pop(), []):
                total += rss
                frontier.append(pid)
        return total * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self._tree_rss_mb())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def worker_scaled(pdb_path: str, scale: int, num_proc: int) -> dict:
    """A full build of ``scale`` × the files, then a rebuild after touching 1 % of them."""
    import random

    from protmask.data.build import build_dataset, find_structure_files

    with tempfile.TemporaryDirectory() as folder:
        data = scaled_copy(pdb_path, scale, Path(folder))
        files, _ = find_structure_files(data)
        cache = Path(folder) / "cache"
        with TreeMemory() as memory:
            started = time.perf_counter()
            full = build_dataset(data, cache, num_proc=num_proc, log=lambda *a: None)
            full_seconds = time.perf_counter() - started
        # Copies are hard links of one file: touching one changes all `scale` of them, so touch 1 % ÷ scale.
        base = [f for f in files if f.parent.name == "copy0"]
        touched = random.Random(0).sample(base, max(1, len(files) // 100 // scale))
        for file in touched:
            os.utime(file, ns=(time.time_ns(), time.time_ns()))
        started = time.perf_counter()
        again = build_dataset(data, cache, num_proc=num_proc, log=lambda *a: None)
        rebuild_seconds = time.perf_counter() - started
    return {"scale": scale, "files": len(files), "num_proc": num_proc, "full_build_seconds": round(full_seconds, 1),
            "files_per_s": round(len(files) / full_seconds, 1), "peak_rss_process_tree_mb": round(memory.peak_mb, 1),
            "changed_files": len(touched) * scale, "reparsed_files": again.report["files_parsed_now"],
            "incremental_rebuild_seconds": round(rebuild_seconds, 1),
            "incremental_fraction_of_full": round(rebuild_seconds / full_seconds, 3),
            "entries": sum(len(full.dataset[s]) for s in full.dataset)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--pdb_path", default=default_pdb_path())
    parser.add_argument("--num_proc", type=int, default=os.cpu_count())
    parser.add_argument("--scale", type=int, nargs="*",
                        help="instead: build N× the files (hard links under new names) for each N given, and rebuild "
                             "after touching 1 %% of them; peak RSS is the whole process tree's")
    parser.add_argument("--output")
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "scaled":
            result = worker_scaled(rest[0], int(rest[1]), int(rest[2]))
        else:
            result = worker_protmask(rest[0], int(rest[1])) if kind == "protmask" else worker_biopython(rest[0])
        print(json.dumps(result))
        return
    if args.scale:
        emit({"benchmark": "build_dataset_scaled", "machine": machine(), "pdb_path": args.pdb_path,
              "runs": [spawn(__file__, "scaled", args.pdb_path, scale, args.num_proc) for scale in args.scale]},
             args.output)
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
