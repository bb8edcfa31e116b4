import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TESTS = Path(__file__).resolve().parent
EDGE_CASES = TESTS / "data" / "edge_cases"

from protmask.data import SAMPLE_DATA  # noqa: E402


def read_fasta(path):
    records, name = {}, None
    for line in Path(path).read_text().splitlines():
        if line.startswith(">"):
            name = line[1:].split()[0]
            records[name] = ""
        elif name:
            records[name] += line.strip()
    return records


def read_manifest(path):
    lines = Path(path).read_text().splitlines()
    header = lines[0].split("\t")
    return {row.split("\t")[0]: dict(zip(header, row.split("\t"))) for row in lines[1:]}


@pytest.fixture(scope="session")
def sample_dir():
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def edge_dir():
    return EDGE_CASES


@pytest.fixture(scope="session")
def sample_build(tmp_path_factory):
    """The shipped sample built once for the whole session."""
    from protmask.data.build import build_dataset

    return build_dataset(SAMPLE_DATA, tmp_path_factory.mktemp("sample-cache"), num_proc=2, log=lambda *a: None)


def pdb_atom_line(serial, name, resname, chain, resseq, xyz, occupancy=1.0, altloc=" ", icode=" ", record="ATOM",
                  element=None):
    """One fixed-column PDB ATOM/HETATM record."""
    element = element or name.strip()[0]
    atom_field = f" {name:<3s}" if len(name) < 4 else name
    return (
        f"{record:<6s}{serial:5d} {atom_field}{altloc}{resname:>3s} {chain}{resseq:4d}{icode}   "
        f"{xyz[0]:8.3f}{xyz[1]:8.3f}{xyz[2]:8.3f}{occupancy:6.2f}{20.0:6.2f}          {element:>2s}"
    )


@pytest.fixture(scope="session")
def cache(sample_build):
    """Training runs reuse the session's sample build (same inputs and options → same cache)."""
    return str(sample_build.path.parent)


@pytest.fixture(scope="session")
def uninterrupted(cache, tmp_path_factory):
    """7 steps on one process, checkpoints every 2: what resumed and interrupted runs must end equal to."""
    from runner import TINY, launch

    save_dir = tmp_path_factory.mktemp("uninterrupted")
    launch(TINY + ["--cache_dir", cache, "--max_tokens_per_batch", "1024", "--checkpointing_steps", "2",
                   "--max_train_steps", "7", "--save_dir", save_dir])
    return save_dir
