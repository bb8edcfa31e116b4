"""Saying what a collective timeout means before NCCL's watchdog ends the rank.

On gloo a training collective that waits longer than --process_group_timeout raises in Python, and the
trainer prints "another process stopped answering". On NCCL (torch's default TORCH_NCCL_ASYNC_ERROR_HANDLING)
the watchdog thread aborts the process from C++ instead: no Python runs after it. So each rank of a
multi-process run keeps a heartbeat of its own progress (a training step, a validation batch, a checkpoint),
and a thread prints the same guidance when the heartbeat has been silent for most of the timeout: then the
rank is almost certainly inside a collective that another process does not join, and the line is in the log
just before the watchdog's own lines and the launcher's report.
"""

from __future__ import annotations

import socket
import sys
import threading
import time

# Share of --process_group_timeout after which a silent rank speaks: late enough that no healthy step or
# save is taken for a stall, early enough to come before the watchdog (which counts from the collective's
# start, a little after the last heartbeat).
SPEAK_AFTER = 0.9


class StallWatch:
    """A daemon thread; `beat(where)` marks progress (and arms the watch), `close()` ends it."""

    def __init__(self, timeout_s: float, rank: int, world_size: int):
        self.timeout_s, self.rank, self.world_size = timeout_s, rank, world_size
        self.limit_s = SPEAK_AFTER * timeout_s
        # Armed by the first beat, after the first step: that step may compile the model and NCCL sets its
        # communicators up then, both legitimately slow, and the ranks do them side by side.
        self._where, self._since, self._spoken = None, None, False
        self._lock, self._closed = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._watch, name="protmask-stall-watch", daemon=True)

    def start(self) -> "StallWatch":
        self._thread.start()
        return self

    def beat(self, where: str) -> None:
        with self._lock:
            self._where, self._since, self._spoken = where, time.monotonic(), False

    def close(self) -> None:
        self._closed.set()

    def _watch(self) -> None:
        poll = min(1.0, self.limit_s / 20)
        while not self._closed.wait(poll):
            with self._lock:
                if self._since is None or self._spoken:
                    continue
                silent = time.monotonic() - self._since
                if silent < self.limit_s:
                    continue
                self._spoken, where = True, self._where  # once per silence
            print(self.message(silent, where), file=sys.stderr, flush=True)

    def message(self, silent: float, where: str) -> str:
        return (f"\ntrain_accelerate.py: rank {self.rank} of {self.world_size} on {socket.gethostname()}: no progress "
                f"for {silent:.0f} s since {where} (--process_group_timeout {self.timeout_s:g} s): another process "
                "stopped answering; the job stops when the collective times out (on NCCL the watchdog aborts this "
                "rank next). See 'A rank hangs' in docs/troubleshooting.md.")


def watch_for_stalls(accelerator, timeout_s: float) -> StallWatch | None:
    """A started watch on a multi-process run, None on one process (no collectives to wait in)."""
    if accelerator.num_processes < 2:
        return None
    return StallWatch(timeout_s, accelerator.process_index, accelerator.num_processes).start()
