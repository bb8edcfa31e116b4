"""File locks for save folders, dataset builds and datasets in use: fcntl.flock, released by the OS when the
process dies (a killed run never leaves a stale lock). An exclusive holder writes itself into the file so
that a process that finds it taken can say who holds it; shared (reader) locks are many at once.

Across machines flock holds on NFSv4 (Linux maps it to NFS byte-range locks), on Lustre mounted with
``-o flock``, and on GPFS and BeeGFS; it is local to each machine on NFSv3 without lockd, Lustre with
``-o localflock`` and most FUSE file systems. On those, give each machine a local --cache_dir."""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
from pathlib import Path


class LockHeld(Exception):
    """The lock is held by another process; ``holder`` says which (pid, host, since when)."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def exclusive_lock(path, wait: bool = False, on_busy=None):
    """An open handle holding an exclusive lock on ``path`` (close it to release). When another process holds
    it: raise LockHeld, or with ``wait`` call ``on_busy(holder)`` and block until it is free."""
    handle = open(Path(path), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        if not wait:
            handle.close()
            raise LockHeld(holder) from None
        if on_busy is not None:
            on_busy(holder)
        fcntl.flock(handle, fcntl.LOCK_EX)
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                 f"{datetime.datetime.now().isoformat(timespec='seconds')}\n")
    handle.flush()
    return handle


def shared_lock(path):
    """An open handle holding a shared lock on ``path``, or None when the folder cannot hold one (read-only):
    many readers at once, and an exclusive `exclusive_lock` waits or fails while any is held."""
    try:
        handle = open(Path(path), "a+")
    except OSError:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_SH)  # waits only while something holds it exclusively (a prune deleting)
    except OSError:
        handle.close()
        return None
    return handle
