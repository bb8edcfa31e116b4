"""A built dataset on disk: loading and checking it, reusing a cached build, the build and reader locks, and
pruning old builds."""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..locking import LockHeld, exclusive_lock, shared_lock
from .discovery import is_built_dataset
from .options import REPORT_NAME, SPLITS, DatasetBuildError
from .parse_cache import ParseCache

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
