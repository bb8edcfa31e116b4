"""The ``protmask`` command: build-dataset, train, design, evaluate, plot."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_dataset_command(argv) -> int:
    from .data.build import DatasetBuildError, build_dataset
    from .training.arguments import add_data_arguments, build_options

    parser = argparse.ArgumentParser(
        prog="protmask build-dataset",
        description="Parse structure files into an Arrow dataset (train / validation / test) cached on disk, "
                    "with build_report.json accounting for every file.",
    )
    add_data_arguments(parser)
    parser.add_argument("--force", action="store_true", help="rebuild even when a cached build matches")
    args = parser.parse_args(argv)
    try:
        result = build_dataset(args.pdb_path, args.cache_dir, build_options(args), num_proc=args.num_proc, force=args.force)
    except DatasetBuildError as error:
        print(f"protmask build-dataset: error: {error}", file=sys.stderr)
        return 2
    print(result.path)
    return 0


def train_command(argv) -> int:
    from .training.loop import main

    return main(argv)


def load_model_for(command: str, args):
    """(model, processor) on --device (default: CUDA when there is one), or None after saying why not."""
    import torch

    from .design import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return load_model(args.model, device)
    except OSError as error:
        print(f"protmask {command}: error: cannot load the model {args.model}: {error}", file=sys.stderr)
        return None


def design_command(argv) -> int:
    from .design import DesignError, design_sequences, write_fasta
    from .structure import StructureError

    parser = argparse.ArgumentParser(
        prog="protmask design",
        description="Design sequences for a backbone, or fill in masked positions, with a trained model. "
                    "Writes FASTA: the native sequence, then each design with its recovery against native and "
                    "mean per-residue probability.")
    parser.add_argument("--model", required=True, help="a save_pretrained folder (final/ or best/ of a run), or a hub id")
    parser.add_argument("--pdb", required=True, help="the structure file (.pdb, .cif, .ent, optionally .gz)")
    parser.add_argument("--chains", default=None, help="chains to design, e.g. A,B (default: all; others stay as context)")
    parser.add_argument("--fix", default=None, help="native residues to keep, e.g. 'A1-10,A45' (file numbering)")
    parser.add_argument("--fill", default=None,
                        help="the designed chains' sequence with positions to fill written as _ (chains may be "
                             "separated by /); only those are designed")
    parser.add_argument("--num_samples", type=int, default=1, help="designs to write")
    parser.add_argument("--temperature", type=float, default=0.1,
                        help="0 takes the most likely residue; higher samples more diverse sequences")
    parser.add_argument("--rounds", type=int, default=10, help="mask-predict rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True, help="FASTA file to write")
    parser.add_argument("--probabilities", default=None,
                        help="also write a TSV of each designed position: chain, residue, native, designed, probability")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.rounds < 1 or args.temperature < 0:
        parser.error("--num_samples and --rounds must be positive and --temperature zero or more")
    loaded = load_model_for("design", args)
    if loaded is None:
        return 2
    model, processor = loaded
    try:
        result = design_sequences(model, processor, args.pdb, chains=args.chains.split(",") if args.chains else None,
                                  fix=args.fix, fill=args.fill, num_samples=args.num_samples,
                                  temperature=args.temperature, seed=args.seed, rounds=args.rounds)
    except (DesignError, StructureError) as error:
        print(f"protmask design: error: {error}", file=sys.stderr)
        return 2
    write_fasta(result, args.output)
    if args.probabilities:
        lines = ["sample\tchain\tresidue\tnative\tdesigned\tprobability"]
        for number, item in enumerate(result.designs, 1):
            lines += [f"{number}\t{c}\t{r}\t{n}\t{d}\t{p:.4f}" for c, r, n, d, p in item.positions]
        Path(args.probabilities).write_text("\n".join(lines) + "\n")
    for number, item in enumerate(result.designs, 1):
        print(f"design {number}: recovery {item.recovery:.3f}, mean probability {item.mean_probability:.3f}, "
              f"{result.designed_positions} positions designed")
    print(f"wrote {args.output}")
    return 0


def evaluate_command(argv) -> int:
    import json

    from .data.build import DatasetBuildError
    from .evaluation import evaluate, examples_from, format_table

    parser = argparse.ArgumentParser(
        prog="protmask evaluate",
        description="Evaluate a trained model on structures: masked accuracy and perplexity at the model's "
                    "training mask ratio (fixed seeded masks), recovery of full designs from structure alone, "
                    "by chain length, with random and most-frequent-residue baselines.")
    parser.add_argument("--model", required=True, help="a save_pretrained folder or hub id")
    parser.add_argument("--pdb_path", required=True,
                        help="structure folder, file or list file, or a built dataset (see --split)")
    parser.add_argument("--split", default=None, help="with a built dataset: train, validation or test (default: all)")
    parser.add_argument("--min_length", type=int, default=20, help="skip chains shorter than this (as the build does)")
    parser.add_argument("--max_length", type=int, default=None, help="crop longer examples")
    parser.add_argument("--max_tokens", type=int, default=4000, help="padded residues per batch")
    parser.add_argument("--rounds", type=int, default=10, help="mask-predict rounds for the designs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fixed masks")
    parser.add_argument("--output", default=None, help="write the metrics as JSON here")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    try:
        examples, failed = examples_from(args.pdb_path, args.split, args.min_length)
    except DatasetBuildError as error:
        print(f"protmask evaluate: error: {error}", file=sys.stderr)
        return 2
    if not examples:
        print(f"protmask evaluate: error: no usable structure in {args.pdb_path}", file=sys.stderr)
        return 2
    loaded = load_model_for("evaluate", args)
    if loaded is None:
        return 2
    model, processor = loaded
    metrics = evaluate(model, processor, examples, max_tokens=args.max_tokens, rounds=args.rounds, seed=args.seed,
                       max_length=args.max_length)
    metrics["files_failed"] = failed
    metrics["model"] = str(args.model)
    metrics["pdb_path"] = str(args.pdb_path)
    print(format_table(metrics))
    for item in failed:
        print(f"  not evaluated: {item['file']}: {item['error']}")
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=1))
        print(f"wrote {args.output}")
    return 0


def plot_command(argv) -> int:
    parser = argparse.ArgumentParser(prog="protmask plot",
                                     description="Draw a run's training and validation curves from metrics.jsonl.")
    parser.add_argument("--run", required=True, help="the --save_dir of a training run")
    parser.add_argument("--output", default=None, help="PNG to write (default: RUN/training_curves.png)")
    args = parser.parse_args(argv)
    try:
        from .plotting import plot_run

        path = plot_run(args.run, args.output)
    except ImportError:
        print("protmask plot: error: needs matplotlib: pip install 'protmask[plot]'", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        print(f"protmask plot: error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


COMMANDS = {
    "build-dataset": (build_dataset_command, "parse structure files into a cached Arrow dataset"),
    "train": (train_command, "train a model (the same flags as train_accelerate.py)"),
    "design": (design_command, "design or fill in sequences for a backbone"),
    "evaluate": (evaluate_command, "evaluate a trained model on structure files"),
    "plot": (plot_command, "draw a training run's curves"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: protmask COMMAND [options]   (protmask COMMAND --help for its options)", "", "commands:"]
        lines += [f"  {name:15s} {text}" for name, (_, text) in COMMANDS.items()]
        print("\n".join(lines), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, _ = COMMANDS[argv[0]]
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
