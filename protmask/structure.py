"""One structure file (PDB / mmCIF, optionally gzipped) → the protein chains of its first model, as numpy
arrays, with one typed error for every way a file can be unreadable."""

from __future__ import annotations

import gzip
import io
import os
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .residues import BACKBONE_ATOMS, SIDE_CHAIN_ATOMS, UNKNOWN_RESIDUE, WATER_NAMES, one_letter

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
    #: float32 ``[L, 31, 3]``: the side-chain atoms beyond CB (`SIDE_CHAIN_ATOMS`), NaN where absent; read
    #: only when asked for (``parse_entry(..., side_chains=True)``), for LigandMPNN's side-chain context.
    side_chains: np.ndarray | None = None
    #: float32 ``[L, 3]``: the deposited CB (NaN where absent, as for glycine), read with ``side_chains``: with
    #: them, the whole side chain (the LigandMPNN paper's binding sites are defined on it).
    cb: np.ndarray | None = None

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


#: The class of each context atom, stored as its index in this tuple.
ATOM_CLASSES = ("small_molecule", "metal", "nucleotide")
#: Elements counted as metals: alkali and alkaline-earth metals, transition and post-transition metals,
#: lanthanides and actinides (a heme's iron is a metal atom; its carbons are a small molecule's).
METALS = frozenset(
    "LI NA K RB CS BE MG CA SR BA AL GA IN TL SN PB BI SC TI V CR MN FE CO NI CU ZN Y ZR NB MO TC RU RH PD AG "
    "CD HF TA W RE OS IR PT AU HG LA CE PR ND PM SM EU GD TB DY HO ER TM YB LU TH PA U NP PU AM CM".split())
#: Residues of DNA and RNA chains. Modified nucleotides count when the file puts them in a polymer (an ATOM
#: record or declared); a free ATP or NAD is a small molecule.
STANDARD_NUCLEOTIDES = frozenset("A C G U I N DA DC DG DT DI DU DN".split())


@dataclass
class ContextAtoms:
    """The heavy atoms of model 1 that are not protein residues: small molecules, ions, nucleic acids.

    ``coords`` float32 ``[M, 3]``; per atom its ``elements`` (upper case, ``"ZN"``), the ``residue_names`` and
    ``chain_ids`` / ``residue_numbers`` of its group, and its class (an index into `ATOM_CLASSES`).
    """

    coords: np.ndarray
    elements: list[str]
    residue_names: list[str]
    chain_ids: list[str]
    residue_numbers: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return len(self.coords)

    @classmethod
    def empty(cls) -> "ContextAtoms":
        return cls(np.zeros((0, 3), np.float32), [], [], [], np.zeros(0, np.int32), np.zeros(0, np.int8))


@dataclass
class ParsedEntry:
    """One file: its protein chains, its other atoms, and what identifies the entry.

    ``entry_id`` is the PDB id from the file's header (lower case), else from the file name
    (`entry_id_from_name`); dates are ISO ``YYYY-MM-DD`` or None; ``assembly_id`` comes from a
    ``-assembly1`` / ``.pdb1`` file name (None for the asymmetric unit)."""

    chains: list[ProteinChain]
    atoms: ContextAtoms
    entry_id: str
    deposition_date: str | None = None
    release_date: str | None = None
    assembly_id: str | None = None


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


def _altloc_key(child):
    """Highest occupancy first; on a tie the conformer written first in the file."""
    occupancy = child.get_occupancy()
    serial = child.get_serial_number()
    return (-(1.0 if occupancy is None else occupancy), serial if serial is not None else 1 << 62, child.get_altloc())


def residue_conformer(residue) -> str | None:
    """The alternate location a residue is read in: the conformer with the highest mean occupancy over the
    residue's disordered atoms, ties to the one written first. None when no atom has alternates."""
    occupancy, first_serial = {}, {}
    for atom in residue:
        if not atom.is_disordered():
            continue
        for child in atom.disordered_get_list():
            altloc = child.get_altloc()
            occupancy.setdefault(altloc, []).append(child.get_occupancy() or 0.0)
            serial = child.get_serial_number()
            first_serial[altloc] = min(first_serial.get(altloc, 1 << 62), serial if serial is not None else 1 << 62)
    if not occupancy:
        return None
    return min(occupancy, key=lambda a: (-sum(occupancy[a]) / len(occupancy[a]), first_serial[a], a))


