"""Per-file parse results kept between builds, so that a build after adding or changing a few files of a
mirror parses only those.

Each build appends one Arrow shard to ``<cache_dir>/protmask-parsed-<version>/``: a row per chain (or one row
with the error) of every file it parsed, the entry's id, dates and context atoms on its first row, keyed by the file's path, size and modification time. A later build
looks each file up by that key; a file whose key is new is parsed again. Results are unfiltered, so builds
with other filter or split options reuse them too. ``compact`` keeps only the keys still in use.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np

from ..structure import ContextAtoms, ParsedEntry, ProteinChain

#: Bump when parsing rules change (the dataset format version covers them too).
PARSE_CACHE_VERSION = 2


def file_key(path) -> str:
    stat = os.stat(path)
    return f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}"


def _schema():
    import pyarrow as pa

    return pa.schema([("key", pa.string()), ("error", pa.string()), ("chain_id", pa.string()),
                      ("sequence", pa.string()), ("coords", pa.list_(pa.float32())),
                      ("residue_numbers", pa.list_(pa.int32())), ("insertion_codes", pa.string()),
                      ("method", pa.string()), ("resolution", pa.float32()), ("notes", pa.list_(pa.string())),
                      # The entry's own fields, on its first row:
                      ("entry_id", pa.string()), ("deposition_date", pa.string()), ("release_date", pa.string()),
                      ("assembly_id", pa.string()), ("atom_coords", pa.list_(pa.float32())),
                      ("atom_elements", pa.list_(pa.string())), ("atom_residue_names", pa.list_(pa.string())),
                      ("atom_chain_ids", pa.list_(pa.string())), ("atom_residue_numbers", pa.list_(pa.int32())),
                      ("atom_classes", pa.list_(pa.int8()))])


def _numbers(cell):
    return cell.values.to_numpy(zero_copy_only=False)


class ParseCache:
    def __init__(self, cache_dir, max_bytes: int):
        import Bio

        self.folder = Path(cache_dir) / f"protmask-parsed-v{PARSE_CACHE_VERSION}-bio{Bio.__version__}-{max_bytes >> 20}mb"
        self.tables, self.index = [], {}  # key -> (table number, first row, rows)
        self.writer = self.staging = None

    def load(self) -> "ParseCache":
        """Map every complete shard (memory-mapped, nothing copied) and index its keys."""
        import pyarrow as pa

        for shard in sorted(self.folder.glob("*.arrow")):
            try:
                table = pa.ipc.open_file(pa.memory_map(str(shard))).read_all()
            except (OSError, pa.ArrowInvalid):
                continue  # a damaged shard only means those files are parsed again
            number = len(self.tables)
            self.tables.append(table)
            keys = table.column("key").to_pylist()
            start = 0
            for row in range(1, len(keys) + 1):
                if row == len(keys) or keys[row] != keys[start]:
                    self.index[keys[start]] = (number, start, row - start)
                    start = row
        return self

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def get(self, key: str, path: str):
        """(ParsedEntry, error) as the parser gave them for this file."""
        number, start, rows = self.index[key]
        part = self.tables[number].slice(start, rows)
        error = part.column("error")[0].as_py()
        if error is not None:
            return None, error
        columns = {name: part.column(name) for name in part.column_names}
        chains = []
        for row in range(rows):
            chains.append(ProteinChain(
                chain_id=columns["chain_id"][row].as_py(), sequence=columns["sequence"][row].as_py(),
                coords=_numbers(columns["coords"][row]).reshape(-1, 4, 3),
                residue_numbers=_numbers(columns["residue_numbers"][row]),
                insertion_codes=columns["insertion_codes"][row].as_py(), method=columns["method"][row].as_py(),
                resolution=columns["resolution"][row].as_py(), source=path, notes=columns["notes"][row].as_py()))
        first = {name: columns[name][0] for name in columns}
        atoms = ContextAtoms(
            coords=_numbers(first["atom_coords"]).reshape(-1, 3), elements=first["atom_elements"].as_py(),
            residue_names=first["atom_residue_names"].as_py(), chain_ids=first["atom_chain_ids"].as_py(),
            residue_numbers=_numbers(first["atom_residue_numbers"]), classes=_numbers(first["atom_classes"]))
        return ParsedEntry(chains=chains, atoms=atoms, entry_id=first["entry_id"].as_py(),
                           deposition_date=first["deposition_date"].as_py(),
                           release_date=first["release_date"].as_py(), assembly_id=first["assembly_id"].as_py()), None

    def add(self, key: str, entry: ParsedEntry | None, error) -> None:
        """Record a fresh parse result in this build's shard (written as the build goes, published at `close`)."""
        import pyarrow as pa

        if self.writer is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.staging = self.folder / f".shard-{socket.gethostname()}-{os.getpid()}-{len(self.tables)}.tmp"
            self.writer = pa.ipc.new_file(str(self.staging), _schema())
        if error is not None:
            rows = [dict(key=key, error=error)]
        else:
            rows = [dict(key=key, error=None, chain_id=c.chain_id, sequence=c.sequence,
                         coords=np.asarray(c.coords, dtype=np.float32).reshape(-1),
                         residue_numbers=np.asarray(c.residue_numbers, dtype=np.int32),
                         insertion_codes=c.insertion_codes, method=c.method,
                         resolution=None if c.resolution is None else float(c.resolution), notes=list(c.notes))
                    for c in entry.chains]
            atoms = entry.atoms
            rows[0].update(entry_id=entry.entry_id, deposition_date=entry.deposition_date,
                           release_date=entry.release_date, assembly_id=entry.assembly_id,
                           atom_coords=np.asarray(atoms.coords, dtype=np.float32).reshape(-1),
                           atom_elements=list(atoms.elements), atom_residue_names=list(atoms.residue_names),
                           atom_chain_ids=list(atoms.chain_ids),
                           atom_residue_numbers=np.asarray(atoms.residue_numbers, dtype=np.int32),
                           atom_classes=np.asarray(atoms.classes, dtype=np.int8))
        self.writer.write_batch(pa.RecordBatch.from_pylist(rows, schema=_schema()))

    def close(self) -> None:
        """Publish this build's shard (renamed into place only when complete)."""
        if self.writer is not None:
            self.writer.close()
            self.staging.rename(self.folder / f"shard-{os.urandom(6).hex()}.arrow")
            self.writer = None

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.staging.unlink(missing_ok=True)
            self.writer = None

    def compact(self, live_keys: set[str]) -> int:
        """Rewrite the shards keeping only ``live_keys``; returns how many files' results were dropped."""
        import pyarrow as pa

        if not self.tables:
            self.load()
        dropped = len(set(self.index) - live_keys)
        if dropped == 0:
            return 0
        kept = [table.filter(pa.array([k in live_keys for k in table.column("key").to_pylist()]))
                for table in self.tables]
        old = sorted(self.folder.glob("*.arrow"))
        merged = pa.concat_tables(kept) if kept else pa.table({}, schema=_schema())
        staging = self.folder / f".compact-{socket.gethostname()}-{os.getpid()}.tmp"
        with pa.ipc.new_file(str(staging), _schema()) as writer:
            writer.write_table(merged)
        staging.rename(self.folder / f"shard-{os.urandom(6).hex()}.arrow")
        for shard in old:
            shard.unlink(missing_ok=True)
        self.tables, self.index = [], {}
        return dropped
