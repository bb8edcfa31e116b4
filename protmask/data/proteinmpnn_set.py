"""ProteinMPNN's published training set (``pdb_2021aug02`` and its ``_sample``) read as a source of entries.

The layout (its README): ``list.csv`` (CHAINID, DEPOSITION, RESOLUTION, HASH, CLUSTER, SEQUENCE, one row per
chain), ``valid_clusters.txt`` and ``test_clusters.txt`` (cluster ids), and per entry ``pdb/XX/XXXX.pt``
(metadata and biological assemblies) with ``pdb/XX/XXXX_A.pt`` per chain (``seq``, ``xyz`` [L, 14, 3] with
N, CA, C, O first, ``mask``). Every file is read with ``weights_only=True``.

An entry becomes one row per biological assembly that holds a listed chain (ProteinMPNN builds the
assembly of a drawn chain the same way: every transform of the assembly applied to its chains), and a
listed chain in no assembly becomes a row alone. A row's split is the split of its chains' clusters, exactly
as the two cluster lists say (test before validation before train when an assembly mixes them), and each
chain carries its list.csv cluster, so cluster sampling draws as ProteinMPNN does.
"""

from __future__ import annotations

import csv
import datetime
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LIST_FILE, VALIDATION_FILE, TEST_FILE = "list.csv", "valid_clusters.txt", "test_clusters.txt"


def is_proteinmpnn_set(path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / LIST_FILE).is_file() and (path / "pdb").is_dir()


def index_files(path) -> list[Path]:
    """The files that define the set (what a build's fingerprint covers)."""
    return [Path(path) / name for name in (LIST_FILE, VALIDATION_FILE, TEST_FILE) if (Path(path) / name).is_file()]


@dataclass
class ListedChain:
    chain_id: str
    deposition: str | None
    resolution: float | None
    cluster: str


def read_list(path, options) -> dict[str, dict[str, ListedChain]]:
    """pdb id → its listed chains, after ProteinMPNN's filters: resolution (--max_resolution, its RESCUT) and
    deposition date (--date_cutoff, its DATCUT)."""
    entries: dict[str, dict[str, ListedChain]] = {}
    with open(Path(path) / LIST_FILE, newline="") as handle:
        reader = csv.reader(handle)
        header = [h.strip().upper() for h in next(reader)]
        column = {name: header.index(name) for name in ("CHAINID", "DEPOSITION", "RESOLUTION", "CLUSTER")}
        for row in reader:
            if not row:
                continue
            pdb_id, _, chain = row[column["CHAINID"]].partition("_")
            resolution = _float(row[column["RESOLUTION"]])
            deposition = _iso(row[column["DEPOSITION"]])
            if options.max_resolution is not None and (resolution is None or resolution > options.max_resolution):
                continue
            if options.date_cutoff and (deposition is None or deposition > options.date_cutoff):
                continue
            entries.setdefault(pdb_id.lower(), {})[chain] = ListedChain(chain, deposition, resolution,
                                                                        row[column["CLUSTER"]].strip())
    return entries


def read_cluster_lists(path) -> dict[str, set[str]]:
    lists = {}
    for split, name in (("validation", VALIDATION_FILE), ("test", TEST_FILE)):
        file = Path(path) / name
        lists[split] = {line.strip() for line in file.read_text().splitlines() if line.strip()} if file.is_file() else set()
    return lists


def row_split(clusters: list[str], lists: dict[str, set[str]]) -> str:
    """Test when a chain's cluster is a test cluster, else validation, else train."""
    if any(c in lists["test"] for c in clusters):
        return "test"
    if any(c in lists["validation"] for c in clusters):
        return "validation"
    return "train"