def atom_in_conformer(atom, conformer: str | None):
    """The atom as it is in ``conformer``; an atom without that altloc takes its own best one (an atom can
    have alternates the residue's chosen conformer does not list)."""
    if not atom.is_disordered():
        return atom
    if conformer is not None and atom.disordered_has_id(conformer):
        return atom.child_dict[conformer]
    return min(atom.disordered_get_list(), key=_altloc_key)


def _pick_residue(residue):
    """For a point-mutation site (a residue with two names), the form with the highest mean occupancy."""
    if residue.is_disordered() != 2:
        return residue
    def mean_occupancy(child):
        conformer = residue_conformer(child)
        values = [(atom_in_conformer(a, conformer).get_occupancy() or 0.0) for a in child]
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


def _read_structure(path: Path, max_bytes: int):
    """(Biopython structure, mmCIF dictionary or None): the file read once, every failure a StructureError."""
    from Bio.PDB import MMCIFParser, PDBParser

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
    return structure, getattr(parser, "_mmcif_dict", None) if kind == "mmcif" else None


def parse_entry(path, max_bytes: int = MAX_STRUCTURE_BYTES, side_chains: bool = False) -> ParsedEntry:
    """Read a PDB / mmCIF file (``.gz`` or not): the protein chains of its first model, every other heavy
    atom of that model, and the entry's id, dates and assembly. ``side_chains``: each chain also keeps its
    side-chain atoms (`ProteinChain.side_chains`; atoms of zero occupancy are left out, as LigandMPNN reads).

    Polymer rules: a residue belongs to a protein chain when it is an amino acid in the polymer: an ATOM
    record, or a HETATM modified residue declared in the polymer (mmCIF ``label_seq_id``; PDB ``MODRES``) or
    peptide-bonded to a polymer neighbour (C–N within 1.75 Å). Free amino acids and every other group are
    not residues; their heavy atoms (and those of nucleic acids) are the entry's `ContextAtoms`; waters and
    hydrogens are dropped. Each residue is read in one conformer (`residue_conformer`). Modified residues
    map to their parent, other amino acids (D-amino acids, UNK, unmapped modifications) to ``X``. Raises
    :class:`StructureError` naming the file when it cannot be read or has no protein chain at all.
    """
    path = Path(path)
    structure, mmcif = _read_structure(path, max_bytes)
    models = list(structure)
    if not models:
        raise StructureError(path, "no atoms (no model in the file)")
    method, resolution = _header_fields(structure)
    declared = _declared_polymer_residues(path, mmcif, max_bytes)
    chains, atoms = [], _AtomCollector()
    for chain in models[0]:
        residues = _chain_residues(chain)
        in_polymer = _polymer_members(residues, str(chain.get_id()), declared)
        kept = [item for item, member in zip(residues, in_polymer) if member]
        for (residue, conformer, letter), member in zip(residues, in_polymer):
            if not member:
                atoms.add(residue, conformer, str(chain.get_id()), in_polymer_record=_declared(residue, chain, declared))
        if kept:
            chains.append(_protein_chain(kept, str(chain.get_id()), method, resolution, path, side_chains))
    if not chains:
        raise StructureError(path, "no protein chain in model 1 (only ligands, waters or nucleic acids)")
    return ParsedEntry(chains=chains, atoms=atoms.result(), **_entry_metadata(path, structure, mmcif))


def parse_structure(path, max_bytes: int = MAX_STRUCTURE_BYTES) -> list[ProteinChain]:
    """The protein chains of a file's first model (`parse_entry` without the other atoms)."""
    return parse_entry(path, max_bytes).chains


# Peptide bond C–N is 1.33 Å; 1.75 Å allows for coordinate error without joining a neighbour that is not bonded.
PEPTIDE_BOND_MAX = 1.75


def _chain_residues(chain) -> list:
    """(residue, conformer, one-letter code or None) for each non-water residue of a chain, in file order."""
    found = []
    for residue in chain:
        residue = _pick_residue(residue)
        if residue.get_id()[0] == "W" or residue.get_resname().strip().upper() in WATER_NAMES:
            continue
        conformer = residue_conformer(residue)
        found.append((residue, conformer, one_letter(residue.get_resname(), [a.get_id() for a in residue])))
    return found


