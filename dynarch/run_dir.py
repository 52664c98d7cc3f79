"""A run directory: owned by one process at a time, and holding one run.

Two processes writing one run dir tear its checkpoint and duplicate its history, so the
process that writes a run holds an OS lock on the directory itself for the run's whole life
(``flock`` on the directory's file descriptor: no lock file to leave behind or to go stale;
the OS drops the lock when the process dies, however it dies). A second process is refused in
one line naming the holder. Where ``fcntl`` does not exist (Windows) there is no lock.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dynarch.atomic import write_bytes
from dynarch.errors import DynarchError, first_line, some_of

# What a run dir holds once its run has started: its history and its checkpoint.
HISTORY, CHECKPOINT = "history.db", "checkpoint.pt"
CONFIG = "config.yaml"  # the resolved config, for people and for a run started over
SHOWN_KEYS = 6  # differing keys named in config.yaml's one line; the rest are counted


class RunDirBusy(DynarchError):
    """Another process is writing this run directory."""


def holds_run(path: Path) -> bool:
    """Whether ``path`` holds a run already (a new run there would mix two runs' files)."""
    return (path / HISTORY).exists() or (path / CHECKPOINT).exists()


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest parent that exists (a run dir is created below it)."""
    return next(p for p in (path, *path.parents) if p.exists())


def not_a_dir_path(given: str, key: str) -> str | None:
    """Why ``given`` (the value of ``key``, e.g. ``hydra.run.dir``) cannot name a run dir, or
    None: empty (``Path("")`` is the current directory, which would fill with the run's files),
    a file, or a path below a file (Hydra's mkdir would fail with a traceback)."""
    if not given.strip():
        return f"{key} is empty; give the directory the run writes to"
    existing = nearest_existing(Path(given).expanduser().absolute())
    if not existing.is_dir():
        return f"{key}={given}: {existing} is not a directory"
    return None


def cannot_create(path: Path) -> str | None:
    """Why the missing dir ``path`` cannot be created (under /proc, say), or None. Tried with
    a temporary dir in its nearest existing parent, removed at once: a refused command leaves
    nothing behind."""
    existing = nearest_existing(path)
    if existing == path:
        return None
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dynarch-", dir=existing))
    except OSError as exc:
        return f"{path} cannot be created ({exc.strerror or exc})"
    return None


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


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    """``config.yaml``: the config the run in ``run_dir`` runs with (whole or not at all)."""
    write_bytes(run_dir / CONFIG, OmegaConf.to_yaml(config).encode("utf-8"))


def config_disagreement(run_dir: Path, config: dict[str, Any]) -> str | None:
    """None if ``run_dir``'s config.yaml says ``config``; else what is wrong with it, for the
    one line a resume prints: the keys an edit changed, or why the file cannot be read. A
    resume runs with its history's config, so an edited file would otherwise silently
    disagree with what ran."""
    path = run_dir / CONFIG
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except FileNotFoundError:
        return f"{path} is missing"
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as exc:
        return f"{path} is not a readable config ({first_line(exc)})"
    if not isinstance(loaded, dict):
        return f"{path} is not a readable config (a {type(loaded).__name__}, not a mapping)"
    keys = _differing_keys(loaded, config, "")
    if not keys:
        return None
    shown = some_of(keys, SHOWN_KEYS)
    return f"{path} differs from the config this run started with in {shown}"


def _differing_keys(given: dict[str, Any], wanted: dict[str, Any], prefix: str) -> list[str]:
    """Dotted keys whose values differ between the two configs (missing on one side too)."""
    keys: list[str] = []
    for key in [*wanted, *(k for k in given if k not in wanted)]:
        a, b = given.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differing_keys(a, b, f"{prefix}{key}.")
        elif key not in given or key not in wanted or a != b:
            keys.append(f"{prefix}{key}")
    return keys
