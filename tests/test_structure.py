"""parse_structure on real files: the edge cases, the sample against its manifest, and each rule."""

import gzip
import subprocess
import sys

import numpy as np
import pytest

from protmask.structure import StructureError, parse_structure

from conftest import pdb_atom_line, read_fasta, read_manifest, TESTS


def test_sample_matches_manifest_and_sequences(sample_dir):
    manifest = read_manifest(sample_dir / "MANIFEST.tsv")
    fasta = read_fasta(TESTS / "data" / "sample_sequences.fasta")
    checked = 0
    for name, row in manifest.items():
        chains = parse_structure(sample_dir / name)
        assert len(chains) == int(row["n_protein_chains"]), name
        lengths = dict(part.split(":") for part in row["chain_lengths"].split(","))
        for chain in chains:
            reference = fasta[f"{name}:{chain.chain_id}"]
            if "X" not in chain.sequence:
                # The reference kept only is_aa() residues and wrote X for every modification but MSE; we map
                # modifications to their parent, so compare wherever the reference names a residue.
                assert len(chain.sequence) == len(reference), (name, chain.chain_id)
                assert all(a == b for a, b in zip(chain.sequence, reference) if b != "X"), (name, chain.chain_id)
                assert len(chain) == int(lengths[chain.chain_id])
            assert chain.coords.shape == (len(chain), 4, 3) and chain.coords.dtype == np.float32
            assert chain.residue_numbers.shape == (len(chain),) and len(chain.insertion_codes) == len(chain)
            checked += 1
    assert checked == sum(int(r["n_protein_chains"]) for r in manifest.values())


def test_method_and_resolution(sample_dir):
    (chain,) = parse_structure(sample_dir / "1aki.cif.gz")
    assert chain.method == "X-RAY DIFFRACTION" and chain.resolution == pytest.approx(1.5)
    nmr = parse_structure(sample_dir / "1qm2.pdb.gz")[0]
    assert nmr.method == "SOLUTION NMR" and nmr.resolution is None
    em = parse_structure(sample_dir / "3zee.cif.gz")[0]
    assert em.method == "ELECTRON MICROSCOPY" and em.resolution == pytest.approx(6.1)
    # PDownB files carry no header at all: unknown, never 0.0.
    bare = parse_structure(sample_dir / "1a8q.pdb.gz")[0]
    assert bare.method is None and bare.resolution is None


def test_selenomethionine_is_methionine_and_ligands_ignored(sample_dir):
    (chain,) = parse_structure(sample_dir / "1a8o.pdb.gz")
    text = gzip.open(sample_dir / "1a8o.pdb.gz", "rt").read()
    mse = {int(line[22:26]) for line in text.splitlines() if line.startswith("HETATM") and line[17:20] == "MSE"}
    assert mse, "the file should hold MSE residues"
    for number in mse:
        position = chain.residue_numbers.tolist().index(number)
        assert chain.sequence[position] == "M"
    assert len(chain) == 70  # the waters and other HETATM groups are not residues of the chain


def test_insertion_codes_key_residues(sample_dir, edge_dir):
    (chain,) = parse_structure(edge_dir / "insertion_codes_fragment_1bd2.pdb.gz")
    assert len(chain) == 9 and "54A" in chain.residue_ids and "54" in chain.residue_ids
    assert np.isnan(chain.coords[0, 0]).all() and np.isfinite(chain.coords[0, 1]).all()  # first residue has no N
    chains = parse_structure(sample_dir / "1dix.pdb.gz")
    ids = [(c.chain_id, r) for c in chains for r in c.residue_ids]
    assert len(ids) == len(set(ids)) and any(not r[-1].isdigit() for _, r in ids)


def test_negative_residue_numbers(sample_dir):
    chain = parse_structure(sample_dir / "1o1z.cif.gz")[0]
    assert chain.residue_numbers.min() < 0


