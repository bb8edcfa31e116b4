"""Preemption: SIGTERM (what SLURM and Kubernetes send) or SIGINT asks every rank to finish its optimizer
step, write a checkpoint at that step and leave with `PREEMPTED_EXIT_CODE`.

Launchers and schedulers deliver one request several times: SLURM signals every process of the job step,
and `accelerate launch` / `torchrun` forward what they receive to each rank's process group. A repeat of
the same signal within `REPEAT_WINDOW_S` seconds of the first is therefore the same request; a different
signal, or the same one later, leaves at once. Only the rank processes decide: loader and parse workers
ignore both signals (`ignore_stop_signals`), so a signal to a whole process group cannot kill them first.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from ..runtime import STOP_SIGNALS as SIGNALS

#: "Preempted, resumable": rerun with --resume_from_checkpoint latest (EX_TEMPFAIL of sysexits.h).
PREEMPTED_EXIT_CODE = 75
#: Repeats of the first signal within this many seconds are one request (override: PROTMASK_SIGNAL_REPEAT_WINDOW).
REPEAT_WINDOW_S = 5.0


class Preempted(Exception):
    """Raised on a single process after the preemption checkpoint is written."""


def repeat_window() -> float:
    return float(os.environ.get("PROTMASK_SIGNAL_REPEAT_WINDOW", REPEAT_WINDOW_S))


class PreemptionWatch:
    """Turns the first SIGTERM / SIGINT into a request the training loop honours at the end of a step.

    The request travels in the step's one all-reduce, so every rank stops after the same step even when only
    one of them was signalled.
    """

    def __init__(self, window: float | None = None):
        self.window = repeat_window() if window is None else window
        self.first: tuple[int, float] | None = None  # (signal, monotonic time) of the request
        self._previous = {}
        self._owner = os.getpid()

    @property
    def requested(self) -> bool:
        return self.first is not None

    def install(self) -> "PreemptionWatch":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._owner = os.getpid()
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number, frame) -> None:
        if os.getpid() != self._owner:
            # A forked worker (parse pool, loader) signalled before its initializer ignores stop signals: it
            # inherited this handler, but the request is the rank's, which receives the signal itself.
            return
        name = signal.Signals(number).name
        if self.first is not None:
            first, at = self.first
            if number == first and time.monotonic() - at <= self.window:
                return  # the same request again (the scheduler and the launcher both sent it)
            print(f"received {name} again: stopping now, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + number)  # asked again: stop now, as the default handler would
        self.first = (number, time.monotonic())
        print(f"received {name}: finishing this optimizer step, then writing a checkpoint and exiting with status "
              f"{PREEMPTED_EXIT_CODE} (the same signal again within {self.window:g} s is the same request; a "
              "later or a different one stops at once)", file=sys.stderr, flush=True)


def exit_process(status: int) -> None:
    """Leave a multi-process run without unwinding DDP and gloo objects (see the end of `train`)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
