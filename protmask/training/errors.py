"""The one error type the trainer explains to the user (exit status 2)."""


class TrainingError(RuntimeError):
    """A problem with the flags, the data, the save folder or the run, explained for the user."""
