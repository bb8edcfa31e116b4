"""What a dataset build is asked for (`BuildOptions`, all of it in the fingerprint), its error type, and the
names every build room shares."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .clusters import ClusteringError, find_mmseqs

#: Bump when the row layout or the parsing rules change, so that old caches are rebuilt.
BUILD_FORMAT_VERSION = 2


#: Above this share of kept chains missing from --cluster_file, the build warns.
UNCLUSTERED_WARNING_SHARE = 0.05
REPORT_NAME = "build_report.json"
SPLITS = ("train", "validation", "test")


class DatasetBuildError(ValueError):
    """The inputs cannot make a dataset; the message says which path or option and what to do."""


@dataclass
class BuildOptions:
    """What decides the content of a built dataset (all of it enters the cache fingerprint)."""

    min_length: int = 20
    max_resolution: float | None = None
    max_unknown_fraction: float = 0.5
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    cluster_file: str | None = None
    cluster_identity: float | None = None  # MMseqs2 clustering of the kept chains
    cluster_coverage: float = 0.8
    split_seed: int = 0
    test_release_after: str | None = None  # ISO dates: the date split
    validation_release_after: str | None = None
    max_component_share: float = 0.5
    date_cutoff: str | None = None  # entries deposited after it are left out (ProteinMPNN's DATCUT)
    max_entry_length: int | None = None  # entries with more kept residues are left out (its max_protein_length)
    max_file_mb: int = 512
    backbone: str = "full"  # what a residue needs to count: "full" (N, CA, C, O) or "ca" (CA-only models)

    def validate(self) -> None:
        if self.min_length < 1:
            raise DatasetBuildError(f"--min_length must be at least 1, got {self.min_length}")
        if self.max_resolution is not None and self.max_resolution <= 0:
            raise DatasetBuildError(f"--max_resolution must be positive (Å), got {self.max_resolution}")
        if not 0.0 <= self.max_unknown_fraction <= 1.0:
            raise DatasetBuildError(f"--max_unknown_fraction must be in [0, 1], got {self.max_unknown_fraction}")
        for name in ("validation_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise DatasetBuildError(f"--{name} must be in [0, 1), got {value}")
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise DatasetBuildError("--validation_fraction + --test_fraction must leave some data for training (sum < 1)")
        if (self.test_release_after and self.validation_release_after
                and self.validation_release_after > self.test_release_after):
            raise DatasetBuildError(f"--validation_release_after {self.validation_release_after} is after "
                                    f"--test_release_after {self.test_release_after}: validation must come before test")
        if not 0.0 < self.max_component_share <= 1.0:
            raise DatasetBuildError(f"--max_component_share must be in (0, 1], got {self.max_component_share}")
        if self.cluster_identity is not None:
            if self.cluster_file:
                raise DatasetBuildError("give --cluster_file or --cluster_identity, not both")
            if not 0.0 < self.cluster_identity <= 1.0 or not 0.0 <= self.cluster_coverage <= 1.0:
                raise DatasetBuildError(f"--cluster_identity must be in (0, 1] and --cluster_coverage in [0, 1], got "
                                        f"{self.cluster_identity} and {self.cluster_coverage}")
            try:
                find_mmseqs()
            except ClusteringError as error:
                raise DatasetBuildError(str(error)) from None
        if self.backbone not in ("full", "ca"):
            raise DatasetBuildError(f"--backbone must be full or ca, got {self.backbone!r}")
        if self.max_file_mb < 1:
            raise DatasetBuildError(f"--max_file_mb must be at least 1, got {self.max_file_mb}")
        if self.cluster_file is not None and not Path(self.cluster_file).is_file():
            raise DatasetBuildError(f"--cluster_file {self.cluster_file} does not exist; give a TSV of chain → cluster id")
