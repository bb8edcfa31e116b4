"""Structure files → an Arrow ``DatasetDict`` (train / validation / test) cached on disk, built in parallel,
fingerprinted by its inputs and options, with a report that accounts for every file."""

from __future__ import annotations

import collections
import contextlib
import csv
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..runtime import ignore_stop_signals, usable_cpus
from .clusters import ClusteringError, cluster_sequences, find_mmseqs
from ..structure import StructureError, is_content_error, is_structure_file, parse_entry
from ..locking import LockHeld, exclusive_lock, shared_lock
from .parse_cache import ParseCache, file_key
from .proteinmpnn_set import index_files, is_proteinmpnn_set, load_entry, read_cluster_lists, read_list, row_split

#: Bump when the row layout or the parsing rules change, so that old caches are rebuilt.
BUILD_FORMAT_VERSION = 2
#: Above this share of kept chains missing from --cluster_file, the build warns.
UNCLUSTERED_WARNING_SHARE = 0.05
REPORT_NAME = "build_report.json"
SPLITS = ("train", "validation", "test")
LIST_SUFFIXES = (".txt", ".list", ".lst")


class DatasetBuildError(ValueError):
    """The inputs cannot make a dataset; the message says which path or option and what to do."""


@dataclass
class BuildOptions:
    """What decides the content of a built dataset (all of it enters the cache fingerprint)."""

    min_length: int = 20
    max_resolution: float | None = None
    max_unknown_fraction: float = 0.5
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    cluster_file: str | None = None
    cluster_identity: float | None = None  # MMseqs2 clustering of the kept chains
    cluster_coverage: float = 0.8
    split_seed: int = 0
    test_release_after: str | None = None  # ISO dates: the date split
    validation_release_after: str | None = None
    max_component_share: float = 0.5
    date_cutoff: str | None = None  # entries deposited after it are left out (ProteinMPNN's DATCUT)
    max_entry_length: int | None = None  # entries with more kept residues are left out (its max_protein_length)
    max_file_mb: int = 512

    def validate(self) -> None:
        if self.min_length < 1:
            raise DatasetBuildError(f"--min_length must be at least 1, got {self.min_length}")
        if self.max_resolution is not None and self.max_resolution <= 0:
            raise DatasetBuildError(f"--max_resolution must be positive (Å), got {self.max_resolution}")
        if not 0.0 <= self.max_unknown_fraction <= 1.0:
            raise DatasetBuildError(f"--max_unknown_fraction must be in [0, 1], got {self.max_unknown_fraction}")
        for name in ("validation_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise DatasetBuildError(f"--{name} must be in [0, 1), got {value}")
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise DatasetBuildError("--validation_fraction + --test_fraction must leave some data for training (sum < 1)")
        if (self.test_release_after and self.validation_release_after
                and self.validation_release_after > self.test_release_after):
            raise DatasetBuildError(f"--validation_release_after {self.validation_release_after} is after "
                                    f"--test_release_after {self.test_release_after}: validation must come before test")
        if not 0.0 < self.max_component_share <= 1.0:
            raise DatasetBuildError(f"--max_component_share must be in (0, 1], got {self.max_component_share}")
        if self.cluster_identity is not None:
            if self.cluster_file:
                raise DatasetBuildError("give --cluster_file or --cluster_identity, not both")
            if not 0.0 < self.cluster_identity <= 1.0 or not 0.0 <= self.cluster_coverage <= 1.0:
                raise DatasetBuildError(f"--cluster_identity must be in (0, 1] and --cluster_coverage in [0, 1], got "
                                        f"{self.cluster_identity} and {self.cluster_coverage}")
            try:
                find_mmseqs()
            except ClusteringError as error:
                raise DatasetBuildError(str(error)) from None
        if self.max_file_mb < 1:
            raise DatasetBuildError(f"--max_file_mb must be at least 1, got {self.max_file_mb}")
        if self.cluster_file is not None and not Path(self.cluster_file).is_file():
            raise DatasetBuildError(f"--cluster_file {self.cluster_file} does not exist; give a TSV of chain → cluster id")


@dataclass
class BuildResult:
    path: Path
    dataset: object  # datasets.DatasetDict
    report: dict
    reused: bool = False
    notes: list = field(default_factory=list)
    reading: object = None  # the shared lock that keeps --prune away while this process reads the dataset


def readers_lock_path(dataset: Path) -> Path:
    return dataset.parent / f".{dataset.name}.readers"


def hold_for_reading(built: BuildResult) -> BuildResult:
    """Take a shared lock on the dataset for as long as this process lives (a training run memory-maps its
    Arrow files): `prune_cache` leaves a dataset alone while any process holds one."""
    if built.reading is None:
        built.reading = shared_lock(readers_lock_path(Path(built.path)))
    return built


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


def is_built_dataset(path) -> bool:
    return (Path(path) / "dataset_dict.json").is_file()


def find_structure_files(pdb_path, flag: str = "--pdb_path", skipped: list | None = None) -> tuple[list[Path], Path]:
    """The structure files a ``--pdb_path`` names, and the folder their names are made relative to.

    Accepts a folder (searched recursively, following symbolic links), one structure file, or a text file
    listing paths one a line (relative paths are read from the list file's folder). Fails before any work when
    nothing is there. Paths that cannot be followed (dangling links, link loops, unreadable folders) are
    appended to ``skipped`` as ``{"path", "reason"}``.
    """
    skipped = [] if skipped is None else skipped
    paths = [Path(p) for p in ([pdb_path] if isinstance(pdb_path, (str, os.PathLike)) else pdb_path)]
    files, roots = [], []
    for path in paths:
        if not path.exists():
            raise DatasetBuildError(f"{flag} {path} does not exist; give a folder of PDB/mmCIF files, a file, or a list file")
        if path.is_dir():
            found = walk_folder(path.absolute(), skipped)
            if not found:
                raise DatasetBuildError(
                    f"{flag} {path} holds no structure files (*.pdb, *.ent, *.cif, *.mmcif, optionally .gz)"
                )
            files += found
            roots.append(path.absolute())
        elif is_structure_file(path):
            files.append(path.absolute())
            roots.append(path.absolute().parent)
        elif path.name.lower().endswith(LIST_SUFFIXES):
            listed = []
            for line in path.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    item = Path(line)
                    listed.append(item if item.is_absolute() else path.absolute().parent / item)
            if not listed:
                raise DatasetBuildError(f"{flag} {path} is a list file with no paths in it")
            files += listed
            roots.append(path.absolute().parent)
        else:
            raise DatasetBuildError(
                f"{flag} {path} is neither a folder, a structure file, a list file ({', '.join(LIST_SUFFIXES)}) "
                "nor a built dataset"
            )
    root = Path(os.path.commonpath([str(r) for r in roots])) if roots else Path(".")
    unique = {}
    for file in files:  # one entry per real file, named by the first path it was found under
        unique.setdefault(os.path.realpath(file), file)
    return list(unique.values()), root


def walk_folder(folder: Path, skipped: list) -> list[Path]:
    """Structure files under ``folder``, sorted, following symbolic links to folders once each: a link back to a
    folder already visited (a loop, or a second link to it) is recorded in ``skipped``, as are dangling links
    and folders that cannot be read."""
    found, visited = [], set()

    def visit(directory: Path) -> None:
        try:
            status = directory.stat()
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as error:
            skipped.append({"path": str(directory), "reason": f"unreadable folder ({error.strerror or error})"})
            return
        if (status.st_dev, status.st_ino) in visited:
            skipped.append({"path": str(directory), "reason": "folder already visited (a symbolic link loop or a "
                                                              "second link to the same folder)"})
            return
        visited.add((status.st_dev, status.st_ino))
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_dir(follow_symlinks=True):
                    visit(path)
                elif entry.is_file(follow_symlinks=True):
                    if is_structure_file(path):
                        found.append(path)
                elif entry.is_symlink():
                    skipped.append({"path": str(path), "reason": f"dangling symbolic link to {os.readlink(path)}"})
            except OSError as error:
                skipped.append({"path": str(path), "reason": f"cannot be read ({error.strerror or error})"})

    visit(folder)
    return found


@dataclass
class InputListing:
    """One walk of a --pdb_path: its structure files, the folder names are relative to, what was skipped.
    A walk of a 200 000-file mirror on a network file system takes minutes: a process walks it once and
    hands the listing to the fingerprint and the build."""

    files: list
    root: Path
    skipped: list


def list_inputs(pdb_path) -> InputListing:
    if isinstance(pdb_path, (str, os.PathLike)) and is_proteinmpnn_set(pdb_path):
        # ProteinMPNN's training set is defined by its index files (list.csv and the cluster lists).
        return InputListing(index_files(pdb_path), Path(pdb_path), [])
    skipped = []
    files, root = find_structure_files(pdb_path, skipped=skipped)
    return InputListing(files, root, skipped)


def dataset_fingerprint(pdb_path, options: "BuildOptions", listing: InputListing | None = None) -> str:
    """The fingerprint a build of ``pdb_path`` has (or will have), without building: a run checks it on resume."""
    if isinstance(pdb_path, (str, os.PathLike)) and is_built_dataset(pdb_path):
        report = Path(pdb_path) / REPORT_NAME
        return json.loads(report.read_text()).get("fingerprint", str(pdb_path)) if report.is_file() else str(pdb_path)
    return fingerprint((listing or list_inputs(pdb_path)).files, options)


def entry_name(path: Path, root: Path) -> str:
    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        rel = path.name
    lower = rel.lower()
    if lower.endswith(".gz"):
        rel, lower = rel[:-3], lower[:-3]
    return rel.rsplit(".", 1)[0] if "." in Path(rel).name else rel


def fingerprint(files: list[Path], options: BuildOptions) -> str:
    """A hash of every input file's path, size and modification time, the options and the format version."""
    import Bio

    digest = hashlib.sha256()
    digest.update(json.dumps({"format": BUILD_FORMAT_VERSION, "biopython": Bio.__version__, "options": asdict(options)},
                             sort_keys=True).encode())
    if options.cluster_file:
        digest.update(Path(options.cluster_file).read_bytes())
    for path in files:
        try:
            stat = path.stat()
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()[:16]


def _parse_one(path: str, max_bytes: int):
    """Worker: parse one file; every failure comes back as data, never as an exception.

    Returns (path, entry, error, cacheable): only results the file's bytes determine are cacheable; an I/O
    error, a missing file or a worker out of memory is this build's failure and is tried again next time."""
    try:
        return path, parse_entry(path, max_bytes), None, True
    except StructureError as error:
        return path, None, error.reason, not error.transient
    except MemoryError:
        return path, None, "out of memory while parsing", False
    except Exception as error:  # a Biopython or I/O failure we did not foresee still must not stop the build
        return path, None, f"{type(error).__name__}: {error}", is_content_error(error)


KILLED_WORKER = "the parse worker was killed"


def file_key_or_none(path: str) -> str | None:
    try:
        return file_key(path)
    except OSError:  # gone since it was listed: parsing it reports why
        return None


#: Files handed to the pool ahead of the one being written, per worker: enough to keep every worker busy,
#: few enough that results never pile up when writing falls behind.
FILES_IN_FLIGHT_PER_WORKER = 4


def parse_all(parse, paths: list[str], num_proc: int):
    """``parse`` over ``paths`` in ``num_proc`` worker processes, results in order, with at most
    ``num_proc * FILES_IN_FLIGHT_PER_WORKER`` files submitted and not yet consumed. A worker that dies (the OS
    killed it for memory, a crash) breaks the pool: the file it held is parsed again alone, and if its worker
    dies again it is reported as that file's failure; the rest go on in a fresh pool."""
    # fork: no re-import of the caller's __main__ (scripts without a main guard work), cheap start.
    context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    window = max(1, num_proc * FILES_IN_FLIGHT_PER_WORKER)
    done = 0
    while done < len(paths):
        with ProcessPoolExecutor(num_proc, mp_context=context, initializer=ignore_stop_signals) as pool:
            pending, queued = collections.deque(), done
            try:
                while done < len(paths):
                    while queued < len(paths) and len(pending) < window:
                        pending.append(pool.submit(parse, paths[queued]))
                        queued += 1
                    result = pending.popleft().result()
                    done += 1
                    yield result
            except BrokenProcessPool:
                for future in pending:
                    future.cancel()
        if done < len(paths):  # the pool broke at paths[done]: try that file alone
            with ProcessPoolExecutor(1, mp_context=context, initializer=ignore_stop_signals) as alone:
                try:
                    yield alone.submit(parse, paths[done]).result()
                except BrokenProcessPool:
                    yield paths[done], None, f"{KILLED_WORKER} while reading this file (out of memory?)", False
            done += 1


def entry_filter(entry, kept, options: BuildOptions) -> str | None:
    """Why a whole entry is left out by --date_cutoff or --max_entry_length, or None."""
    date = entry.deposition_date or entry.release_date
    if options.date_cutoff and date and date > options.date_cutoff:
        return f"deposited after --date_cutoff ({date} > {options.date_cutoff})"
    residues = sum(len(chain) for chain in kept)
    if options.max_entry_length and residues > options.max_entry_length:
        return f"longer than --max_entry_length ({residues} > {options.max_entry_length} residues)"
    return None


def filter_chains(chains, options: BuildOptions):
    """(kept, [(chain, reason)]): the chain filters of a build, shared with evaluation."""
    kept, dropped = [], []
    for chain in chains:
        complete = int(chain.backbone_complete.sum())
        unknown = chain.sequence.count("X") / len(chain.sequence)
        if complete == 0:
            reason = "no residue with a complete N, CA, C, O backbone (CA-only or partial model)"
        elif complete < options.min_length:
            reason = f"fewer than {options.min_length} residues with a complete backbone ({complete})"
        elif unknown > options.max_unknown_fraction:
            reason = f"{unknown:.0%} of residues are unknown (X), over --max_unknown_fraction {options.max_unknown_fraction}"
        else:
            kept.append(chain)
            continue
        dropped.append((chain, reason))
    return kept, dropped


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


def read_cluster_file(path) -> dict[str, str]:
    """Chain → cluster id, from a two-column TSV (``1abc_A<TAB>cluster``) or ProteinMPNN's ``list.csv``."""
    text = Path(path).read_text()
    dialect = "excel-tab" if "\t" in text.splitlines()[0] else "excel"
    rows = list(csv.reader(text.splitlines(), dialect=dialect))
    if not rows:
        raise DatasetBuildError(f"--cluster_file {path} is empty")
    header = [h.strip().upper() for h in rows[0]]
    if "CHAINID" in header and "CLUSTER" in header:
        key_col, cluster_col, rows = header.index("CHAINID"), header.index("CLUSTER"), rows[1:]
    else:
        key_col, cluster_col = 0, 1
    mapping = {}
    for number, row in enumerate(rows, 1):
        if not row or row[0].startswith("#"):
            continue
        if len(row) <= max(key_col, cluster_col):
            raise DatasetBuildError(f"--cluster_file {path}, line {number}: expected 'entry_chain<TAB>cluster', got {row}")
        key = row[key_col].strip().replace(":", "_")
        entry, _, chain = key.rpartition("_")
        mapping[f"{entry.lower()}_{chain}"] = row[cluster_col].strip()
    return mapping


@dataclass
class SplitPlan:
    """Where every entry goes, and what the split looks like: one split name per entry, the linked groups
    (components) largest first as (entries, split, first member), and a warning per oversized group."""

    assignment: list[str]
    components: list[tuple[int, str, int]]
    oversized: list[tuple[int, int]]  # (entries, first member) of groups sent to train for their size


def linked_components(groups: list[list[str]]) -> list[list[int]]:
    """Entries linked by a shared key (a chain sequence or a cluster id), directly or through others."""
    parent = list(range(len(groups)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner = {}
    for i, keys in enumerate(groups):
        for key in keys:
            ri, rj = find(i), find(owner.setdefault(key, i))
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    components: dict[int, list[int]] = {}
    for i in range(len(groups)):
        components.setdefault(find(i), []).append(i)
    return list(components.values())


def split_position(key: str, seed: int) -> float:
    """A component's place in [0, 1): its smallest key hashed with --split_seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "big") / 2**64


def describe_split_rule(options: BuildOptions) -> str:
    linked = ("cluster file and identical chain sequence" if options.cluster_file else
              f"MMseqs2 clusters ({options.cluster_identity:.0%} identity, {options.cluster_coverage:.0%} coverage) and "
              "identical chain sequence" if options.cluster_identity is not None else "identical chain sequence")
    dated = [f"{split} after {date}" for split, date in (("test", options.test_release_after),
                                                          ("validation", options.validation_release_after)) if date]
    return linked + (f"; by release date: {', '.join(dated)}" if dated else "") + f"; split seed {options.split_seed}"


def assign_splits(groups: list[list[str]], options: BuildOptions, dates: list[str | None] | None = None) -> SplitPlan:
    """Split entries so that entries sharing a chain sequence or a cluster land in the same split, and an
    entry's split depends only on its own component (the entries linked to it): adding or changing files
    moves no entry whose component is unchanged.

    ``groups[i]`` lists the keys of entry ``i``; ``dates[i]`` its release date (ISO) or None. A component
    goes to test when one of its entries is released after --test_release_after, else to validation when
    one is after --validation_release_after; the splits without a date rule take the rest by the component's
    `split_position` and the fractions. A component larger than --max_component_share of the target size of
    the held-out split it falls in (its fraction of the entries, or for a date split what the dates give) goes
    to train instead. On a handful of entries a fraction split asked for may
    come out empty: it then takes the train component whose position lies nearest above its range.
    """
    dates = dates or [None] * len(groups)
    components = linked_components(groups)
    by_date = {"test": options.test_release_after, "validation": options.validation_release_after}
    fractions = {"test": 0.0 if by_date["test"] else options.test_fraction,
                 "validation": 0.0 if by_date["validation"] else options.validation_fraction}
    bounds = {"test": fractions["test"], "validation": fractions["test"] + fractions["validation"]}

    def date_split(members):
        for split in ("test", "validation"):
            if by_date[split] and any(dates[i] and dates[i] > by_date[split] for i in members):
                return split
        return None

    chosen, positions = {}, {}
    for number, members in enumerate(components):
        positions[number] = split_position(min(k for i in members for k in groups[i]), options.split_seed)
        position = positions[number]
        chosen[number] = date_split(members) or ("test" if position < bounds["test"] else
                                                 "validation" if position < bounds["validation"] else "train")
    targets = {split: (fractions[split] * len(groups) if not by_date[split] else
                       sum(len(m) for n, m in enumerate(components) if chosen[n] == split)) for split in by_date}
    caps = {split: max(1.0, options.max_component_share * target) for split, target in targets.items()}
    oversized = []
    for number, members in enumerate(components):
        if chosen[number] != "train" and len(members) > caps[chosen[number]]:
            chosen[number] = "train"
            oversized.append((len(members), members[0]))
    if len(groups) >= 3:
        for split in ("test", "validation"):
            if fractions[split] > 0 and split not in chosen.values():
                candidates = [n for n in chosen if chosen[n] == "train" and len(components[n]) <= caps[split]]
                if len(candidates) > 1:
                    chosen[min(candidates, key=lambda n: (positions[n] - bounds[split]) % 1.0)] = split
    assignment = ["train"] * len(groups)
    for number, members in enumerate(components):
        for i in members:
            assignment[i] = chosen[number]
    largest = sorted(((len(m), chosen[n], m[0]) for n, m in enumerate(components)), key=lambda c: (-c[0], c[2]))
    return SplitPlan(assignment, largest, oversized)


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


def data_file_sizes(folder: Path) -> dict[str, int]:
    """Size of every Arrow and metadata file of a saved dataset, recorded at build time and checked on load."""
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name != REPORT_NAME and (f.suffix in (".arrow", ".json"))}


def dataset_damage(path: Path) -> str | None:
    """What is wrong with a built dataset folder (a file missing, truncated or unreadable), or None."""
    from datasets import load_from_disk

    report_path = path / REPORT_NAME
    recorded = json.loads(report_path.read_text()).get("data_files", {}) if report_path.is_file() else {}
    for name, size in recorded.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} when it was built"
    try:
        dataset = load_from_disk(str(path))
        for split in dataset.values():
            if len(split):
                split[len(split) - 1]  # reads the last row: a truncated Arrow file fails here
    except Exception as error:  # datasets and pyarrow raise many types for a damaged folder
        return f"{type(error).__name__}: {error}".splitlines()[0][:300]
    return None


def load_built(path, check: bool = True) -> BuildResult:
    from datasets import load_from_disk

    path = Path(path)
    if check and (damage := dataset_damage(path)) is not None:
        raise DatasetBuildError(
            f"the dataset {path} is damaged ({damage}); build it again from its structure files: protmask "
            "build-dataset --pdb_path FILES --cache_dir DIR --force, or train_accelerate.py --rebuild_dataset")
    report_path = path / REPORT_NAME
    report = json.loads(report_path.read_text()) if report_path.is_file() else {"dataset_path": str(path)}
    dataset = load_from_disk(str(path))
    missing = [s for s in SPLITS if s not in dataset]
    if missing:
        raise DatasetBuildError(f"{path} is a dataset without the split(s) {missing}; rebuild it with protmask build-dataset")
    return BuildResult(path=path, dataset=dataset, report=report, reused=True)


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
    files, root, skipped = listing.files, listing.root, listing.skipped
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
                result = _build(pdb_path, cache_dir, target, key, files, root, skipped, options, num_proc, log)
    if prune:
        prune_cache(cache_dir, target, {k for k in map(file_key_or_none, map(str, files)) if k}, options.max_file_mb << 20,
                    log)
    return result


def prune_cache(cache_dir, keep: Path, live_keys: set[str], max_bytes: int, log=print) -> None:
    """Remove every other dataset build in ``cache_dir`` (not one being built, not one a run is reading: their
    locks are held) and drop parse results of files no longer in the inputs."""
    removed, in_use = 0, []
    for folder in Path(cache_dir).glob("protmask-dataset-*"):
        if not folder.is_dir() or folder.resolve() == keep.resolve():
            continue
        try:
            building = exclusive_lock(folder.parent / f".{folder.name}.lock")
        except LockHeld:
            continue
        with building:
            try:
                reading = exclusive_lock(readers_lock_path(folder))
            except LockHeld:
                in_use.append(folder.name)
                continue
            with reading:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
            readers_lock_path(folder).unlink(missing_ok=True)
        (folder.parent / f".{folder.name}.lock").unlink(missing_ok=True)
    dropped = ParseCache(cache_dir, max_bytes).compact(live_keys)
    log(f"--prune: removed {removed} superseded dataset build(s) and {dropped} stale parse results from {cache_dir}"
        + (f"; kept {len(in_use)} that running jobs are reading ({', '.join(in_use)}): prune again after they end"
           if in_use else ""))


def reusable(target: Path, log) -> BuildResult | None:
    """The cached build at ``target`` when it is complete and undamaged, else None (saying why if damaged)."""
    if not (is_built_dataset(target) and (target / REPORT_NAME).is_file()):
        return None
    damage = dataset_damage(target)
    if damage is not None:
        log(f"the cached dataset {target} is damaged ({damage}); building it again")
        return None
    result = load_built(target, check=False)
    retry = result.report.get("files_to_retry") or []
    if retry:
        log(f"the cached dataset {target} lacks {len(retry)} file(s) that failed to read when it was built "
            f"({retry[0]}{', ...' if len(retry) > 1 else ''}); building it again (the others come from the parse cache)")
        return None
    return result


@contextlib.contextmanager
def build_lock(target: Path, cache_dir, log):
    """Hold ``.<target>.lock`` while building and publishing: processes that build the same inputs into one
    --cache_dir (ranks of several nodes, two commands) take turns, and the later ones reuse the result."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle = exclusive_lock(target.parent / f".{target.name}.lock", wait=True, on_busy=lambda holder: log(
            f"waiting for another build of the same dataset ({holder})"))
    except OSError as error:
        raise DatasetBuildError(f"cannot write the dataset to --cache_dir {cache_dir} ({error.strerror or error}); "
                                "give a writable --cache_dir with free space") from None
    with handle:
        yield


def _build(pdb_path, cache_dir, target: Path, key: str, files, root, skipped, options, num_proc, log) -> BuildResult:
    """Parse every file, filter, split and publish the dataset at ``target`` (the caller holds its lock)."""
    import datasets
    from datasets import Dataset, DatasetDict, List, Value

    # The build prints its own summary; datasets' per-step bars would bury it.
    datasets.disable_progress_bars()
    started = time.time()
    mpnn_set = is_proteinmpnn_set(pdb_path) if isinstance(pdb_path, (str, os.PathLike)) else False
    if mpnn_set:
        listed = read_list(pdb_path, options)
        cluster_lists = read_cluster_lists(pdb_path)
        set_items = [(pdb_id, tuple(chains.values())) for pdb_id, chains in sorted(listed.items())]
    num_proc = max(1, min(num_proc or usable_cpus(), len(set_items) if mpnn_set else len(files)))
    # Host and pid: two machines sharing --cache_dir may have processes with the same pid.
    staging = target.parent / f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    except OSError as error:
        raise DatasetBuildError(f"cannot write the dataset to --cache_dir {cache_dir} ({error.strerror or error}); "
                                "give a writable --cache_dir with free space") from None

    report = {
        "dataset_path": str(target),
        "fingerprint": key,
        "format_version": BUILD_FORMAT_VERSION,
        "inputs": [str(p) for p in ([pdb_path] if isinstance(pdb_path, (str, os.PathLike)) else pdb_path)],
        "options": asdict(options),
        "num_proc": num_proc,
        "built_by": f"pid {os.getpid()} on {socket.gethostname()}",
        "files_seen": len(files),
        "paths_skipped": skipped,
        "files_parsed": 0,
        "files_failed": [],
        "files_without_chains": [],
        "chains_seen": 0,
        "chains_kept": 0,
        "chains_filtered": [],
        "filter_counts": {},
        "entries_filtered": [],
    }
    groups, names, chain_counts, dates, chain_sequences, chain_clusters, set_splits = [], [], [], [], [], [], []
    clusters = read_cluster_file(options.cluster_file) if options.cluster_file else None
    unclustered = 0

    parse_cache = ParseCache(cache_dir, options.max_file_mb << 20).load()

    def parsed():
        """(path, entry, error) for every file in order: from the parse cache when the file is unchanged,
        else parsed now (in parallel) and added to the cache."""
        paths = [str(p) for p in files]
        keys = [file_key_or_none(p) for p in paths]
        fresh = [p for p, k in zip(paths, keys) if k not in parse_cache]
        report["files_parsed_now"], report["files_from_parse_cache"] = len(fresh), len(paths) - len(fresh)
        parse = functools.partial(_parse_one, max_bytes=options.max_file_mb << 20)
        results = iter(parse_all(parse, fresh, num_proc) if num_proc > 1 else map(parse, fresh))
        for path, key in zip(paths, keys):
            if key in parse_cache:
                yield (path, *parse_cache.get(key, path))
                continue
            _, entry, error, cacheable = next(results)
            if key is not None and cacheable:  # a read error or a killed worker may not recur
                parse_cache.add(key, entry, error)
            elif error is not None:
                report.setdefault("files_to_retry", []).append(path)
            yield path, entry, error

    def entries():
        """(path, row name, entry, error, {chain: cluster} or None) from structure files or ProteinMPNN's set."""
        if not mpnn_set:
            for path, entry, error in parsed():
                yield path, entry_name(Path(path), root), entry, error, None
            return
        report["files_parsed_now"], report["files_from_parse_cache"] = len(set_items), 0
        load = functools.partial(load_entry, root=str(pdb_path))
        for path, assemblies, error, _ in (parse_all(load, set_items, num_proc) if num_proc > 1 else map(load, set_items)):
            path = path if isinstance(path, str) else str(Path(pdb_path) / "pdb" / path[0][1:3] / path[0])  # killed worker
            if error is not None:
                yield path, None, None, error, None
            for name, entry, chain_clusters_of in assemblies or []:
                yield path, name, entry, None, dict(zip((c.chain_id for c in entry.chains), chain_clusters_of))

    def rows():
        nonlocal unclustered
        for path, rel, entry, error, known_clusters in entries():
            if error is not None:
                report["files_failed"].append({"file": path, "error": error})
                continue
            chains = entry.chains
            report["files_parsed"] += 1
            report["chains_seen"] += len(chains)
            resolution = chains[0].resolution
            if options.max_resolution is not None and resolution is not None and resolution > options.max_resolution:
                reason = f"resolution {resolution:.2f} Å over --max_resolution {options.max_resolution}"
                report["entries_filtered"].append({"file": path, "reason": reason})
                for chain in chains:
                    report["chains_filtered"].append({"file": path, "chain": chain.chain_id, "length": len(chain), "reason": reason})
                    _count(report, "resolution over --max_resolution")
                report["files_without_chains"].append(path)
                continue
            kept, dropped = filter_chains(chains, options)
            for chain, reason in dropped:
                report["chains_filtered"].append({"file": path, "chain": chain.chain_id, "length": len(chain), "reason": reason})
                _count(report, "too many unknown (X) residues" if "unknown (X)" in reason else reason.split(" (")[0])
            reason = entry_filter(entry, kept, options)
            if reason:
                report["entries_filtered"].append({"file": path, "reason": reason})
                _count(report, reason.split(" (")[0])
                kept = []
            if not kept:
                report["files_without_chains"].append(path)
                continue
            report["chains_kept"] += len(kept)
            # Both keys, always: an identical sequence links entries whether or not the cluster file knows them.
            keys = ["seq:" + chain.sequence for chain in kept]
            chain_clusters.append([None] * len(kept))
            if clusters is not None:
                for number, chain in enumerate(kept):
                    # The entry's PDB id (header, or a wwPDB / PDBe file name), as cluster files name chains.
                    cluster = clusters.get(f"{entry.entry_id}_{chain.chain_id}",
                                           clusters.get(f"{Path(rel).name.lower()}_{chain.chain_id}"))
                    if cluster is None:
                        unclustered += 1
                    else:
                        chain_clusters[-1][number] = cluster
            if known_clusters is not None:  # ProteinMPNN's list.csv clusters
                chain_clusters[-1] = [known_clusters.get(chain.chain_id) or None for chain in kept]
                set_splits.append(row_split([c for c in chain_clusters[-1] if c], cluster_lists))
            chain_sequences.append([chain.sequence for chain in kept])
            groups.append(keys)
            chain_counts.append(len(kept))
            dates.append(entry.release_date or entry.deposition_date)
            names.append(rel)
            yield _row(rel, path, kept, entry)

    try:
        try:
            full = Dataset.from_generator(
                rows, features=dataset_features(), cache_dir=str(staging / "generator"), fingerprint=key
            )
        except ValueError:
            if names:  # a generator that yielded rows failed for another reason
                raise
        if report["files_parsed"] == 0:
            raise DatasetBuildError(
                f"every one of the {len(files)} files under --pdb_path {pdb_path} failed to parse; the first: "
                f"{report['files_failed'][0]['file']}: {report['files_failed'][0]['error']}"
            )
        if len(names) == 0:
            raise DatasetBuildError(
                f"no chain of the {len(files)} files under --pdb_path {pdb_path} passed the filters "
                f"(--min_length {options.min_length}); see the reasons in {REPORT_NAME}"
            )
        if options.cluster_identity is not None:
            try:
                clustered = cluster_sequences((q for entry in chain_sequences for q in entry), options.cluster_identity,
                                              options.cluster_coverage, cache_dir, threads=num_proc, log=log)
            except ClusteringError as error:
                raise DatasetBuildError(str(error)) from None
            chain_clusters = [[clustered[q] for q in entry] for entry in chain_sequences]
            report["clusters"] = len(set(clustered.values()))
        for keys, clusters_of_entry in zip(groups, chain_clusters):
            keys.extend(f"cluster:{c}" for c in clusters_of_entry if c is not None)
        if options.cluster_file or options.cluster_identity is not None or mpnn_set:
            # One cluster id per kept chain ("" where the cluster file does not know it): what cluster
            # sampling draws from.
            full = full.add_column("cluster_ids", [[c or "" for c in entry] for entry in chain_clusters],
                                   feature=List(Value("string")))
        plan = assign_splits(groups, options, dates)
        if mpnn_set:  # the set's own split, exactly: by the clusters in valid_clusters.txt / test_clusters.txt
            plan = SplitPlan(set_splits, [], [])
        assignment = plan.assignment
        splits = {}
        for split in SPLITS:
            indices = [i for i, s in enumerate(assignment) if s == split]
            splits[split] = full.select(indices)
        report["split_by"] = ("ProteinMPNN's valid_clusters.txt and test_clusters.txt" if mpnn_set
                              else describe_split_rule(options))
        if clusters is not None:
            report["chains_not_in_cluster_file"] = unclustered
        report["splits"] = {}
        lengths = np.asarray(full["length"])
        counts = np.asarray(chain_counts)
        for split in SPLITS:
            indices = [i for i, s in enumerate(assignment) if s == split]
            report["splits"][split] = {
                "entries": len(indices),
                "share": round(len(indices) / len(assignment), 4),
                "chains": int(counts[indices].sum()) if indices else 0,
                "residues": int(lengths[indices].sum()) if indices else 0,
            }
        report["entries_without_date"] = sum(d is None for d in dates)
        report["largest_components"] = [{"entries": size, "split": split, "example": names[first]}
                                        for size, split, first in plan.components[:5]]
        report["oversized_components"] = [{"entries": size, "example": names[first]} for size, first in plan.oversized]
        report["seconds"] = round(time.time() - started, 2)
        report["files_per_second"] = round(len(files) / max(report["seconds"], 1e-9), 2)
        final_dir = staging / "dataset"
        # An empty split must still be written as one (empty) shard, or it cannot be loaded back.
        DatasetDict(splits).save_to_disk(
            str(final_dir), num_shards={s: 1 for s in SPLITS if len(splits[s]) == 0} or None
        )
        report["data_files"] = data_file_sizes(final_dir)
        (final_dir / REPORT_NAME).write_text(json.dumps(report, indent=1))
        # Rename last: a killed build leaves only a .tmp folder, never a dataset that looks complete.
        shutil.rmtree(target, ignore_errors=True)
        os.replace(final_dir, target)
    except OSError as error:
        raise DatasetBuildError(f"cannot write the dataset to --cache_dir {cache_dir} ({error.strerror or error}); "
                                "give a writable --cache_dir with free space; nothing half-written was kept") from None
    except DatasetBuildError as error:
        # A refused build still says what happened to every file.
        failed_report = target.parent / f"{target.name}.failed-{REPORT_NAME}"
        failed_report.write_text(json.dumps(report, indent=1))
        raise DatasetBuildError(f"{error}\nfull report: {failed_report}") from None
    finally:
        parse_cache.close()  # what was parsed stays useful, even when this build failed
        shutil.rmtree(staging, ignore_errors=True)
    result = load_built(target, check=False)
    result.reused = False
    log(_summary(report))
    return result
