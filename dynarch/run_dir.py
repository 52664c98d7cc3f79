"""A run directory: owned by one process at a time, and holding one run.

Two processes writing one run dir tear its checkpoint and duplicate its history, so the
process that writes a run holds an OS lock on the directory itself for the run's whole life
(``flock`` on the directory's file descriptor: no lock file to leave behind or to go stale;
the OS drops the lock when the process dies, however it dies). A second process is refused in
one line naming the holder. Where ``fcntl`` does not exist (Windows) there is no lock.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dynarch.errors import DynarchError

# What a run dir holds once its run has started: its history and its checkpoint.
HISTORY, CHECKPOINT = "history.db", "checkpoint.pt"


class RunDirBusy(DynarchError):
    """Another process is writing this run directory."""


def holds_run(path: Path) -> bool:
    """Whether ``path`` holds a run already (a new run there would mix two runs' files)."""
    return (path / HISTORY).exists() or (path / CHECKPOINT).exists()


@contextmanager
def owned(path: Path) -> Iterator[None]:
    """Hold ``path`` for this process until the block ends; one line if another process
    holds it. Taking the lock writes nothing, so a refused command changes no file."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirBusy(
                f"{path} is in use by {_holder(path)}; one process writes a run dir at a time "
                "(wait for it to end, or stop it first)"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(path: Path) -> str:
    """The process holding ``path``'s lock, from /proc/locks (Linux), else 'another process'.
    Its lines read ``1: FLOCK  ADVISORY  WRITE <pid> <major>:<minor>:<inode> 0 EOF``."""
    st = os.stat(path)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "another process"
    for line in lines:
        fields = line.split()
        if "FLOCK" in fields and "->" not in fields and key in fields:
            return f"process {fields[fields.index(key) - 1]}"
    return "another process"
