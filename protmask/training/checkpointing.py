"""What a run keeps in ``--save_dir`` and how a later run finds it again.

    run.json                what defines the run (processes, batch, accumulation, seed, data, model) and its id
    .lock                   held by the run's main process while the run writes here
    checkpoint-NNNNNNNN/    accelerate's save_state + trainer_state.json (written last, then renamed into place)
    best/  final/           save_pretrained folders, each swapped in whole
    metrics.jsonl  final_metrics.json

A resume compares the checkpoint's definition with the new command line and refuses any difference, naming
each; only the number of processes may change, and only when asked for with ``--allow_world_size_change``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import socket
import uuid
from pathlib import Path

import torch

from ..locking import LockHeld, exclusive_lock
from .errors import TrainingError

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"
#: What a run writes into --save_dir; --overwrite_save_dir removes exactly these and nothing else.
RUN_OUTPUTS = ("checkpoint-*", "best", "best.*", "final", "final.*", "metrics.jsonl", "metrics.jsonl.tmp",
               "final_metrics.json", "training_curves.png", RUN_FILE, "protmask")
#: Config entries that describe the file, not the model.
NOT_MODEL = {"transformers_version", "architectures", "dtype", "torch_dtype", "auto_map", "model_type"}


# ------------------------------------------------------------------------------------------ the run's identity

def run_definition(args, world_size: int, dataset_fingerprint: str, model_config) -> dict:
    """Everything a resumed run must share with the run that wrote the checkpoint for the result to be that run."""
    from transformers import PretrainedConfig

    generic = set(PretrainedConfig().to_dict())  # fields every transformers config has; the model's own differ
    model = {k: v for k, v in model_config.to_dict().items()
             if k not in generic and k not in NOT_MODEL and not k.startswith("_")}
    return {
        "world_size": world_size,
        "batch_size": None if args.max_tokens_per_batch else args.batch_size,
        "max_tokens_per_batch": args.max_tokens_per_batch,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "max_length": args.max_length,
        "objective": args.objective,
        "seed": args.seed,
        "dataset": dataset_fingerprint,
        "model": model,
        # Only when asked for explicitly: definitions written before the flag existed stay equal.
        **({"sampling": args.sampling} if getattr(args, "sampling", "auto") != "auto" else {}),
        **({"shuffle_chains": True} if getattr(args, "shuffle_chains", False) else {}),
    }


def definition_differences(saved: dict, current: dict, allow_world_size_change: bool = False) -> list[str]:
    """One line per difference, naming the flag and both values."""
    lines = []
    for key in sorted(set(saved) | set(current)):
        before, now = saved.get(key), current.get(key)
        if before == now or (key == "world_size" and allow_world_size_change):
            continue
        if key == "model":
            for field in sorted(set(before or {}) | set(now or {})):
                if (before or {}).get(field) != (now or {}).get(field):
                    lines.append(f"model {field} (--{field}): {(before or {}).get(field)!r} in the checkpoint, "
                                 f"{(now or {}).get(field)!r} now")
        elif key == "world_size":
            lines.append(f"number of processes: {before} in the checkpoint, {now} now (add "
                         "--allow_world_size_change to continue on the new number; the run is then no longer "
                         "bit-identical to one that kept its processes)")
        elif key == "dataset":
            lines.append(f"dataset (--pdb_path and the build options): fingerprint {before} in the checkpoint, {now} "
                         "now; files were added, removed or changed, or a build flag differs")
        else:
            lines.append(f"--{key}: {before!r} in the checkpoint, {now!r} now")
    return lines


def read_run(save_dir: Path) -> dict | None:
    path = Path(save_dir) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def new_run(definition: dict) -> dict:
    return {"run_id": uuid.uuid4().hex, "definition": definition, "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds")}


# ------------------------------------------------------------------------------------------- the save folder

_HELD_LOCKS: list = []


class SaveDirLock:
    """An exclusive lock on --save_dir for the lifetime of the run's main process (the OS drops it when the
    process dies, so a killed run never leaves a stale lock)."""

    def __init__(self, save_dir: Path):
        self.path = Path(save_dir) / LOCK_FILE
        self.handle = None

    def acquire(self) -> "SaveDirLock":
        try:
            self.handle = exclusive_lock(self.path)
        except LockHeld as busy:
            raise TrainingError(f"--save_dir {self.path.parent} is in use by another run ({busy.holder}); wait for "
                                "it to finish, or give this run another --save_dir") from None
        return self


def has_run_outputs(save_dir: Path) -> bool:
    return any(any(save_dir.glob(pattern)) for pattern in RUN_OUTPUTS)


def clear_run_outputs(save_dir: Path) -> None:
    for pattern in RUN_OUTPUTS:
        for path in save_dir.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


@contextlib.contextmanager
def writing(folder: Path, flag: str = "--save_dir", cleanup: Path | None = None):
    """Turn a failed write (disk full, read-only, no permission) into one message naming the folder and flag,
    removing ``cleanup`` (a half-written staging folder) first."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:
        if isinstance(error, RuntimeError) and not any(word in str(error) for word in ("writ", "file", "storage")):
            raise
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0][:200]
        raise TrainingError(f"cannot write to {folder} ({reason}); {flag} must be a writable folder with free "
                            f"space: free some space or give another {flag}. Nothing half-written was left "
                            "behind.") from None


