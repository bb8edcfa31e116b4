"""ProteinMPNN's training-set layout (pdb_2021aug02) as --pdb_path: a small folder in that exact format,
written from real structures."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from protmask.data.build import BuildOptions, build_dataset
from protmask.structure import parse_entry
from runner import TINY, launch

quiet = dict(log=lambda *a, **k: None)
# entry → (deposition date, resolution, cluster of each chain in file order)
ENTRIES = {"1a28": ("1998-01-20", 1.8, ["10", "10"]), "1a8q": ("1998-03-01", 1.7, ["11"]),
           "1aki": ("1997-05-19", 1.5, ["12"]), "5emb": ("2015-10-27", 2.1, ["13", "14"]),
           "1p3c": ("2003-04-10", 4.0, ["15"]), "2fr2": ("2006-01-19", 2.0, ["16"]),
           "3fh2": ("2008-12-08", 1.9, ["17"]), "4bpy": ("2013-06-01", 2.5, ["18"])}
TEST, VALIDATION = {"13"}, {"12"}
SHIFT = np.array([30.0, 0.0, 0.0], dtype=np.float32)  # 1a8q's assembly: the chain and a copy moved 30 Å


def write_set(sample_dir, folder: Path) -> Path:
    rows = []
    for pdb_id, (date, resolution, clusters) in ENTRIES.items():
        source = next(sample_dir.glob(f"{pdb_id}.*"))
        chains = parse_entry(source).chains
        prefix = folder / "pdb" / pdb_id[1:3] / pdb_id
        prefix.parent.mkdir(parents=True, exist_ok=True)
        for chain, cluster in zip(chains, clusters):
            xyz = torch.full((len(chain), 14, 3), float("nan"))
            xyz[:, :4] = torch.from_numpy(chain.coords)
            torch.save({"seq": chain.sequence, "xyz": xyz, "mask": torch.isfinite(xyz).all(-1),
                        "bfac": torch.zeros(len(chain), 14), "occ": torch.ones(len(chain), 14)},
                       f"{prefix}_{chain.chain_id}.pt")
            rows.append([f"{pdb_id}_{chain.chain_id}", date, resolution, "000000", cluster, chain.sequence])
        ids = [c.chain_id for c in chains]
        xform = torch.eye(4)[None].repeat(2 if pdb_id == "1a8q" else 1, 1, 1)
        if pdb_id == "1a8q":
            xform[1, :3, 3] = torch.from_numpy(SHIFT)
        torch.save({"method": "x-ray diffraction", "date": date, "resolution": resolution, "chains": ids,
                    "tm": torch.zeros(len(ids), len(ids), 3), "asmb_ids": ["1"], "asmb_details": ["author"],
                    "asmb_method": ["?"], "asmb_chains": [",".join(ids)], "asmb_xform0": xform}, f"{prefix}.pt")
    with open(folder / "list.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["CHAINID", "DEPOSITION", "RESOLUTION", "HASH", "CLUSTER", "SEQUENCE"])
        writer.writerows(rows)
    (folder / "test_clusters.txt").write_text("\n".join(sorted(TEST)) + "\n")
    (folder / "valid_clusters.txt").write_text("\n".join(sorted(VALIDATION)) + "\n")
    return folder


@pytest.fixture
def mpnn_set(sample_dir, tmp_path):
    return write_set(sample_dir, tmp_path / "pdb_2021aug02_sample")


def test_the_set_is_read_with_its_split_clusters_assemblies_and_filters(mpnn_set, tmp_path):
    result = build_dataset(mpnn_set, tmp_path / "cache", BuildOptions(max_resolution=3.5, date_cutoff="2014-01-01"),
                           num_proc=2, **quiet)
    where = {row["name"]: split for split in result.dataset for row in result.dataset[split]}
    rows = {row["name"]: row for split in result.dataset for row in result.dataset[split]}
    # 1p3c (4.0 Å) and 5emb (deposited 2015) are left out by ProteinMPNN's filters.
    assert set(where) == {f"{i}-assembly1" for i in ENTRIES} - {"1p3c-assembly1", "5emb-assembly1"}
    assert where["1aki-assembly1"] == "validation" and set(where.values()) == {"train", "validation"}
    assert rows["1a28-assembly1"]["cluster_ids"] == ["10", "10"]
    assert result.report["split_by"].startswith("ProteinMPNN's valid_clusters.txt")
    # The assembly's two transforms: two copies of 1a8q's chain, the second moved as its xform says.
    assembly = rows["1a8q-assembly1"]
    assert assembly["chain_ids"] == ["A", "A0.1"] and assembly["entry_id"] == "1a8q"
    coords = np.asarray(assembly["coords"]).reshape(-1, 4, 3)
    half = len(coords) // 2
    assert np.allclose(coords[half:], coords[:half] + SHIFT, equal_nan=True)
    # With the test date filter lifted, 5emb's chain of test cluster 13 puts the whole entry in test.
    everything = build_dataset(mpnn_set, tmp_path / "cache", BuildOptions(), num_proc=1, **quiet)
    assert {row["name"] for row in everything.dataset["test"]} == {"5emb-assembly1"}


def test_a_pt_file_is_never_unpickled_as_code(mpnn_set, tmp_path):
    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    torch.save({"seq": "A", "payload": Payload()}, mpnn_set / "pdb" / "a8" / "1a8q_A.pt")
    result = build_dataset(mpnn_set, tmp_path / "cache", BuildOptions(), num_proc=1, **quiet)
    assert not (tmp_path / "pwned").exists()
    (failed,) = result.report["files_failed"]
    assert failed["file"].endswith("pdb/a8/1a8q") and "unreadable ProteinMPNN .pt" in failed["error"]


def test_the_trainer_trains_on_the_set_with_cluster_sampling(mpnn_set, tmp_path):
    done = launch(TINY + ["--pdb_path", mpnn_set, "--cache_dir", tmp_path / "cache", "--max_tokens_per_batch", "1024",
                          "--max_train_steps", "2", "--save_dir", tmp_path / "run"])
    assert "sampling: cluster (one entry from each of" in done.stdout
    assert "ProteinMPNN's valid_clusters.txt and test_clusters.txt" in done.stdout
    assert json.loads((tmp_path / "run" / "final_metrics.json").read_text())["global_step"] == 2