def test_nmr_takes_model_one(edge_dir):
    (chain,) = parse_structure(edge_dir / "nmr_multimodel_1lvz.pdb.gz")
    text = gzip.open(edge_dir / "nmr_multimodel_1lvz.pdb.gz", "rt").read()
    first_ca = next(l for l in text.splitlines() if l.startswith("ATOM") and l[12:16] == " CA ")
    xyz = [float(first_ca[30:38]), float(first_ca[38:46]), float(first_ca[46:54])]
    assert np.allclose(chain.coords[0, 1], xyz, atol=1e-3)
    assert len(chain) == 11 and chain.method == "SOLUTION NMR"


@pytest.mark.parametrize(
    "name, reason",
    [
        ("empty.pdb", "empty file"),
        ("truncated_1crn.pdb", "unreadable PDB"),
        ("hetatm_only_1mbn_heme.pdb", "no protein chain"),
        ("dna_only_1bna.pdb.gz", "no protein chain"),
        ("malformed_minimal_4q9r.cif", "unreadable MMCIF"),
    ],
)
def test_unreadable_files_raise_one_typed_error(edge_dir, name, reason):
    with pytest.raises(StructureError) as info:
        parse_structure(edge_dir / name)
    assert name in str(info.value) and reason in info.value.reason


def test_ca_only_and_missing_backbone_atoms_are_nan(edge_dir):
    (chain,) = parse_structure(edge_dir / "ca_only_1crn.pdb")
    assert len(chain) == 46
    assert np.isfinite(chain.coords[:, 1]).all() and np.isnan(chain.coords[:, [0, 2, 3]]).all()
    assert not chain.backbone_complete.any()

    chains = {c.chain_id: c for c in parse_structure(edge_dir / "missing_backbone_atoms_4x1v.pdb.gz")}
    def atoms_present(chain_id, number):
        chain = chains[chain_id]
        row = chain.coords[chain.residue_numbers.tolist().index(number)]
        return [bool(np.isfinite(atom).all()) for atom in row]
    assert atoms_present("A", 109) == [False, False, True, True]
    assert atoms_present("A", 168) == [True, True, False, False]
    assert atoms_present("B", 77) == [False, True, True, True]
    assert atoms_present("B", 90) == [True, True, False, False]


def test_duplicate_atoms_keep_first_copy(edge_dir):
    (chain,) = parse_structure(edge_dir / "duplicate_atoms_no_altloc_1crn.pdb")
    assert len(chain) == 46 and chain.backbone_complete.all()


def test_d_amino_acids_are_reported_as_x_not_dropped(edge_dir):
    chains = parse_structure(edge_dir / "d_amino_acids_2q33.pdb.gz")
    assert sum(len(c) for c in chains) == 91  # all residues kept, only glycine is recognisable
    assert set("".join(c.sequence for c in chains)) == {"X", "G"}
    assert any("DAL" in note for c in chains for note in c.notes)


def test_mmcif_gzip(edge_dir):
    (chain,) = parse_structure(edge_dir / "1crn.cif.gz")
    assert chain.sequence.startswith("TTCCPSIVARSNFNVCRLPGTPEA") and len(chain) == 46


def _crambin_residues(edge_dir, count=3):
    """The first residues of 1CRN as (resname, resseq, {atom: xyz})."""
    residues = {}
    for line in (edge_dir / "duplicate_atoms_no_altloc_1crn.pdb").read_text().splitlines():
        if line.startswith("ATOM"):
            number = int(line[22:26])
            if number > count:
                break
            residues.setdefault(number, (line[17:20], {}))[1].setdefault(
                line[12:16].strip(), [float(line[30:38]), float(line[38:46]), float(line[46:54])])
    return residues


def _crambin_with_alternates(edge_dir, path, alternates: dict):
    """1CRN's first residues as PDB text; ``alternates[(number, atom)]`` lists (altloc, occupancy, shift in Å)
    copies written in that order instead of the atom."""
    lines, serial = [], 1
    for number, (resname, atoms) in _crambin_residues(edge_dir).items():
        for name, xyz in atoms.items():
            for altloc, occupancy, shift in alternates.get((number, name), [(" ", 1.0, 0.0)]):
                lines.append(pdb_atom_line(serial, name, resname, "A", number, [x + shift for x in xyz], occupancy,
                                           altloc))
                serial += 1
    path.write_text("\n".join(lines + ["END"]) + "\n")
    return path


