"""The dataset of a training job: built (or found) once per machine, handed to the machine's other ranks,
checked to be the same on every rank, and held against --prune while the run lives."""

from __future__ import annotations

import datetime
import hashlib
import socket

import numpy as np
import torch

from .errors import TrainingError


def load_data(accelerator, args, say, listing=None):
    """The dataset, built once per machine: each machine's first process walks the inputs and builds (or
    finds the cache) while the others wait in a group of their own, whose timeout is --dataset_build_timeout,
    so that training collectives can keep a short --process_group_timeout; then it hands the built folder to
    the other processes of its machine. Machines sharing --cache_dir build it once (the build holds a lock and
    later ones reuse it); node-local --cache_dir folders each get their own copy, and `check_same_dataset`
    makes sure they hold the same data."""
    from ..data.arguments import build_options
    from ..data.build import DatasetBuildError, build_dataset, hold_for_reading, load_built

    outcome, path = "ok", None
    if accelerator.is_local_main_process:
        try:
            built = build_dataset(args.pdb_path, args.cache_dir, build_options(args), num_proc=args.num_proc,
                                  force=args.rebuild_dataset, log=say if accelerator.is_main_process else print,
                                  listing=listing)
            path = str(built.path)
        except DatasetBuildError as error:
            outcome = str(error)
    outcomes = [(outcome, path)]
    if accelerator.num_processes > 1:
        outcomes = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(outcomes, (outcome, path), group=long_wait_group(args))
    failed = [o for o, _ in outcomes if o != "ok"]
    if failed:
        raise TrainingError(failed[0])
    if not accelerator.is_local_main_process:
        local_main = accelerator.process_index - accelerator.local_process_index  # torchrun numbers ranks by machine
        try:
            built = load_built(outcomes[local_main][1])
        except DatasetBuildError as error:
            raise TrainingError(str(error)) from None
    check_same_dataset(accelerator, args, built)
    return hold_for_reading(built)  # `protmask build-dataset --prune` leaves it alone while this run lives


def dataset_signature(built) -> dict:
    """What every rank must agree on: the split sizes and a hash of every entry's split, name and length. The
    build fingerprint is shown too but not compared: it holds file times, which a plain copy of the same
    files to a node-local disk changes."""
    content = hashlib.sha256()
    for split in sorted(built.dataset):
        content.update(f"{split}\0{len(built.dataset[split])}\0".encode())
        content.update("\0".join(built.dataset[split]["name"]).encode())
        content.update(np.asarray(built.dataset[split]["length"], dtype=np.int64).tobytes())
    return {"fingerprint": built.report.get("fingerprint"),
            "splits": {split: len(built.dataset[split]) for split in sorted(built.dataset)},
            "content": content.hexdigest()[:16]}


def check_same_dataset(accelerator, args, built) -> None:
    """Ranks that train on different data (node-local caches or mirrors that came out different) would plan
    different epochs and hang, or silently train on different sets: stop, naming the machines that differ."""
    if accelerator.num_processes == 1:
        return
    mine = {"host": socket.gethostname(), "rank": accelerator.process_index, "path": str(built.path),
            **dataset_signature(built)}
    everyone = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(everyone, mine, group=long_wait_group(args))
    key = ("splits", "content")
    machines = {}  # one line per machine and dataset, with its ranks
    for entry in everyone:
        machines.setdefault((entry["host"], entry["path"], entry["fingerprint"], *(str(entry[k]) for k in key)),
                            []).append(entry)
    if len({tuple(str(e[k]) for k in key) for e in everyone}) > 1:
        def describe(entries):
            entry, ranks = entries[0], ",".join(str(e["rank"]) for e in entries)
            splits = "/".join(str(n) for n in entry["splits"].values())
            return (f"rank(s) {ranks} on {entry['host']}: {entry['path']} (fingerprint {entry['fingerprint']}, "
                    f"{splits} entries in {'/'.join(entry['splits'])}, content {entry['content']})")

        raise TrainingError(
            "the processes of this job hold different datasets; every rank must train on the same one.\n  "
            + "\n  ".join(describe(entries) for entries in machines.values())
            + "\nGive every machine the same --pdb_path contents (a node-local copy may be incomplete, or a file "
              "failed to read on one machine: see its build report), or build once with protmask build-dataset "
              "and pass that folder as --pdb_path on every machine.")


_LONG_WAIT_GROUP = None


def long_wait_group(args):
    """A gloo group for waits that may rightly take hours (a first dataset build), created once on every rank."""
    global _LONG_WAIT_GROUP
    if _LONG_WAIT_GROUP is None:
        _LONG_WAIT_GROUP = torch.distributed.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=args.dataset_build_timeout))
    return _LONG_WAIT_GROUP


def sampling_keys(split) -> list[list[str]]:
    """Per training entry, the clusters of its chains: the build's cluster ids, or for a chain without one
    (no clustering, or absent from the cluster file) its exact sequence."""
    ids = split["cluster_ids"] if "cluster_ids" in split.column_names else None
    keys = []
    for row, (sequence, lengths) in enumerate(zip(split["sequence"], split["chain_lengths"])):
        starts = np.cumsum([0, *lengths])
        chains = [sequence[a:b] for a, b in zip(starts[:-1], starts[1:])]
        clusters = ids[row] if ids is not None else [""] * len(chains)
        keys.append([f"cluster:{c}" if c else "seq:" + hashlib.sha256(q.encode()).hexdigest()[:16]
                     for c, q in zip(clusters, chains)])
    return keys


def sampling_mode(args, split) -> str:
    """The --sampling a run gets: auto is cluster when the build clustered its chains."""
    if args.sampling != "auto":
        return args.sampling
    return "cluster" if "cluster_ids" in split.column_names else "uniform"
