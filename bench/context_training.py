"""Atomic context in training, measured at binding sites: a ligand-aware model from scratch against the same
model without context at equal data and steps, and a short fine-tuning of converted LigandMPNN weights,
before and after. Every model is scored by `protmask evaluate --split test --decoding autoregressive` on one
split of the shared set: recovery of greedy designs over whole chains and at small-molecule, metal and
nucleotide sites (the LigandMPNN paper's rule: side-chain heavy atoms within 5 Å of such an atom; run.py's,
virtual CB within 8 Å, beside it).

    python bench/context_training.py --steps 100      # both comparisons; the context model takes ~8 s a step on 2 cores
    python bench/context_training.py --variants scratch_context scratch_blind --steps 100 --seeds 0 1
    python bench/context_training.py --variants finetune_ligandmpnn --finetune_steps 20 \
        --before bench/results/ligandmpnn_evaluate.json --keep
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import ROOT, default_pdb_path, emit, machine, protmask, train_protmask

#: The from-scratch pair: ProteinMPNN's recipe and objective at the recipe benchmark's size (hidden 64, 16
#: neighbours, 2 + 2 layers, 2000-residue batches, crop 300), the one difference being the context atoms.
SCRATCH = ["--recipe", "proteinmpnn", "--hidden_dim", "64", "--num_neighbors", "16", "--num_encoder_layers", "2",
           "--num_decoder_layers", "2", "--max_tokens_per_batch", "2000", "--max_length", "300", "--warmup_steps",
           "30", "--backbone_noise", "0.02", "--num_workers", "0", "--logging_steps", "50",
           "--checkpointing_steps", "100000"]
#: Fine-tuning the converted model: ProteinMPNN's objective at a low constant rate, its own noise and dropout.
FINETUNE = ["--objective", "autoregressive", "--learning_rate", "1e-4", "--max_tokens_per_batch", "2000",
            "--max_length", "300", "--num_workers", "0", "--logging_steps", "10", "--checkpointing_steps", "100000"]
VARIANTS = {
    "scratch_context": SCRATCH + ["--context_atoms", "25"],
    "scratch_blind": SCRATCH + ["--context_atoms", "0"],
    "finetune_ligandmpnn": FINETUNE,
}


def evaluate(dataset: str, model: Path, output: Path) -> dict:
    protmask("evaluate", "--model", model, "--pdb_path", dataset, "--split", "test", "--decoding", "autoregressive",
             "--output", output)
    return summary(json.loads(output.read_text()))


def summary(metrics: dict) -> dict:
    """The figures kept of an evaluate JSON: whole-chain and per-site-class recovery, by each site rule."""
    def sites(key):
        return {name: {k: site[k] for k in ("num_chains", "num_residues", "recovery", "recovery_per_chain_median")}
                for name, site in metrics[key].items()}

    return {"teacher_forced_accuracy": metrics["teacher_forced_accuracy"],
            "design_recovery_median": metrics["design_recovery_median"],
            "design_recovery_mean": metrics["design_recovery_mean"],
            "sites": sites("design_recovery_at_sites"), "site_definition": metrics["site_definition"],
            "sites_virtual_cb": sites("design_recovery_at_sites_virtual_cb")}


def converted_ligandmpnn(work: Path) -> Path:
    from protmask.models.convert_ligandmpnn import convert_ligandmpnn

    folder = work / "ligandmpnn_v_32_010_25"
    if not folder.exists():
        convert_ligandmpnn("ligandmpnn_v_32_010_25", folder)
    return folder


def run(variant: str, seed: int, steps: int, dataset: str, work: Path, before: dict | None = None) -> dict:
    argv = VARIANTS[variant] + ["--max_train_steps", str(steps), "--seed", str(seed)]
    result = {"variant": variant, "seed": seed, "steps": steps}
    if variant == "finetune_ligandmpnn":
        start = converted_ligandmpnn(work)
        argv += ["--model_name_or_path", str(start)]
        result["before"] = before or evaluate(dataset, start, work / "before.json")
    output = work / f"{variant}-seed{seed}"
    result["train_seconds"] = train_protmask(dataset, argv, output)["train_seconds"]
    result["after" if variant == "finetune_ligandmpnn" else "test"] = evaluate(dataset, output / "final",
                                                                              output / "test_metrics.json")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pdb_path", default=default_pdb_path())
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=300, help="from-scratch steps")
    parser.add_argument("--finetune_steps", type=int, default=40)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "context_training.json"))
    parser.add_argument("--cache_dir", default=None, help="the dataset build's cache (default: a temporary one); "
                                                          "a build of the same files and options is reused")
    parser.add_argument("--before", default=None,
                        help="the converted model's evaluation on the same test split, to reuse for the fine-tuning's "
                             "'before' (bench/results/ligandmpnn_evaluate.json holds it): it takes minutes")
    parser.add_argument("--keep", action="store_true", help="keep the output's runs of other variants and seeds")
    args = parser.parse_args()
    from protmask.data.build import build_dataset

    before = None
    if args.before:
        before = summary(json.loads(Path(args.before).read_text())["models"]["ligandmpnn_v_32_010_25"])
    kept = json.loads(Path(args.output).read_text())["runs"] if args.keep and Path(args.output).is_file() else []
    with tempfile.TemporaryDirectory(prefix="protmask-bench-") as work:
        work = Path(work)
        built = build_dataset(args.pdb_path, args.cache_dir or work / "cache", log=lambda *a: None)
        runs = []
        for seed in args.seeds:
            for variant in args.variants:
                steps = args.finetune_steps if variant == "finetune_ligandmpnn" else args.steps
                runs.append(run(variant, seed, steps, str(built.path), work, before))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
                done = {(r["variant"], r["seed"]) for r in runs}
                every = [r for r in kept if (r["variant"], r["seed"]) not in done] + runs
                emit({"benchmark": "context_training", "machine": machine(), "pdb_path": args.pdb_path,
                      "test_split": built.report["splits"]["test"],
                      "variants": {v: " ".join(VARIANTS[v]) for v in sorted({r["variant"] for r in every})},
                      "runs": every}, args.output)


if __name__ == "__main__":
    main()
