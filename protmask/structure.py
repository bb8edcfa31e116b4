"""One structure file (PDB / mmCIF, optionally gzipped) → the protein chains of its first model, as numpy
arrays, with one typed error for every way a file can be unreadable."""

from __future__ import annotations

import gzip
import io
import os
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .residues import BACKBONE_ATOMS, UNKNOWN_RESIDUE, one_letter

PDB_SUFFIXES = (".pdb", ".ent")
MMCIF_SUFFIXES = (".cif", ".mmcif")
STRUCTURE_SUFFIXES = tuple(s + z for s in PDB_SUFFIXES + MMCIF_SUFFIXES for z in ("", ".gz"))

#: A structure file that inflates (or weighs) more than this is refused before it is read. The largest PDB
#: entries are a few hundred MB of mmCIF text; Biopython holds several times a file's size while parsing.
MAX_STRUCTURE_BYTES = 512 << 20


class StructureError(ValueError):
    """A structure file that cannot be used: names the file and says why.

    ``transient`` errors are not the file's content (an I/O error, a file missing for a moment, memory): the
    next attempt may succeed, so a build reports them but does not remember them as the file's result."""

    def __init__(self, path, reason: str, transient: bool = False):
        self.path = str(path)
        self.reason = reason
        self.transient = transient
        super().__init__(f"{self.path}: {reason}")


def is_content_error(error: BaseException) -> bool:
    """A read failure the file's bytes determine (a damaged gzip stream), as opposed to the storage or the
    machine failing (EIO, a stale NFS handle, permissions, memory)."""
    return isinstance(error, (gzip.BadGzipFile, EOFError, zlib.error)) or not isinstance(error, (OSError, MemoryError))


@dataclass
class ProteinChain:
    """One protein chain of model 1.

    ``coords`` is float32 ``[L, 4, 3]`` for the backbone atoms N, CA, C, O, with NaN for each atom the file
    does not have. ``residue_numbers`` and ``insertion_codes`` (one character a residue, ``" "`` for none)
    identify residues as the file does. ``method`` and ``resolution`` describe the whole entry and are None
    when the file does not state them.
    """

    chain_id: str
    sequence: str
    coords: np.ndarray
    residue_numbers: np.ndarray
    insertion_codes: str
    method: str | None = None
    resolution: float | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sequence)

    @property
    def backbone_complete(self) -> np.ndarray:
        """Boolean ``[L]``: the residue has all four backbone atoms (what the model can use)."""
        return np.isfinite(self.coords).all(axis=(1, 2))

    @property
    def residue_ids(self) -> list[str]:
        """Residue labels as the file writes them: ``"54"``, ``"54A"``."""
        return [f"{n}{c.strip()}" for n, c in zip(self.residue_numbers.tolist(), self.insertion_codes)]


def structure_format(path) -> str:
    """'pdb' or 'mmcif' from the file name (a ``.gz`` suffix is looked through)."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(PDB_SUFFIXES):
        return "pdb"
    if name.endswith(MMCIF_SUFFIXES):
        return "mmcif"
    raise StructureError(path, f"unsupported file type; expected one of {', '.join(STRUCTURE_SUFFIXES)}")


def is_structure_file(path) -> bool:
    return Path(path).name.lower().endswith(STRUCTURE_SUFFIXES)


def inflated_size(path, max_bytes: int = MAX_STRUCTURE_BYTES) -> int:
    """The file's size once inflated, counted in a stream that keeps nothing; StructureError when it passes
    ``max_bytes`` (a gzip bomb is refused after reading at most max_bytes + 1 MiB, holding 1 MiB at a time)."""
    path = Path(path)
    try:
        if not path.name.lower().endswith(".gz"):
            size = path.stat().st_size
        else:
            size = 0
            with gzip.open(path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    size += len(chunk)
                    if size > max_bytes:
                        break
    except FileNotFoundError:
        raise StructureError(path, "no such file", transient=True) from None
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise StructureError(path, f"cannot read: {error}", transient=not is_content_error(error)) from None
    if size > max_bytes:
        raise StructureError(path, f"inflates past {max_bytes >> 20} MB (the --max_file_mb limit); refused without "
                                   "reading it into memory")
    if size == 0:
        raise StructureError(path, "empty file")
    return size


def open_text(path, max_bytes: int = MAX_STRUCTURE_BYTES):
    """A text handle that inflates as it is read, after the size check: the parser holds its own structures,
    never a second copy of the whole text."""
    inflated_size(path, max_bytes)
    path = Path(path)
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _pick_altloc(atom):
    """The atom's altloc with the highest occupancy; on a tie the one written first in the file."""
    if not atom.is_disordered():
        return atom
    def key(child):
        occupancy = child.get_occupancy()
        serial = child.get_serial_number()
        return (-(1.0 if occupancy is None else occupancy), serial if serial is not None else 1 << 62, child.get_altloc())
    return min(atom.disordered_get_list(), key=key)