def claim_save_dir(args, definition: dict, say=print) -> tuple[Path | None, dict]:
    """On the main process, before any work: lock --save_dir, refuse a folder holding another run, pick the
    checkpoint to resume from and check it belongs to this run. Returns (checkpoint or None, run record)."""
    save_dir = Path(args.save_dir)
    with writing(save_dir):
        save_dir.mkdir(parents=True, exist_ok=True)
        _HELD_LOCKS.append(SaveDirLock(save_dir).acquire())  # held until the process exits
    existing = read_run(save_dir)
    if args.overwrite_save_dir:
        with writing(save_dir):
            clear_run_outputs(save_dir)
        say(f"--overwrite_save_dir: removed the previous run's checkpoints and models from {save_dir}")
        existing = None
    recover_swapped_folders(save_dir, say)

    if not args.resume_from_checkpoint:
        if existing is not None or has_run_outputs(save_dir):
            step = checkpoint_step(list_checkpoints(save_dir)[-1]) if list_checkpoints(save_dir) else 0
            raise TrainingError(
                f"--save_dir {save_dir} already holds a run (started {(existing or {}).get('started', 'earlier')}, "
                f"checkpoints up to step {step}). Continue it with --resume_from_checkpoint latest, start over "
                "with --overwrite_save_dir, or give another --save_dir")
        return None, new_run(definition)

    checkpoint = resolve_resume(args, existing, say)
    saved = (json.loads((checkpoint / TRAINER_STATE).read_text()).get("definition") if checkpoint
             else (existing or {}).get("definition"))
    if saved is None and checkpoint is not None:
        say(f"{checkpoint} records no run definition (an older protmask): the flags cannot be checked against it")
    elif saved is not None:
        differences = definition_differences(saved, definition, args.allow_world_size_change)
        if differences:
            where = checkpoint or save_dir / RUN_FILE
            raise TrainingError(
                f"--resume_from_checkpoint: {where} belongs to a run defined differently:\n  - "
                + "\n  - ".join(differences)
                + "\nResume with the checkpoint's values, start over in this folder with --overwrite_save_dir, "
                  "or start a new run with another --save_dir")
    run = existing or new_run(definition)
    if checkpoint is not None and checkpoint.parent.resolve() != save_dir.resolve():
        run = new_run(definition)  # continuing another folder's checkpoint starts a run of its own here
    return checkpoint, dict(run, definition=definition)


# ------------------------------------------------------------------------------------------- checkpoints

def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_PATTERN.match(Path(path).name).group(1))