def load_entry(item, root: str):
    """Worker: one entry's assemblies as ``(path, [(name, ParsedEntry, clusters)], error, cacheable)``."""
    import torch

    from ..structure import ContextAtoms, ParsedEntry, ProteinChain

    pdb_id, listed = item
    prefix = Path(root) / "pdb" / pdb_id[1:3] / pdb_id
    try:
        meta = torch.load(f"{prefix}.pt", weights_only=True)
        chain_files = {c: torch.load(f"{prefix}_{c}.pt", weights_only=True) for c in meta["chains"]
                       if Path(f"{prefix}_{c}.pt").is_file()}
    except FileNotFoundError as error:
        return str(prefix), None, f"missing file: {error.filename}", True
    except Exception as error:  # a damaged or foreign .pt
        return str(prefix), None, f"unreadable ProteinMPNN .pt ({type(error).__name__}: {error})", True
    resolution = _float(meta.get("resolution"))
    date = _iso(meta.get("date"))
    rows = []
    for assembly, members in assemblies(meta, {c.chain_id for c in listed}, chain_files):
        chains = []
        for name, chain_id, xyz in members:
            coords = np.asarray(xyz[:, :4], dtype=np.float32)
            sequence = chain_files[chain_id]["seq"]
            chains.append(ProteinChain(chain_id=name, sequence=sequence, coords=coords,
                                       residue_numbers=np.arange(1, len(sequence) + 1, dtype=np.int32),
                                       insertion_codes=" " * len(sequence), method=meta.get("method"),
                                       resolution=resolution, source=f"{prefix}_{chain_id}.pt"))
        entry = ParsedEntry(chains=chains, atoms=ContextAtoms.empty(), entry_id=pdb_id, deposition_date=date,
                            assembly_id=assembly)
        clusters = [next((c.cluster for c in listed if c.chain_id == chain_id), "") for _, chain_id, _ in members]
        rows.append((f"{pdb_id}-assembly{assembly}" if assembly else pdb_id, entry, clusters))
    return str(prefix), rows, None, True


def assemblies(meta: dict, listed: set[str], chain_files: dict):
    """(assembly id or None, [(chain name, source chain id, xyz [L, 14, 3])]) covering every listed chain
    once: each assembly (in the file's order) that holds a listed chain not yet covered, with all its
    transforms, then each listed chain found in none alone."""
    covered = set()
    ids = list(meta.get("asmb_ids", []))
    for assembly in dict.fromkeys(ids):
        parts = [k for k, a in enumerate(ids) if a == assembly]
        chains_of = {k: [c for c in meta["asmb_chains"][k].split(",") if c in chain_files] for k in parts}
        if not (listed - covered) & {c for k in parts for c in chains_of[k]}:
            continue
        members = []
        for k in parts:
            # numpy, not torch: this runs in forked parse workers, where torch's intra-op thread pool (set up
            # in the parent) can deadlock.
            xform = _numpy(meta[f"asmb_xform{k}"])
            rotation, translation = xform[:, :3, :3], xform[:, :3, 3]
            for chain_id in chains_of[k]:
                xyz = _numpy(chain_files[chain_id]["xyz"])
                for copy, (u, r) in enumerate(zip(rotation, translation)):
                    moved = np.einsum("ij,laj->lai", u, xyz) + r
                    members.append((chain_id if (k, copy) == (parts[0], 0) else f"{chain_id}{k}.{copy}", chain_id,
                                    moved.astype(np.float32)))
                covered.add(chain_id)
        yield assembly, members
    for chain_id in sorted(listed - covered):
        if chain_id in chain_files:
            yield None, [(chain_id, chain_id, _numpy(chain_files[chain_id]["xyz"]))]


def _numpy(value) -> np.ndarray:
    return (value.numpy() if hasattr(value, "numpy") else np.asarray(value)).astype(np.float32)


def _float(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) and number > 0 else None


def _iso(value) -> str | None:
    """ProteinMPNN writes dates as 2021-08-02; its DATCUT as 2030-Jan-01."""
    if not isinstance(value, str):
        return None
    for form in ("%Y-%m-%d", "%Y-%b-%d", "%d-%b-%y"):
        try:
            return datetime.datetime.strptime(value.strip(), form).date().isoformat()
        except ValueError:
            continue
    return None