def test_altloc_highest_occupancy_and_tie_takes_first(tmp_path, edge_dir):
    path = _crambin_with_alternates(edge_dir, tmp_path / "altlocs.pdb", {
        (1, "CA"): [("A", 0.3, 0.0), ("B", 0.7, 1.0)],  # occupancy 0.3 (A) vs 0.7 (B): B wins
        (2, "CA"): [("B", 0.5, 2.0), ("A", 0.5, 0.0)],  # 0.5 / 0.5 tie: the first written (here B) wins
    })
    (chain,) = parse_structure(path)
    residues = _crambin_residues(edge_dir)
    assert np.allclose(chain.coords[0, 1], np.add(residues[1][1]["CA"], 1), atol=1e-3)
    assert np.allclose(chain.coords[1, 1], np.add(residues[2][1]["CA"], 2), atol=1e-3)


def test_modified_unknown_and_point_mutation_residues(tmp_path, edge_dir):
    residues = _crambin_residues(edge_dir, count=4)
    lines, serial = [], 1
    for number, (resname, atoms) in residues.items():
        record, name_out = "ATOM", resname
        if number == 1:
            record, name_out = "HETATM", "SEP"  # phosphoserine → S through the extended table
        if number == 2:
            record, name_out = "HETATM", "ZZZ"  # not in any table but has a backbone → X
        for name, xyz in atoms.items():
            if number == 4:  # a point mutation: SER at 0.3, ALA at 0.7 in the same position
                for altloc, alt_name, occupancy in (("A", "SER", 0.3), ("B", "ALA", 0.7)):
                    lines.append(pdb_atom_line(serial, name, alt_name, "A", number, xyz, occupancy, altloc)); serial += 1
                continue
            lines.append(pdb_atom_line(serial, name, name_out, "A", number, xyz, record=record)); serial += 1
    lines.append(pdb_atom_line(serial, "O", "HOH", "A", 100, [0, 0, 0], record="HETATM"))
    lines.append(pdb_atom_line(serial + 1, "FE", "HEM", "A", 101, [1, 1, 1], record="HETATM"))
    path = tmp_path / "modified.pdb"
    path.write_text("\n".join(lines + ["END"]) + "\n")
    (chain,) = parse_structure(path)
    assert chain.sequence == "SXCA"
    assert chain.notes == ["mapped to X: ZZZ"]


def test_gzip_bomb_is_refused(tmp_path):
    path = tmp_path / "big.pdb.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(b"REMARK" + b" " * (4 << 20))
    assert path.stat().st_size < 100_000
    with pytest.raises(StructureError, match="inflates past"):
        parse_structure(path, max_bytes=1 << 20)


def test_unsupported_and_missing_files(tmp_path):
    with pytest.raises(StructureError, match="unsupported file type"):
        parse_structure(tmp_path / "notes.txt")
    with pytest.raises(StructureError, match="no such file"):
        parse_structure(tmp_path / "absent.pdb")
    bad = tmp_path / "broken.pdb.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(StructureError, match="cannot read"):
        parse_structure(bad)


