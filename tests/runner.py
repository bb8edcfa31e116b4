"""Running train_accelerate.py in tests as a user would, and reading what a run left behind."""

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
