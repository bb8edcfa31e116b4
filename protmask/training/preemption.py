"""Preemption: SIGTERM (what SLURM and Kubernetes send) or SIGINT asks every rank to finish its optimizer
step, write a checkpoint at that step and leave with `PREEMPTED_EXIT_CODE`; a second signal leaves at once."""

from __future__ import annotations

import os
import signal
import sys
import threading

#: "Preempted, resumable": rerun with --resume_from_checkpoint latest (EX_TEMPFAIL of sysexits.h).
PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Raised on a single process after the preemption checkpoint is written."""


class PreemptionWatch:
    """Turns the first SIGTERM / SIGINT into a request the training loop honours at the end of a step.

    The request travels in the step's one all-reduce, so every rank stops after the same step even when only
    one of them was signalled.
    """

    def __init__(self):
        self.requested = False
        self._previous = {}

    def install(self) -> "PreemptionWatch":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number, frame) -> None:
        if self.requested:
            os._exit(128 + number)  # asked twice: stop now, as the default handler would
        self.requested = True
        print(f"received {signal.Signals(number).name}: finishing this optimizer step, then writing a checkpoint "
              f"and exiting with status {PREEMPTED_EXIT_CODE} (send it again to stop at once)",
              file=sys.stderr, flush=True)


def exit_process(status: int) -> None:
    """Leave a multi-process run without unwinding DDP and gloo objects (see the end of `train`)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