BOMB_MEMORY = """
import resource, sys
from protmask.structure import StructureError, parse_structure
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    parse_structure(sys.argv[1], max_bytes=100 << 20)
except StructureError as error:
    print(error.reason)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_a_refused_bomb_is_never_held_in_memory(tmp_path):
    # 400 MB of text in a 400 kB gzip, over a 100 MB limit: refused while counting, holding 1 MiB at a time.
    path = tmp_path / "bomb.pdb.gz"
    with gzip.open(path, "wb", compresslevel=1) as handle:
        line = b"ATOM  " + b" " * 74 + b"\n"
        for _ in range(400):
            handle.write(line * 13_000)
    done = subprocess.run([sys.executable, "-c", BOMB_MEMORY, str(path)], capture_output=True, text=True, timeout=120)
    reason, grown_mb = done.stdout.strip().splitlines()
    assert "inflates past 100 MB" in reason and "without reading it into memory" in reason
    assert int(grown_mb) < 20


# ------------------------------------------------------------------------- polymer-true chains, other atoms

def _write_pdb(path, residues, extra=(), header=()):
    """``residues``: (record, resname, chain, number, {atom: xyz}) in file order; ``extra``: more lines."""
    lines, serial = list(header), 1
    for record, resname, chain, number, atoms in residues:
        for name, xyz in atoms.items():
            element = "SE" if name == "SE" else None
            lines.append(pdb_atom_line(serial, name, resname, chain, number, xyz, record=record, element=element))
            serial += 1
    path.write_text("\n".join(lines + list(extra) + ["END"]) + "\n")
    return path


def _crambin(edge_dir, count=46):
    return [("ATOM", resname, "A", number, atoms) for number, (resname, atoms) in _crambin_residues(edge_dir, count).items()]


def _moved(atoms, by):
    return {name: [x + by for x in xyz] for name, xyz in atoms.items()}


def test_a_free_amino_acid_is_a_ligand_and_other_atoms_are_kept_by_class(tmp_path, edge_dir):
    from protmask.structure import ATOM_CLASSES, parse_entry

    crambin = _crambin(edge_dir)
    glu = next(atoms for _, resname, _, _, atoms in crambin if resname == "GLU")
    ligands = [("HETATM", "GLU", "A", 901, _moved(glu, 30.0)),  # a free glutamate, 30 Å from the chain
               ("HETATM", "ADP", "A", 902, {"PB": [40.0, 0, 0], "C1'": [41.0, 0, 0], "H1": [41.5, 0, 0]}),
               ("HETATM", "HOH", "A", 903, {"O": [50.0, 0, 0]}),
               ("ATOM", "DA", "B", 1, {"P": [60.0, 0, 0], "C1'": [61.0, 0, 0], "N9": [62.0, 0, 0]})]
    extra = [pdb_atom_line(900, "ZN", "ZN", "A", 904, [70.0, 0, 0], record="HETATM", element="ZN")]
    plain = parse_entry(_write_pdb(tmp_path / "plain.pdb", crambin))
    entry = parse_entry(_write_pdb(tmp_path / "ligands.pdb", crambin + ligands, extra))
    (chain,) = entry.chains
    assert chain.sequence == plain.chains[0].sequence == "TTCCPSIVARSNFNVCRLPGTPEAICATYTGCIIIPGATCPGDYAN"
    assert len(plain.atoms) == 0
    atoms = entry.atoms
    by_name = {}
    for name, element, klass in zip(atoms.residue_names, atoms.elements, atoms.classes):
        by_name.setdefault(name, []).append((element, ATOM_CLASSES[klass]))
    assert len(by_name["GLU"]) == len(glu) == 9 and {k for _, k in by_name["GLU"]} == {"small_molecule"}
    assert by_name["ADP"] == [("P", "small_molecule"), ("C", "small_molecule")]  # a free nucleotide, no hydrogen
    assert by_name["DA"] == [("P", "nucleotide"), ("C", "nucleotide"), ("N", "nucleotide")]
    assert by_name["ZN"] == [("ZN", "metal")] and "HOH" not in by_name
    first_glu = atoms.residue_names.index("GLU")
    assert np.allclose(atoms.coords[first_glu], np.add(glu["N"], 30.0), atol=1e-3)
    assert atoms.chain_ids[atoms.residue_names.index("DA")] == "B"
    assert atoms.residue_numbers[first_glu] == 901


def test_selenomethionine_inside_a_chain_bonded_or_declared(tmp_path, edge_dir):
    from protmask.structure import parse_entry

    crambin = _crambin(edge_dir, count=6)
    crambin[2] = ("HETATM", "MSE", "A", 3, {**crambin[2][4], "SE": [0.0, 0.0, 0.0]})  # bonded to both neighbours
    # A C-terminal MSE after a gap: not bonded to anything. Declared by MODRES, it is a residue; without, a ligand.
    terminal = ("HETATM", "MSE", "A", 20, _moved(crambin[5][4], 15.0))
    modres = ["MODRES 1XYZ MSE A   20  MET  SELENOMETHIONINE"]
    bonded = parse_entry(_write_pdb(tmp_path / "mse.pdb", crambin + [terminal]))
    declared = parse_entry(_write_pdb(tmp_path / "modres.pdb", crambin + [terminal], header=modres))
    assert bonded.chains[0].sequence == "TTMCPS" and set(bonded.atoms.residue_names) == {"MSE"}
    assert bonded.atoms.residue_numbers.tolist() == [20] * len(terminal[4])
    assert declared.chains[0].sequence == "TTMCPSM" and len(declared.atoms) == 0


def test_mmcif_polymer_membership_comes_from_label_seq_id(tmp_path, edge_dir):
    # 1CRN's last residue, ASN 46, rewritten as a HETATM modified residue moved 12 Å away (no peptide bond):
    # with its label_seq_id it stays in the polymer; with "." it is a ligand.
    from protmask.structure import parse_entry

    text = gzip.open(edge_dir / "1crn.cif.gz", "rt").read().splitlines()

    def rewrite(seq_id):
        lines = []
        for line in text:
            fields = line.split()
            if line.startswith("ATOM") and fields[8] == "46":
                fields[0], fields[5], fields[8] = "HETATM", "MEN", seq_id  # N-methyl asparagine → N
                fields[10:13] = [f"{float(v) + 12:.3f}" for v in fields[10:13]]
                fields[-4] = "MEN"
                line = " ".join(fields)
            lines.append(line)
        path = tmp_path / f"crambin-{seq_id.strip('.') or 'dot'}.cif"
        path.write_text("\n".join(lines) + "\n")
        return parse_entry(path)

    kept, ligand = rewrite("46"), rewrite(".")
    assert kept.chains[0].sequence.endswith("DYAN") and len(kept.chains[0]) == 46 and len(kept.atoms) == 0
    assert len(ligand.chains[0]) == 45 and set(ligand.atoms.residue_names) == {"MEN"}
    assert (kept.entry_id, kept.deposition_date, kept.release_date) == ("1crn", "1981-04-30", "1981-07-28")


def test_alternate_locations_are_chosen_per_residue(tmp_path, edge_dir):
    # Residue 2 in two conformers. N prefers A (0.6), CA, C and O prefer B (0.6): the residue's mean
    # occupancy picks B for all four atoms, so N and CA never come from different conformers.
    occupancy = {"N": (0.6, 0.4), "CA": (0.4, 0.6), "C": (0.4, 0.6), "O": (0.4, 0.6)}
    path = _crambin_with_alternates(edge_dir, tmp_path / "conformers.pdb", {
        (2, name): [("A", a, 0.0), ("B", b, 0.5)] for name, (a, b) in occupancy.items()})
    (chain,) = parse_structure(path)
    _, atoms = _crambin_residues(edge_dir)[2]
    for column, name in enumerate(("N", "CA", "C", "O")):
        assert np.allclose(chain.coords[1, column], np.add(atoms[name], 0.5), atol=1e-3), name


@pytest.mark.parametrize("name, entry, assembly", [
    ("pdb1abc.ent.gz", "1abc", None), ("1ABC.pdb", "1abc", None), ("1abc-assembly2.cif.gz", "1abc", "2"),
    ("ab/1abc.pdb1.gz", "1abc", "1"), ("1abc.cif", "1abc", None), ("my_design.pdb", "my_design", None)])
def test_entry_ids_from_wwpdb_and_pdbe_file_names(name, entry, assembly):
    from protmask.structure import entry_id_from_name

    assert entry_id_from_name(name) == (entry, assembly)


def test_the_header_id_and_dates_win_over_the_file_name(tmp_path, sample_dir):
    from protmask.structure import parse_entry

    text = gzip.open(sample_dir / "1a8o.pdb.gz", "rt").read()
    renamed = tmp_path / "pdb9xyz.ent"
    renamed.write_text("HEADER    VIRAL PROTEIN                           27-MAR-98   1A8O              \n"
                       "REVDAT   1   14-OCT-98 1A8O    0                                                \n" + text)
    entry = parse_entry(renamed)
    assert (entry.entry_id, entry.deposition_date, entry.release_date) == ("1a8o", "1998-03-27", "1998-10-14")
    bare = parse_entry(sample_dir / "5emb.pdb.gz")  # no HEADER: the name, and no dates
    assert (bare.entry_id, bare.deposition_date, bare.release_date) == ("5emb", None, None)
