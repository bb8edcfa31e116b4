"""The ``protmask`` command: build-dataset, train, design, evaluate, plot."""

from __future__ import annotations

import argparse
import sys


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


COMMANDS = {
    "build-dataset": (build_dataset_command, "parse structure files into a cached Arrow dataset"),
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
