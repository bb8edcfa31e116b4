"""Structure files → an Arrow ``DatasetDict`` (train / validation / test) cached on disk, built in parallel,
fingerprinted by its inputs and options, with a report that accounts for every file.

This room composes the others: discovery (files, names, fingerprint), parsing (the pool and the parse cache),
clusters (MMseqs2), splits, publish (loading, reuse, locks, pruning); `DatasetBuild` is one build from entries
to a published folder."""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..runtime import usable_cpus
from ..structure import parse_entry
from .clusters import ClusteringError, cluster_sequences
from .discovery import (LIST_SUFFIXES, InputListing, dataset_fingerprint, entry_name, find_structure_files,
                        fingerprint, is_built_dataset, list_inputs, walk_folder)
from .options import (BUILD_FORMAT_VERSION, REPORT_NAME, SPLITS, UNCLUSTERED_WARNING_SHARE, BuildOptions,
                      DatasetBuildError)
from .parse_cache import ParseCache
from .parsing import (KILLED_WORKER, entry_filter, file_key_or_none, filter_chains, parse_all, parse_one,
                      parsed_files)
from .proteinmpnn_set import is_proteinmpnn_set, load_entry, read_cluster_lists, read_list, row_split
from .publish import (BuildResult, build_lock, data_file_sizes, dataset_damage, hold_for_reading,
                      load_built, prune_cache, readers_lock_path, reusable)
from .splits import SplitPlan, assign_splits, describe_split_rule, read_cluster_file

# What callers import from here: the build, and the rooms' names they used before the rooms existed.
__all__ = [
    "BUILD_FORMAT_VERSION", "KILLED_WORKER", "LIST_SUFFIXES", "REPORT_NAME", "SPLITS", "BuildOptions", "BuildResult",
    "DatasetBuild", "DatasetBuildError", "InputListing", "assign_splits", "build_dataset", "build_lock",
    "dataset_damage", "dataset_features", "dataset_fingerprint", "entry_name", "filter_chains",
    "find_structure_files", "fingerprint", "hold_for_reading", "is_built_dataset", "list_inputs", "load_built",
    "parse_entry", "parse_one", "prune_cache", "read_cluster_file", "readers_lock_path", "walk_folder",
]

def dataset_features():
    from datasets import Features, List, Value

    # Per-residue arrays are flat lists: coords holds L×4×3 float32 values. Nested list features read about
    # 200x slower in `datasets` 5; a flat list reads as one numpy array per row.
    return Features(
        {
            "name": Value("string"),
            "source": Value("string"),
            "chain_ids": List(Value("string")),
            "chain_lengths": List(Value("int32")),
            "sequence": Value("string"),
            "coords": List(Value("float32")),
            "residue_numbers": List(Value("int32")),
            "insertion_codes": Value("string"),
            "method": Value("string"),
            "resolution": Value("float32"),
            "length": Value("int32"),
            "num_valid": Value("int32"),
            # The entry (see structure.ParsedEntry), and its heavy atoms that are not protein residues:
            # coordinates flat (M×3), then one value per atom; classes index structure.ATOM_CLASSES.
            "entry_id": Value("string"),
            "assembly_id": Value("string"),
            "deposition_date": Value("string"),
            "release_date": Value("string"),
            "atom_coords": List(Value("float32")),
            "atom_elements": List(Value("string")),
            "atom_residue_names": List(Value("string")),
            "atom_chain_ids": List(Value("string")),
            "atom_residue_numbers": List(Value("int32")),
            "atom_classes": List(Value("int8")),
            "num_atoms": Value("int32"),
        }
    )


def _row(name: str, source: str, chains, entry) -> dict:
    coords = np.concatenate([c.coords for c in chains]).astype(np.float32)
    atoms = entry.atoms
    return {
        "name": name,
        "source": source,
        "chain_ids": [c.chain_id for c in chains],
        "chain_lengths": [len(c) for c in chains],
        "sequence": "".join(c.sequence for c in chains),
        "coords": coords.reshape(-1),
        "residue_numbers": np.concatenate([c.residue_numbers for c in chains]).astype(np.int32),
        "insertion_codes": "".join(c.insertion_codes for c in chains),
        "method": chains[0].method,
        "resolution": chains[0].resolution,
        "length": int(coords.shape[0]),
        "num_valid": int(np.isfinite(coords).all(axis=(1, 2)).sum()),
        "entry_id": entry.entry_id,
        "assembly_id": entry.assembly_id,
        "deposition_date": entry.deposition_date,
        "release_date": entry.release_date,
        "atom_coords": np.asarray(atoms.coords, dtype=np.float32).reshape(-1),
        "atom_elements": list(atoms.elements),
        "atom_residue_names": list(atoms.residue_names),
        "atom_chain_ids": list(atoms.chain_ids),
        "atom_residue_numbers": np.asarray(atoms.residue_numbers, dtype=np.int32),
        "atom_classes": np.asarray(atoms.classes, dtype=np.int8),
        "num_atoms": len(atoms),
    }