def _pick_residue(residue):
    """For a point-mutation site (a residue with two names), the form with the highest mean occupancy."""
    if residue.is_disordered() != 2:
        return residue
    def mean_occupancy(child):
        values = [(_pick_altloc(a).get_occupancy() or 0.0) for a in child]
        return sum(values) / max(len(values), 1)
    children = list(residue.child_dict.values())
    best = max(mean_occupancy(c) for c in children)
    return next(c for c in children if mean_occupancy(c) == best)


def _header_fields(structure) -> tuple[str | None, float | None]:
    header = getattr(structure, "header", None) or {}
    method = header.get("structure_method")
    if isinstance(method, str):
        method = method.strip().upper() or None
        if method in ("UNKNOWN", "?", "."):
            method = None
    else:
        method = None
    resolution = header.get("resolution")
    try:
        resolution = float(resolution) if resolution is not None else None
    except (TypeError, ValueError):
        resolution = None
    if resolution is not None and not (np.isfinite(resolution) and resolution > 0):
        resolution = None
    return method, resolution


def parse_structure(path, max_bytes: int = MAX_STRUCTURE_BYTES) -> list[ProteinChain]:
    """Read a PDB / mmCIF file (``.gz`` or not) and return the protein chains of its first model.

    Rules: model 1 only; each atom takes its highest-occupancy altloc (ties: the first in the file);
    modified residues map to their parent through Biopython's extended table, other amino acids (D-amino
    acids, UNK, unmapped modifications) to ``X``; waters, ligands and nucleotides are ignored; chains with
    no amino acid are dropped. Raises :class:`StructureError` naming the file when it cannot be read or has
    no protein at all.
    """
    from Bio.PDB import MMCIFParser, PDBParser

    path = Path(path)
    kind = structure_format(path)
    parser = PDBParser(QUIET=True, PERMISSIVE=1) if kind == "pdb" else MMCIFParser(QUIET=True)
    try:
        with warnings.catch_warnings(), open_text(path, max_bytes) as handle:
            warnings.simplefilter("ignore")
            structure = parser.get_structure(path.name, handle)
    except StructureError:
        raise
    except (OSError, MemoryError) as error:
        raise StructureError(path, f"cannot read: {type(error).__name__}: {error}",
                             transient=not is_content_error(error)) from None
    except Exception as error:  # Biopython raises many types (ValueError, KeyError, PDBConstructionException)
        raise StructureError(path, f"unreadable {kind.upper()} ({type(error).__name__}: {error})",
                             transient=not is_content_error(error)) from None
    models = list(structure)
    if not models:
        raise StructureError(path, "no atoms (no model in the file)")
    method, resolution = _header_fields(structure)

    chains = []
    for chain in models[0]:
        letters, coords, numbers, icodes = [], [], [], []
        unknown_names = set()
        for residue in chain:
            residue = _pick_residue(residue)
            hetflag, number, icode = residue.get_id()
            if hetflag == "W":
                continue
            atoms = {atom.get_id(): atom for atom in residue}
            letter = one_letter(residue.get_resname(), atoms)
            if letter is None:
                continue
            if letter == UNKNOWN_RESIDUE:
                unknown_names.add(residue.get_resname().strip())
            xyz = np.full((len(BACKBONE_ATOMS), 3), np.nan, dtype=np.float32)
            for i, name in enumerate(BACKBONE_ATOMS):
                if name in atoms:
                    xyz[i] = _pick_altloc(atoms[name]).get_coord()
            letters.append(letter)
            coords.append(xyz)
            numbers.append(number)
            icodes.append(icode if icode and icode.strip() else " ")
        if not letters:
            continue
        notes = [f"mapped to X: {' '.join(sorted(unknown_names))}"] if unknown_names else []
        chains.append(
            ProteinChain(
                chain_id=str(chain.get_id()),
                sequence="".join(letters),
                coords=np.stack(coords).astype(np.float32),
                residue_numbers=np.asarray(numbers, dtype=np.int32),
                insertion_codes="".join(icodes),
                method=method,
                resolution=resolution,
                source=os.fspath(path),
                notes=notes,
            )
        )
    if not chains:
        raise StructureError(path, "no protein chain in model 1 (only ligands, waters or nucleic acids)")
    return chains
