"""Running train_accelerate.py and the protmask command in tests as a user would, and reading what a run left
behind."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "train_accelerate.py")
BIN = Path(sys.executable).parent
TINY = ["--hidden_dim", "32", "--num_encoder_layers", "1", "--num_decoder_layers", "1", "--num_neighbors", "16",
        "--max_length", "128", "--num_workers", "0", "--logging_steps", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, launcher=None, env=None, timeout=240, check=True):
    """Run the script as a user would: plain python, accelerate launch or torchrun."""
    prefix = {
        None: [sys.executable, SCRIPT],
        "accelerate": [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu.yaml"),
                       "--main_process_port", str(free_port()), SCRIPT],
        "torchrun": [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), SCRIPT],
    }[launcher]
    environment = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    done = subprocess.run(prefix + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env=environment, cwd=ROOT)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def records(save_dir, split):
    lines = (Path(save_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def weights(save_dir, folder="final"):
    return load_file(str(Path(save_dir) / folder / "model.safetensors"))


def max_difference(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


RESUME = TINY + ["--max_tokens_per_batch", "1024", "--checkpointing_steps", "2"]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == parent:
                    found.append(int(entry.name))
                    frontier.append(int(entry.name))
    return found


def wait_for_training(save_dir, process, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        path = Path(save_dir) / "metrics.jsonl"
        if path.is_file() and '"split": "train"' in path.read_text():
            return
        time.sleep(0.02)
    raise AssertionError("training did not start")


def start(args, launcher=None, env=None):
    """Start a run in a session of its own, as a launcher or scheduler job is: its process group can be
    signalled without reaching the test."""
    prefix = {
        None: [sys.executable, SCRIPT],
        "accelerate": [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu.yaml"),
                       "--main_process_port", str(free_port()), SCRIPT],
    }[launcher]
    return subprocess.Popen(prefix + [str(a) for a in args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
                            start_new_session=True)


def command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def rank_processes(pid: int) -> list[int]:
    """The training processes of a job: ``pid`` itself when it is one, or the ranks a launcher started (not
    their loader workers, which are forks of a rank with the same command line)."""
    job = [pid] + descendants(pid)
    def is_rank(p):
        words = [Path(w).name for w in command_line(p)]
        return "train_accelerate.py" in words and not {"accelerate", "torchrun"} & set(words)

    ranks = [p for p in job if is_rank(p)]
    return [p for p in ranks if parent(p) not in ranks]


def parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def wait_gone(pids, timeout=120) -> None:
    deadline = time.time() + timeout
    while any(Path(f"/proc/{p}").exists() and "Z" not in state(p) for p in pids):
        assert time.time() < deadline, f"processes {pids} still running"
        time.sleep(0.05)


def state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def slurm_step(args, tasks=2):
    """What `srun --ntasks=2 python train_accelerate.py ...` starts: one task per rank, no launcher, the
    rendezvous in SLURM's variables (the address and port a job script may set)."""
    port = str(free_port())
    processes = []
    for task in range(tasks):
        env = dict(os.environ, PYTHONUNBUFFERED="1", SLURM_JOB_ID="4242", SLURM_STEP_ID="0",
                   SLURM_STEP_NUM_TASKS=str(tasks), SLURM_PROCID=str(task), SLURM_LOCALID=str(task),
                   SLURM_NODEID="0", SLURM_STEP_TASKS_PER_NODE=str(tasks), SLURM_STEP_NODELIST="localhost",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, SLURM_CPUS_PER_TASK="1")
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            env.pop(name, None)
        processes.append(subprocess.Popen([sys.executable, SCRIPT] + [str(a) for a in args], cwd=ROOT, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          start_new_session=True))
    return processes


def protmask_cli(*args, timeout=900):
    """The protmask command as a user runs it (``python -m protmask.cli``)."""
    return subprocess.run([sys.executable, "-m", "protmask.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def resumed_equals_uninterrupted(common, tmp_path, launcher="accelerate", steps=4, stop=2):
    """``common`` run for ``steps`` in one go (``tmp_path / "whole"``), and stopped after ``stop`` then resumed
    (``tmp_path / "parts"``) on 2 ranks: asserts both end with the same weights; returns the first run."""
    whole = launch(common + ["--max_train_steps", str(steps), "--save_dir", tmp_path / "whole"], launcher=launcher)
    assert "world size: 2 process(es)" in whole.stdout
    launch(common + ["--max_train_steps", str(stop), "--save_dir", tmp_path / "parts"], launcher=launcher)
    resumed = launch(common + ["--max_train_steps", str(steps), "--save_dir", tmp_path / "parts",
                               "--resume_from_checkpoint", "latest"], launcher=launcher)
    assert "resumed from" in resumed.stdout
    assert max_difference(weights(tmp_path / "parts"), weights(tmp_path / "whole")) == 0.0
    return whole