def _count(report: dict, reason: str) -> None:
    report["filter_counts"][reason] = report["filter_counts"].get(reason, 0) + 1


def _summary(report: dict) -> str:
    lines = [
        f"dataset: {report['dataset_path']}",
        f"parsing: {report.get('files_parsed_now', report['files_seen'])} files parsed now, "
        f"{report.get('files_from_parse_cache', 0)} unchanged files from the parse cache",
        f"files: {report['files_seen']} seen, {report['files_parsed']} parsed, {len(report['files_failed'])} failed, "
        f"{len(report['files_without_chains'])} with no chain kept, {len(report.get('paths_skipped', []))} paths skipped",
        f"chains: {report['chains_seen']} seen, {report['chains_kept']} kept, {len(report['chains_filtered'])} filtered",
    ]
    for reason, count in sorted(report["filter_counts"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {count:6d}  {reason}")
    sizes = ", ".join(
        f"{s} {report['splits'][s]['entries']} entries / {report['splits'][s]['chains']} chains / {report['splits'][s]['residues']} residues"
        for s in SPLITS
    )
    lines.append(f"splits ({report['split_by']}): {sizes}")
    shares = ", ".join(f"{s} {report['splits'][s].get('share', 0):.1%}" for s in SPLITS)
    largest = ", ".join(f"{c['entries']} ({c['split']}, e.g. {c['example']})" for c in report.get("largest_components", [])[:3])
    lines.append(f"  realised shares of entries: {shares}; largest linked groups: {largest}")
    for item in report.get("oversized_components", []):
        lines.append(f"  warning: a group of {item['entries']} linked entries (e.g. {item['example']}) is over "
                     "--max_component_share of a held-out split and went to train")
    if "chains_not_in_cluster_file" in report:
        missing, kept = report["chains_not_in_cluster_file"], max(report["chains_kept"], 1)
        lines.append(f"cluster file: {missing} of {report['chains_kept']} kept chains ({missing / kept:.1%}) are not "
                     "in it and are grouped by identical sequence only")
        if missing / kept > UNCLUSTERED_WARNING_SHARE:
            lines.append(f"  warning: over {UNCLUSTERED_WARNING_SHARE:.0%} of the chains are not in --cluster_file: "
                         "it may predate these entries or name them differently (it must use PDB ids with chain "
                         "ids, 1abc_A); relatives of unclustered chains can land in different splits")
    for item in report.get("paths_skipped", [])[:10]:
        lines.append(f"  skipped: {item['path']}: {item['reason']}")
    failed = report["files_failed"]
    for item in failed[:10]:
        lines.append(f"  failed: {item['file']}: {item['error']}")
    if len(failed) > 10:
        lines.append(f"  ... and {len(failed) - 10} more failed files, listed in {REPORT_NAME}")
    if report.get("files_to_retry"):
        lines.append(f"  {len(report['files_to_retry'])} of the failures were read errors or killed workers, not the "
                     "files' content: the next build tries them again")
    lines.append(f"report: {Path(report['dataset_path']) / REPORT_NAME}  ({report['seconds']:.1f} s)")
    return "\n".join(lines)


def build_dataset(
    pdb_path,
    cache_dir,
    options: BuildOptions | None = None,
    num_proc: int | None = None,
    force: bool = False,
    log=print,
    prune: bool = False,
    listing: InputListing | None = None,
) -> BuildResult:
    """Build (or reuse) the dataset for ``pdb_path`` under ``cache_dir`` and return it with its report.

    The same inputs and options give the same fingerprint and reuse the cache without parsing; a changed,
    added or removed file or option builds anew. An already built dataset folder may be given as ``pdb_path``.
    ``listing``: the inputs as this process already walked them (`list_inputs`).
    """
    options = options or BuildOptions()
    options.validate()
    if isinstance(pdb_path, (str, os.PathLike)) and is_built_dataset(pdb_path):
        return load_built(pdb_path)
    listing = listing or list_inputs(pdb_path)
    files = listing.files
    key = fingerprint(files, options)
    target = Path(cache_dir) / f"protmask-dataset-{key}"
    result = None
    if not force and (result := reusable(target, log)) is not None:
        log(f"reusing the dataset built from these {len(files)} files with these options: {target}")
    if result is None:
        requested = time.time()
        with build_lock(target, cache_dir, log):
            # Another process (a rank on another node, a second build command) may have built it while this one
            # waited for the lock: use that, even with force, since it is newer than this request.
            built_meanwhile = (target / REPORT_NAME).is_file() and (target / REPORT_NAME).stat().st_mtime >= requested
            if (not force or built_meanwhile) and (result := reusable(target, log)) is not None:
                log(f"reusing the dataset another process built from these {len(files)} files meanwhile: {target}")
            else:
                result = DatasetBuild(pdb_path, cache_dir, target, key, listing, options, num_proc, log).run()
    if prune:
        prune_cache(cache_dir, target, {k for k in map(file_key_or_none, map(str, files)) if k}, options.max_file_mb << 20,
                    log)
    return result


class DatasetBuild:
    """One build, for a caller that holds the target's lock: entries (parsed files or ProteinMPNN's set) →
    filtered rows → clusters → splits → the dataset published at ``target``, with its report."""

    def __init__(self, pdb_path, cache_dir, target: Path, key: str, listing: InputListing, options: BuildOptions,
                 num_proc, log):
        self.pdb_path, self.cache_dir, self.target, self.key = pdb_path, cache_dir, target, key
        self.files, self.root, self.options, self.log = listing.files, listing.root, options, log
        self.mpnn_set = isinstance(pdb_path, (str, os.PathLike)) and is_proteinmpnn_set(pdb_path)
        if self.mpnn_set:
            listed = read_list(pdb_path, options)
            self.set_items = [(pdb_id, tuple(chains.values())) for pdb_id, chains in sorted(listed.items())]
            self.cluster_lists = read_cluster_lists(pdb_path)
        inputs = len(self.set_items) if self.mpnn_set else len(self.files)
        self.num_proc = max(1, min(num_proc or usable_cpus(), inputs))
        self.cluster_file = read_cluster_file(options.cluster_file) if options.cluster_file else None
        # One entry per kept row, in row order:
        self.names, self.keys, self.dates, self.sequences, self.clusters, self.set_splits = [], [], [], [], [], []
        self.report = {
            "dataset_path": str(target), "fingerprint": key, "format_version": BUILD_FORMAT_VERSION,
            "inputs": [str(p) for p in ([pdb_path] if isinstance(pdb_path, (str, os.PathLike)) else pdb_path)],
            "options": asdict(options), "num_proc": self.num_proc,
            "built_by": f"pid {os.getpid()} on {socket.gethostname()}", "files_seen": len(self.files),
            "paths_skipped": listing.skipped, "files_parsed": 0, "files_failed": [], "files_without_chains": [],
            "chains_seen": 0, "chains_kept": 0, "chains_filtered": [], "filter_counts": {}, "entries_filtered": [],
        }
        if self.cluster_file is not None:
            self.report["chains_not_in_cluster_file"] = 0

    # ------------------------------------------------------------------------------------------ entries → rows

    def entries(self, parse_cache):
        """(path, row name, entry, error, {chain: cluster} or None) from structure files or ProteinMPNN's set."""
        if not self.mpnn_set:
            for path, entry, error in parsed_files([str(p) for p in self.files], parse_cache, self.options,
                                                   self.num_proc, self.report):
                yield path, entry_name(Path(path), self.root), entry, error, None
            return
        self.report["files_parsed_now"], self.report["files_from_parse_cache"] = len(self.set_items), 0
        load = functools.partial(load_entry, root=str(self.pdb_path))
        results = parse_all(load, self.set_items, self.num_proc) if self.num_proc > 1 else map(load, self.set_items)
        for path, assemblies, error, _ in results:
            if not isinstance(path, str):  # a killed worker reports the item it held
                path = str(Path(self.pdb_path) / "pdb" / path[0][1:3] / path[0])
            if error is not None:
                yield path, None, None, error, None
            for name, entry, chain_clusters in assemblies or []:
                yield path, name, entry, None, dict(zip((c.chain_id for c in entry.chains), chain_clusters))

    def rows(self, parse_cache):
        """The dataset rows, each entry filtered and recorded (`keep`) on the way."""
        report = self.report
        for path, name, entry, error, known_clusters in self.entries(parse_cache):
            if error is not None:
                report["files_failed"].append({"file": path, "error": error})
                continue
            report["files_parsed"] += 1
            report["chains_seen"] += len(entry.chains)
            kept = self.filter(path, entry)
            if not kept:
                report["files_without_chains"].append(path)
                continue
            self.keep(name, entry, kept, known_clusters)
            yield _row(name, path, kept, entry)

    def filter(self, path: str, entry) -> list:
        """The entry's chains that pass the chain and entry filters; every other one reported with its reason."""
        options, report = self.options, self.report
        resolution = entry.chains[0].resolution
        if options.max_resolution is not None and resolution is not None and resolution > options.max_resolution:
            reason = f"resolution {resolution:.2f} Å over --max_resolution {options.max_resolution}"
            report["entries_filtered"].append({"file": path, "reason": reason})
            for chain in entry.chains:
                report["chains_filtered"].append({"file": path, "chain": chain.chain_id, "length": len(chain),
                                                  "reason": reason})
                _count(report, "resolution over --max_resolution")
            return []
        kept, dropped = filter_chains(entry.chains, options)
        for chain, reason in dropped:
            report["chains_filtered"].append({"file": path, "chain": chain.chain_id, "length": len(chain),
                                              "reason": reason})
            _count(report, "too many unknown (X) residues" if "unknown (X)" in reason else reason.split(" (")[0])
        reason = entry_filter(entry, kept, options)
        if reason:
            report["entries_filtered"].append({"file": path, "reason": reason})
            _count(report, reason.split(" (")[0])
            return []
        return kept

    def keep(self, name: str, entry, kept: list, known_clusters: dict | None) -> None:
        """Record a kept row: its split keys (both the chains' sequences and their clusters, always), its date,
        its chains' sequences and clusters (a cluster file's, or ProteinMPNN's list.csv)."""
        self.report["chains_kept"] += len(kept)
        clusters = [None] * len(kept)
        if self.cluster_file is not None:
            for number, chain in enumerate(kept):
                # The entry's PDB id (header, or a wwPDB / PDBe file name), as cluster files name chains.
                clusters[number] = self.cluster_file.get(f"{entry.entry_id}_{chain.chain_id}",
                                                         self.cluster_file.get(f"{Path(name).name.lower()}_{chain.chain_id}"))
                self.report["chains_not_in_cluster_file"] += clusters[number] is None
        if known_clusters is not None:
            clusters = [known_clusters.get(chain.chain_id) or None for chain in kept]
            self.set_splits.append(row_split([c for c in clusters if c], self.cluster_lists))
        self.names.append(name)
        self.keys.append(["seq:" + chain.sequence for chain in kept])
        self.dates.append(entry.release_date or entry.deposition_date)
        self.sequences.append([chain.sequence for chain in kept])
        self.clusters.append(clusters)

    # ------------------------------------------------------------------------------------------ rows → splits

    def cluster(self, full):
        """MMseqs2 clusters when asked for; every known cluster becomes a split key and a `cluster_ids` entry."""
        from datasets import List, Value

        options = self.options
        if options.cluster_identity is not None:
            try:
                clustered = cluster_sequences((q for entry in self.sequences for q in entry), options.cluster_identity,
                                              options.cluster_coverage, self.cache_dir, threads=self.num_proc,
                                              log=self.log)
            except ClusteringError as error:
                raise DatasetBuildError(str(error)) from None
            self.clusters = [[clustered[q] for q in entry] for entry in self.sequences]
            self.report["clusters"] = len(set(clustered.values()))
        for keys, clusters in zip(self.keys, self.clusters):
            keys.extend(f"cluster:{c}" for c in clusters if c is not None)
        if options.cluster_file or options.cluster_identity is not None or self.mpnn_set:
            # One cluster id per kept chain ("" where the cluster file does not know it): what cluster
            # sampling draws from.
            full = full.add_column("cluster_ids", [[c or "" for c in entry] for entry in self.clusters],
                                   feature=List(Value("string")))
        return full

    def split(self, full) -> dict:
        """The three splits, and what they came out as in the report."""
        plan = assign_splits(self.keys, self.options, self.dates)
        if self.mpnn_set:  # the set's own split, exactly: by the clusters in valid_clusters.txt / test_clusters.txt
            plan = SplitPlan(self.set_splits, [], [])
        report = self.report
        report["split_by"] = ("ProteinMPNN's valid_clusters.txt and test_clusters.txt" if self.mpnn_set
                              else describe_split_rule(self.options))
        lengths = np.asarray(full["length"])
        counts = np.asarray([len(entry) for entry in self.sequences])
        splits, report["splits"] = {}, {}
        for split in SPLITS:
            indices = [i for i, s in enumerate(plan.assignment) if s == split]
            splits[split] = full.select(indices)
            report["splits"][split] = {
                "entries": len(indices), "share": round(len(indices) / len(plan.assignment), 4),
                "chains": int(counts[indices].sum()) if indices else 0,
                "residues": int(lengths[indices].sum()) if indices else 0}
        report["entries_without_date"] = sum(d is None for d in self.dates)
        report["largest_components"] = [{"entries": size, "split": split, "example": self.names[first]}
                                        for size, split, first in plan.components[:5]]
        report["oversized_components"] = [{"entries": size, "example": self.names[first]}
                                          for size, first in plan.oversized]
        return splits

    # ------------------------------------------------------------------------------------------ the build

    def run(self) -> BuildResult:
        import datasets
        from datasets import Dataset

        datasets.disable_progress_bars()  # the build prints its own summary; per-step bars would bury it
        started = time.time()
        # Host and pid: two machines sharing --cache_dir may have processes with the same pid.
        staging = self.target.parent / f".{self.target.name}.tmp-{socket.gethostname()}-{os.getpid()}"
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        except OSError as error:
            raise self.unwritable(error) from None
        parse_cache = ParseCache(self.cache_dir, self.options.max_file_mb << 20).load()
        try:
            try:
                full = Dataset.from_generator(lambda: self.rows(parse_cache), features=dataset_features(),
                                              cache_dir=str(staging / "generator"), fingerprint=self.key)
            except ValueError:
                if self.names:  # a generator that yielded rows failed for another reason
                    raise
            self.check_something_kept()
            splits = self.split(self.cluster(full))
            self.report["seconds"] = round(time.time() - started, 2)
            self.report["files_per_second"] = round(len(self.files) / max(self.report["seconds"], 1e-9), 2)
            self.publish(splits, staging / "dataset")
        except OSError as error:
            raise self.unwritable(error, "; nothing half-written was kept") from None
        except DatasetBuildError as error:
            # A refused build still says what happened to every file.
            failed_report = self.target.parent / f"{self.target.name}.failed-{REPORT_NAME}"
            failed_report.write_text(json.dumps(self.report, indent=1))
            raise DatasetBuildError(f"{error}\nfull report: {failed_report}") from None
        finally:
            parse_cache.close()  # what was parsed stays useful, even when this build failed
            shutil.rmtree(staging, ignore_errors=True)
        result = load_built(self.target, check=False)
        result.reused = False
        self.log(_summary(self.report))
        return result

    def check_something_kept(self) -> None:
        report, files = self.report, self.files
        if report["files_parsed"] == 0:
            first = report["files_failed"][0]
            raise DatasetBuildError(f"every one of the {len(files)} files under --pdb_path {self.pdb_path} failed to "
                                    f"parse; the first: {first['file']}: {first['error']}")
        if not self.names:
            traces = any("--backbone ca" in chain["reason"] for chain in report["chains_filtered"])
            hint = "; CA traces are kept for CA-only models with --backbone ca" if traces else ""
            raise DatasetBuildError(f"no chain of the {len(files)} files under --pdb_path {self.pdb_path} passed the "
                                    f"filters (--min_length {self.options.min_length}); see the reasons in "
                                    f"{REPORT_NAME}{hint}")

    def publish(self, splits: dict, folder: Path) -> None:
        """Write the splits and the report, then rename into place: a killed build leaves only a .tmp folder,
        never a dataset that looks complete."""
        from datasets import DatasetDict

        # An empty split must still be written as one (empty) shard, or it cannot be loaded back.
        DatasetDict(splits).save_to_disk(str(folder), num_shards={s: 1 for s in SPLITS if len(splits[s]) == 0} or None)
        self.report["data_files"] = data_file_sizes(folder)
        (folder / REPORT_NAME).write_text(json.dumps(self.report, indent=1))
        shutil.rmtree(self.target, ignore_errors=True)
        os.replace(folder, self.target)

    def unwritable(self, error: OSError, more: str = "") -> DatasetBuildError:
        return DatasetBuildError(f"cannot write the dataset to --cache_dir {self.cache_dir} "
                                 f"({error.strerror or error}); give a writable --cache_dir with free space{more}")
