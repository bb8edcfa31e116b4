"""Parsing a build's files: a bounded process pool that survives killed workers, results from the parse
cache when a file is unchanged, and the chain and entry filters."""

from __future__ import annotations

import collections
import functools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from ..residues import has_backbone
from ..runtime import ignore_stop_signals
from ..structure import StructureError, is_content_error, parse_entry
from .options import BuildOptions
from .parse_cache import file_key

def parse_one(path: str, max_bytes: int):
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


def parsed_files(paths: list[str], parse_cache, options: BuildOptions, num_proc: int, report: dict):
    """(path, entry, error) for every file in order: from the parse cache when the file is unchanged, else
    parsed now (in parallel) and added to the cache. Read errors and killed workers are not cached: they are
    listed in ``report["files_to_retry"]``."""
    keys = [file_key_or_none(p) for p in paths]
    fresh = [p for p, k in zip(paths, keys) if k not in parse_cache]
    report["files_parsed_now"], report["files_from_parse_cache"] = len(fresh), len(paths) - len(fresh)
    parse = functools.partial(parse_one, max_bytes=options.max_file_mb << 20)
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
    needs = "a CA" if options.backbone == "ca" else "a complete backbone"
    for chain in chains:
        complete = int(has_backbone(chain.coords, options.backbone).sum())
        unknown = chain.sequence.count("X") / len(chain.sequence)
        if complete == 0:
            reason = ("no residue with a CA" if options.backbone == "ca" else
                      "no residue with a complete N, CA, C, O backbone (CA-only or partial model; --backbone ca keeps "
                      "CA traces for CA-only models)")
        elif complete < options.min_length:
            reason = f"fewer than {options.min_length} residues with {needs} ({complete})"
        elif unknown > options.max_unknown_fraction:
            reason = f"{unknown:.0%} of residues are unknown (X), over --max_unknown_fraction {options.max_unknown_fraction}"
        else:
            kept.append(chain)
            continue
        dropped.append((chain, reason))
    return kept, dropped