def _polymer_members(residues: list, chain_id: str, declared: set) -> list[bool]:
    """Which residues are amino acids of the protein polymer (see `parse_entry`)."""
    member = [letter is not None and _declared(residue, chain_id, declared) for residue, _, letter in residues]
    changed = True
    while changed:  # a run of modified residues joins the chain one bond at a time
        changed = False
        for i, (residue, conformer, letter) in enumerate(residues):
            if member[i] or letter is None:
                continue
            before = i > 0 and member[i - 1] and _bonded(residues[i - 1], residues[i])
            after = i + 1 < len(residues) and member[i + 1] and _bonded(residues[i], residues[i + 1])
            if before or after:
                member[i] = changed = True
    return member


def _declared(residue, chain, declared: set) -> bool:
    """An ATOM record, or a HETATM group the file declares part of a polymer."""
    hetflag, number, icode = residue.get_id()
    chain_id = chain if isinstance(chain, str) else str(chain.get_id())
    return hetflag == " " or (chain_id, int(number), (icode or " ").strip()) in declared


def _bonded(first, second) -> bool:
    """A peptide bond from ``first``'s C to a nitrogen of ``second`` (``N``, or ``N1`` in some C-terminal
    modifications such as OAR)."""
    (a, a_conformer, _), (b, b_conformer, _) = first, second
    if "C" not in a:
        return False
    c = atom_in_conformer(a["C"], a_conformer).get_coord()
    nitrogens = [atom for atom in b if atom.get_id() == "N" or (atom.element or "").strip().upper() == "N"]
    return any(float(np.linalg.norm(c - atom_in_conformer(n, b_conformer).get_coord())) <= PEPTIDE_BOND_MAX
               for n in nitrogens)


def _protein_chain(residues: list, chain_id: str, method, resolution, path: Path,
                   side_chains: bool = False) -> ProteinChain:
    coords = np.full((len(residues), len(BACKBONE_ATOMS), 3), np.nan, dtype=np.float32)
    letters, numbers, icodes, unknown_names = [], [], [], set()
    for row, (residue, conformer, letter) in enumerate(residues):
        if letter == UNKNOWN_RESIDUE:
            unknown_names.add(residue.get_resname().strip())
        for column, name in enumerate(BACKBONE_ATOMS):
            if name in residue:
                coords[row, column] = atom_in_conformer(residue[name], conformer).get_coord()
        _, number, icode = residue.get_id()
        letters.append(letter)
        numbers.append(number)
        icodes.append(icode if icode and icode.strip() else " ")
    return ProteinChain(chain_id=chain_id, sequence="".join(letters), coords=coords,
                        residue_numbers=np.asarray(numbers, dtype=np.int32), insertion_codes="".join(icodes),
                        method=method, resolution=resolution, source=os.fspath(path),
                        notes=[f"mapped to X: {' '.join(sorted(unknown_names))}"] if unknown_names else [],
                        side_chains=_named_atom_coords(residues, SIDE_CHAIN_ATOMS) if side_chains else None,
                        cb=_named_atom_coords(residues, ("CB",))[:, 0] if side_chains else None)


def _named_atom_coords(residues: list, names) -> np.ndarray:
    """``[L, len(names), 3]``: these atoms of each residue in its conformer, NaN where absent or of zero occupancy."""
    coords = np.full((len(residues), len(names), 3), np.nan, dtype=np.float32)
    for row, (residue, conformer, _) in enumerate(residues):
        for column, name in enumerate(names):
            if name in residue:
                atom = atom_in_conformer(residue[name], conformer)
                occupancy = atom.get_occupancy()
                if occupancy is None or occupancy > 0:
                    coords[row, column] = atom.get_coord()
    return coords


def _declared_polymer_residues(path: Path, mmcif: dict | None, max_bytes: int) -> set:
    """(chain, number, insertion code) of HETATM residues the file declares part of a polymer: mmCIF atoms
    with a ``label_seq_id``, PDB ``MODRES`` records."""
    if mmcif is not None:
        columns = [mmcif.get(f"_atom_site.{name}") for name in
                   ("group_PDB", "label_seq_id", "auth_asym_id", "auth_seq_id", "pdbx_PDB_ins_code")]
        if any(column is None for column in columns):
            return set()
        declared = set()
        for group, seq_id, chain, number, icode in zip(*columns):
            if group == "HETATM" and seq_id not in (".", "?"):
                try:
                    declared.add((chain, int(number), "" if icode in (".", "?") else icode.strip()))
                except ValueError:
                    continue
        return declared
    declared = set()
    with open_text(path, max_bytes) as handle:
        for line in handle:
            if line.startswith(("ATOM  ", "HETATM", "MODEL ")):
                break  # MODRES is in the header
            if line.startswith("MODRES") and len(line) >= 22:
                try:
                    declared.add((line[16], int(line[18:22]), line[22:23].strip()))
                except ValueError:
                    continue
    return declared