def list_checkpoints(save_dir) -> list[Path]:
    """Complete checkpoints, oldest first. A folder without trainer_state.json (a save that was killed) is
    never listed: the state file is written last and the folder is renamed into place after it."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = []
    for path in save_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def checkpoint_damage(path: Path) -> str | None:
    """What makes a checkpoint unusable (a file truncated, unreadable or missing), or None when it loads."""
    from safetensors import safe_open

    try:
        json.loads((path / TRAINER_STATE).read_text())
        weights = sorted(path.glob("*.safetensors")) or [path / "model.safetensors"]
        for file in weights:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    handle.get_tensor(key)
        for file in sorted(path.glob("*.bin")):
            torch.load(str(file), map_location="cpu", weights_only=True)
        for file in sorted(path.glob("random_states_*.pkl")):
            # Our own file, written by accelerate.save_state: numpy and Python RNG states need full unpickling.
            torch.load(str(file), map_location="cpu", weights_only=False)
    except Exception as error:  # any failure means the same for a resume: this checkpoint cannot restore the run
        return f"{type(error).__name__}: {error}".splitlines()[0][:300]
    return None


def resolve_resume(args, run: dict | None, say=print) -> Path | None:
    """The checkpoint to resume from. ``latest`` takes the newest one of this folder's run that loads, saying
    which it skipped and why; a named checkpoint that does not load is an error (never exact)."""
    if args.resume_from_checkpoint == "latest":
        for checkpoint in reversed(list_checkpoints(args.save_dir)):
            owner = json.loads((checkpoint / TRAINER_STATE).read_text()).get("run_id")
            if run is not None and owner is not None and owner != run["run_id"]:
                say(f"--resume_from_checkpoint latest: skipping {checkpoint.name}, it belongs to another run")
                continue
            damage = checkpoint_damage(checkpoint)
            if damage is None:
                return checkpoint
            say(f"--resume_from_checkpoint latest: skipping {checkpoint.name}, it does not load ({damage})")
        return None
    path = Path(args.resume_from_checkpoint)
    damage = checkpoint_damage(path)
    if damage is not None:
        raise TrainingError(f"--resume_from_checkpoint {path} does not load ({damage}); resume from an earlier "
                            f"checkpoint-N in {path.parent}, or 'latest' to take the newest one that loads")
    return path


def all_ranks_succeeded(accelerator, succeeded: bool) -> bool:
    """One collective: did every rank get through? (A rank that fails alone must not leave the others waiting.)"""
    failures = accelerator.reduce(torch.tensor(0.0 if succeeded else 1.0, device=accelerator.device), "sum")
    return float(failures) == 0.0


def save_checkpoint(accelerator, args, state: dict) -> Path:
    """All ranks write into a staging folder; the main process adds trainer_state.json and renames it."""
    save_dir = Path(args.save_dir)
    final = save_dir / f"checkpoint-{state['global_step']:08d}"
    staging = save_dir / f"{final.name}.tmp"
    if accelerator.is_main_process:
        for stale in save_dir.glob("checkpoint-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    error = None
    try:
        with writing(save_dir, cleanup=staging):
            accelerator.save_state(str(staging))
    except TrainingError as failure:
        error = failure
    if not all_ranks_succeeded(accelerator, error is None):
        shutil.rmtree(staging, ignore_errors=True)
        raise error or TrainingError(f"another process could not write its part of {final} to --save_dir {save_dir}")
    if accelerator.is_main_process:
        with writing(save_dir, cleanup=staging):
            write_json_atomically(staging / TRAINER_STATE, state)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        # Not ProjectConfiguration(total_limit): its automatic naming saves straight into checkpoint_N, while
        # ours stages and renames (a killed save never looks complete), so the limit is applied here.
        if args.save_total_limit:
            for old in list_checkpoints(save_dir)[: -args.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def write_json_atomically(path: Path, data) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


# ------------------------------------------------------------------------------------------- saved models

def replace_folder(staging: Path, folder: Path) -> None:
    """Put ``staging`` in place of ``folder`` so that a complete copy exists under ``folder`` or ``folder.old``
    at every instant (a plain rmtree + rename leaves neither when killed in between)."""
    previous = folder.with_name(folder.name + ".old")
    shutil.rmtree(previous, ignore_errors=True)
    if folder.exists():
        os.replace(folder, previous)
    os.replace(staging, folder)
    shutil.rmtree(previous, ignore_errors=True)


def recover_swapped_folders(save_dir: Path, say=print) -> None:
    """A run killed inside `replace_folder` left ``best.old`` without ``best``: put it back."""
    for name in ("best", "final"):
        folder, previous = save_dir / name, save_dir / f"{name}.old"
        if previous.is_dir() and not folder.exists():
            os.replace(previous, folder)
            say(f"restored {folder} from {previous.name} (a run was stopped while replacing it)")


def save_model(accelerator, model, tokenizer, folder: Path, card: str, extra_files=()) -> None:
    """A `save_pretrained` folder (hub format) with tokenizer and model card, swapped into place whole. Every
    rank calls it; only the main process writes, and a failed write stops every rank with its message."""
    error = None
    if accelerator.is_main_process:
        staging = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            with writing(folder.parent, cleanup=staging):
                unwrapped = accelerator.unwrap_model(model)
                unwrapped.save_pretrained(staging)
                tokenizer.save_pretrained(staging)
                (staging / "README.md").write_text(card)
                for extra in extra_files:
                    shutil.copy(extra, staging / Path(extra).name)
                replace_folder(staging, folder)
        except TrainingError as failure:
            error = failure
    if not all_ranks_succeeded(accelerator, error is None):
        raise error or TrainingError(f"the main process could not write {folder}; see its message")
