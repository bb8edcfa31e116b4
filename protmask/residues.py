"""The amino-acid alphabet, three-letter to one-letter mapping (modified residues to their parent) and
backbone and side-chain atom order."""

from Bio.Data.PDBData import protein_letters_3to1_extended

#: The 20 standard amino acids in one-letter code, in the order the tokenizer numbers them.
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
#: Any residue that is an amino acid but not one of the 20 (D-amino acids, unknown, unmapped modifications).
UNKNOWN_RESIDUE = "X"
#: Backbone atoms stored per residue, in this order (``coords[:, i]``).
BACKBONE_ATOMS = ("N", "CA", "C", "O")
#: What a model reads of each residue (``ProtMaskConfig.backbone``), as columns of ``coords``: every backbone
#: atom, or the CA alone (ProteinMPNN's CA-only models, for CA traces and coarse models).
BACKBONE_COLUMNS = {"full": (0, 1, 2, 3), "ca": (1,)}
#: Side-chain heavy atoms beyond CB, in the order of the 37-atom representation after its first five (N, CA,
#: C, CB, O). This is what LigandMPNN's side-chain context reads of a residue (its parser never fills the
#: 37th slot, OXT, so neither is it here). Each atom's element is its name's first letter.
SIDE_CHAIN_ATOMS = ("CG", "CG1", "CG2", "OG", "OG1", "SG", "CD", "CD1", "CD2", "ND1", "ND2", "OD1", "OD2", "SD",
                    "CE", "CE1", "CE2", "CE3", "NE", "NE1", "NE2", "OE1", "OE2", "CH2", "NH1", "NH2", "OH", "CZ",
                    "CZ2", "CZ3", "NZ")
SIDE_CHAIN_ELEMENTS = tuple({"C": 6, "N": 7, "O": 8, "S": 16}[name[0]] for name in SIDE_CHAIN_ATOMS)


def has_backbone(coords, backbone: str = "full"):
    """``[..., L]`` bool: the residue has every atom a ``backbone`` model reads. ``coords`` ``[..., L, 4, 3]``
    (numpy or torch, NaN where missing)."""
    columns = BACKBONE_COLUMNS[backbone]
    if hasattr(coords, "isfinite"):  # a torch tensor
        return coords[..., list(columns), :].isfinite().all(-1).all(-1)
    import numpy as np

    return np.isfinite(coords[..., list(columns), :]).all(axis=(-2, -1))

# D-amino acids (PDB chemical component codes). Biopython's extended table has no entry for them and
# `is_aa()` recognises only glycine in an all-D protein, so they would vanish from the sequence; we keep
# them as X so the chain is not silently shortened.
D_AMINO_ACIDS = frozenset(
    "DAL DAR DSG DAS DCY DGN DGL DHI DIL DLE DLY MED DPN DPR DSN DTH DTR DTY DVA DNE DAB DBB DSE "
    "DCS DBZ DPL DMH ZAL".split()
)

WATER_NAMES = frozenset({"HOH", "WAT", "DOD", "H2O", "TIP", "TIP3", "SOL"})


def one_letter(resname: str, atom_names=()) -> str | None:
    """One-letter code of a residue, or None when it is not an amino acid.

    Standard and modified residues map through Biopython's extended table (MSE→M, SEP→S, ...); D-amino
    acids, UNK and any other residue that carries an N-CA-C backbone map to X. Waters, ligands and
    nucleotides return None.
    """
    name = resname.strip().upper()
    if name in WATER_NAMES:
        return None
    letter = protein_letters_3to1_extended.get(name)
    if letter is not None:
        return letter if letter in AMINO_ACIDS else UNKNOWN_RESIDUE
    if name in D_AMINO_ACIDS or name == "UNK":
        return UNKNOWN_RESIDUE
    names = set(atom_names)
    if {"N", "CA", "C"} <= names:
        return UNKNOWN_RESIDUE
    return None

#: Chemical element symbols in order of atomic number (H = 1 … Og = 118): context atoms are typed by it.
ELEMENTS = ("H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se Br Kr "
            "Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho Er Tm Yb "
            "Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am Cm Bk Cf Es Fm Md No Lr Rf "
            "Db Sg Bh Hs Mt Ds Rg Cn Nh Fl Mc Lv Ts Og").upper().split()
_ATOMIC_NUMBER = {symbol: number for number, symbol in enumerate(ELEMENTS, start=1)}


def atomic_number(element: str) -> int:
    """The atomic number of an element symbol (any case), 0 when it is not an element."""
    return _ATOMIC_NUMBER.get(element.strip().upper(), 0)
