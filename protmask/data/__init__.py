"""Data: structure files → Arrow dataset on disk (`build`), batches for the model (`collator`, `sampler`)."""

from pathlib import Path

#: The structures shipped with the package: the default ``--pdb_path``.
SAMPLE_DATA = Path(__file__).resolve().parent.parent / "sample_data"