def _entry_metadata(path: Path, structure, mmcif: dict | None) -> dict:
    """The entry id (from the file, else from the name), deposition and release dates, and assembly id."""
    name_id, assembly = entry_id_from_name(path)
    if mmcif is not None:
        entry = _first(mmcif.get("_entry.id"))
        # Current files: pdbx_database_status and the audit history; older ones: _database_PDB_rev.
        deposited = _first(mmcif.get("_pdbx_database_status.recvd_initial_deposition_date"))
        if not _is_date(deposited):
            deposited = next((d for d in mmcif.get("_database_PDB_rev.date_original", []) if _is_date(d)), None)
        revisions = [d for key in ("_pdbx_audit_revision_history.revision_date", "_database_PDB_rev.date")
                     for d in mmcif.get(key, []) if _is_date(d)]
        released = min(revisions) if revisions else None
    else:
        header = getattr(structure, "header", None) or {}
        entry = header.get("idcode")
        deposited, released = header.get("deposition_date"), header.get("release_date")
        if not entry:  # Biopython fills dates it did not find with 1909-01-08
            deposited = released = None
    entry = (entry or "").strip().lower()
    return {"entry_id": entry if _is_pdb_id(entry) else name_id,
            "deposition_date": deposited if _is_date(deposited) else None,
            "release_date": released if _is_date(released) else None, "assembly_id": assembly}


def entry_id_from_name(path) -> tuple[str, str | None]:
    """(entry id, assembly id or None) from a file name as wwPDB and PDBe mirrors write them:
    ``pdb1abc.ent.gz``, ``1abc.cif.gz``, ``1ABC.pdb``, ``1abc-assembly1.cif.gz``, ``1abc.pdb1.gz``; any other
    name gives its stem, lower-cased."""
    name = Path(path).name.lower()
    for suffix in (".gz", ".ent", ".pdb", ".cif", ".mmcif"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    assembly = None
    match = re.fullmatch(r"(.+?)(?:-assembly(\d+)|\.pdb(\d+))", name)
    if match:
        name, assembly = match.group(1), match.group(2) or match.group(3)
    if re.fullmatch(r"pdb[0-9][a-z0-9]{3}", name):
        name = name[3:]
    return name, assembly


def _first(values):
    if isinstance(values, list):
        return values[0] if values else None
    return values


def _is_pdb_id(text: str) -> bool:
    return bool(re.fullmatch(r"[0-9][a-z0-9]{3}|pdb_[0-9a-z]{8}", text or ""))


def _is_date(text) -> bool:
    return isinstance(text, str) and bool(re.fullmatch(r"\d{4}-\d{2}-\d{2}", text)) and text != "1909-01-08"


def _nucleic_table():
    from Bio.Data.PDBData import nucleic_letters_3to1_extended

    return nucleic_letters_3to1_extended


class _AtomCollector:
    """Heavy atoms of the groups that are not protein residues, in file order."""

    def __init__(self):
        self.coords, self.elements, self.residue_names, self.chain_ids, self.numbers, self.classes = ([] for _ in range(6))

    def add(self, residue, conformer, chain_id: str, in_polymer_record: bool) -> None:
        name = residue.get_resname().strip().upper()
        nucleotide = name in STANDARD_NUCLEOTIDES or (in_polymer_record and name.ljust(3) in _nucleic_table())
        for atom in residue:
            atom = atom_in_conformer(atom, conformer)
            element = (atom.element or "").strip().upper()
            if element in ("H", "D", "", "X"):  # hydrogens; atoms of unknown element (as LigandMPNN)
                continue
            self.coords.append(atom.get_coord())
            self.elements.append(element)
            self.residue_names.append(name)
            self.chain_ids.append(chain_id)
            self.numbers.append(int(residue.get_id()[1]))
            self.classes.append(ATOM_CLASSES.index("metal" if element in METALS else
                                                   "nucleotide" if nucleotide else "small_molecule"))

    def result(self) -> ContextAtoms:
        return ContextAtoms(
            coords=np.asarray(self.coords, dtype=np.float32).reshape(-1, 3), elements=self.elements,
            residue_names=self.residue_names, chain_ids=self.chain_ids,
            residue_numbers=np.asarray(self.numbers, dtype=np.int32), classes=np.asarray(self.classes, dtype=np.int8))
