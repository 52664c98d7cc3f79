"""Files that appear whole or not at all: exports, plots, graph drawings.

A writer that opens its final name and is killed (or meets a full disk) half-way leaves a
broken file there that looks like a result; torch's C++ zip writers even abort the process
(SIGABRT, rc 134) when a write fails. So the bytes are made in memory first, where nothing can
fail for lack of disk, then written here to a temporary name in the same directory, flushed and
renamed onto the final one: a kill at any moment leaves the old file or the new one, and a
failed write is one line, with nothing under the final name and no temporary file.
"""

from __future__ import annotations

import io
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from dynarch.errors import DynarchError


class WriteError(DynarchError):
    """A file that could not be written (full disk, file size limit, read-only); the message
    names the file and the cause."""


def write_rendered(path: Path, render: Callable[[BinaryIO], object]) -> Path:
    """``render`` writes the file's bytes into a buffer, then :func:`write_bytes` puts them on
    disk: the renderer (torch, matplotlib) never sees a failing disk."""
    buffer = io.BytesIO()
    render(buffer)
    return write_bytes(path, buffer.getvalue())


def write_bytes(path: Path, data: bytes) -> Path:
    """``data`` under ``path`` once it is complete on disk (temporary name, fsync, rename)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return replace_from_temporary(path, write)


def replace_from_temporary(path: Path, write: Callable[[Path], object]) -> Path:
    """For writers that need a file name (ONNX): ``write`` fills a temporary file beside
    ``path``, which is renamed onto it only if ``write`` returns."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        with _file_size_limit_raises():
            write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise
    return path


@contextmanager
def _file_size_limit_raises() -> Iterator[None]:
    """Past ``ulimit -f`` the kernel sends SIGXFSZ, which kills the process without a word;
    ignored, the write fails with EFBIG ("File too large") instead, which is one line here.
    Only the main thread may change a signal's handling; elsewhere it is left as it is."""
    xfsz = getattr(signal, "SIGXFSZ", None)
    if xfsz is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(xfsz, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(xfsz, signal.SIG_DFL if previous is None else previous)
