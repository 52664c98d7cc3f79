"""The bad-input table (issue 7): every malformed input a user can hand ``dynarch run`` or
``dynarch query`` is one ``dynarch: error:`` line naming the bad value or file, a non-zero exit,
no traceback, and leaves the data already on disk exactly as it was.

Each row starts from "prior data": a copy of one real completed run (made once per module)
plus the user's own input files. After the bad command every one of those files must be
byte-identical (SQLite's ``-wal``/``-shm`` side files excepted: a read-only reader may leave
them) and the run's history must read the same. Every command fails before training, so the
table costs one short run plus one process start per row (two rows at a time).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import shutil
import sqlite3
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_cli import OWN_MODEL, dynarch, run_dir_of

from dynarch.history import HistoryError, HistoryReader

# One epoch of digits (23 steps) with a grow and a prune, so the prior run has events and
# several architecture versions for a failed command to damage.
PRIOR_RUN = [
    "trainer.epochs=1",
    "policy.mutations=[{step:10,op:grow,target:features.conv2,k:4,init:gradmax},"
    "{step:15,op:prune,target:features.conv3,k:4,importance:magnitude}]",
]
RUN_EXIT, QUERY_EXIT = 1, 2  # query keeps argparse's exit code for usage errors (documented)
SIDE_FILES = ("-wal", "-shm")
PREFIX = "dynarch: error: "
WORKERS = 2  # bad commands running at once (the machine has 2 cores)


@pytest.fixture(scope="module")
def prior_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A completed real run, copied into every row's directory as the data to protect."""
    result = dynarch(tmp_path_factory.mktemp("prior"), "run", *PRIOR_RUN)
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_of(result)
    history = history_content(run_dir)
    assert history is not None and history["run"]["status"] == "completed"
    assert [e["kind"] for e in history["events"]] == ["grow", "prune"]
    return run_dir


# --- the user's inputs, written into the row's directory ---------------------------------


def npz_arrays(n_train: int = 40, n_test: int = 10) -> dict[str, np.ndarray]:
    """Valid 8x8 grey images with 3 classes, as the npz loader wants them."""
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 256, (n_train, 8, 8, 1), dtype=np.uint8),
        "y_train": rng.integers(0, 3, n_train),
        "x_test": rng.integers(0, 256, (n_test, 8, 8, 1), dtype=np.uint8),
        "y_test": rng.integers(0, 3, n_test),
    }


def npz_run(path: Path) -> list[str]:
    return ["run", "data=npz", f"data.path={path.name}"]


def npz_with(name: str, **changes: Any) -> Callable[[Path, Path], list[str]]:
    """A row whose npz is valid except for ``changes`` (an array replaced, or None: removed)."""

    def setup(tmp: Path, prior: Path) -> list[str]:
        arrays = {**npz_arrays(), **changes}
        np.savez(tmp / name, **{k: v for k, v in arrays.items() if v is not None})
        return npz_run(tmp / name)

    return setup


def random_npz(tmp: Path, prior: Path) -> list[str]:
    (tmp / "noise.npz").write_bytes(np.random.default_rng(1).bytes(4096))
    return npz_run(tmp / "noise.npz")


def truncated_npz(tmp: Path, prior: Path) -> list[str]:
    np.savez(tmp / "whole.npz", **npz_arrays())
    data = (tmp / "whole.npz").read_bytes()
    (tmp / "cut.npz").write_bytes(data[: len(data) // 2])
    return npz_run(tmp / "cut.npz")


def damaged_member_npz(tmp: Path, prior: Path) -> list[str]:
    """A zip whose directory is intact but whose compressed bytes are not (zlib fails)."""
    np.savez_compressed(tmp / "damaged.npz", **npz_arrays(n_train=400))
    data = bytearray((tmp / "damaged.npz").read_bytes())
    data[200:1200] = bytes(b ^ 0xFF for b in data[200:1200])
    (tmp / "damaged.npz").write_bytes(bytes(data))
    return npz_run(tmp / "damaged.npz")


def bare_npy(tmp: Path, prior: Path) -> list[str]:
    with open(tmp / "images.npz", "wb") as f:
        np.save(f, npz_arrays()["x_train"])
    return npz_run(tmp / "images.npz")


# --- the prior run, edited before the bad command (the edit is the input; it must stay) ---


def prior_with_schema(version: str) -> Callable[[Path, Path], Path]:
    def edit(tmp: Path, prior: Path) -> Path:
        conn = sqlite3.connect(prior / "history.db")
        with conn:
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))
        conn.close()
        return prior

    return edit


def prior_with_file(name: str, content: Callable[[bytes], bytes | None]) -> Callable:
    """Replace the prior run's ``name`` by ``content(old bytes)``, or delete it (None)."""

    def edit(tmp: Path, prior: Path) -> Path:
        new = content((prior / name).read_bytes())
        if new is None:
            (prior / name).unlink()
        else:
            (prior / name).write_bytes(new)
        return prior

    return edit


def noise(old: bytes) -> bytes:
    return np.random.default_rng(2).bytes(len(old))


def half(old: bytes) -> bytes:
    return old[: len(old) // 2]


def zeroed_4k(old: bytes) -> bytes:
    """4 KB of zeros inside the largest tensor's bytes: torch.load reads it as other weights."""
    with zipfile.ZipFile(io.BytesIO(old)) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    header = record.header_offset  # local header: 30 bytes, the name, the extra field
    start = header + 30 + int.from_bytes(old[header + 26 : header + 28], "little")
    start += int.from_bytes(old[header + 28 : header + 30], "little")
    assert record.file_size > 4096
    return old[:start] + bytes(4096) + old[start + 4096 :]


class Payload:
    """Unpickling this runs a shell command: what a crafted checkpoint could carry."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (self.command,)


def checkpoint_with_payload(tmp: Path, prior: Path) -> Path:
    """The prior checkpoint plus an object whose unpickling would create ``tmp/pwned`` (a new
    file, which the table's check of the row's files would catch)."""
    path = prior / "checkpoint.pt"
    payload = torch.load(path, weights_only=True)
    payload["policy"] = Payload(f"touch {tmp / 'pwned'}")
    torch.save(payload, path)
    return prior


def checkpoint_edited(change: Callable[[dict[str, Any]], None]) -> Callable[[bytes], bytes]:
    """The prior checkpoint with ``change`` applied to its payload: torch-readable, wrong."""

    def content(old: bytes) -> bytes:
        payload = torch.load(io.BytesIO(old), weights_only=True)
        change(payload)
        out = io.BytesIO()
        torch.save(payload, out)
        return out.getvalue()

    return content


def shrink_momentum(payload: dict[str, Any]) -> None:
    """The weights fit; the first parameter's momentum has one row too few."""
    state = payload["optimizer"]["state"][0]
    state["momentum_buffer"] = state["momentum_buffer"][:-1]


def drop_parameter(payload: dict[str, Any]) -> None:
    """The weights fit; the optimizer state is of a model with one parameter fewer."""
    payload["optimizer"]["param_groups"][0]["params"].pop()


def resume(edit: Callable[[Path, Path], Path]) -> Callable[[Path, Path], list[str]]:
    """Resume the (complete, 1-epoch) prior run for one more epoch: a complete run alone is
    "nothing to resume" before any file is read."""
    return lambda tmp, prior: ["run", f"resume={edit(tmp, prior)}", "trainer.epochs=2"]


def query(edit: Callable[[Path, Path], Path] | None = None, *command: str) -> Callable:
    def setup(tmp: Path, prior: Path) -> list[str]:
        target = edit(tmp, prior) if edit else prior
        return ["query", str(target), *(command or ("summary",))]

    return setup


def not_a_run_dir(tmp: Path, prior: Path) -> Path:
    (tmp / "notes").mkdir()
    (tmp / "notes" / "todo.txt").write_text("not a run\n")
    return tmp / "notes"


def args(*given: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, prior: list(given)


def own_model(*given: str) -> Callable[[Path, Path], list[str]]:
    """A user's model class in the row's directory (``hidden`` is its one argument)."""

    def setup(tmp: Path, prior: Path) -> list[str]:
        (tmp / "my_models.py").write_text(OWN_MODEL)
        return ["run", "model._target_=my_models.TinyNet", *given]

    return setup


def run_dir_at(name: str, make: Callable[[Path], None] | None = None) -> Callable:
    """``hydra.run.dir=tmp/name`` (an absolute path as given), after ``make(tmp)``."""

    def setup(tmp: Path, prior: Path) -> list[str]:
        if make is not None:
            make(tmp)
        return ["run", f"hydra.run.dir={tmp / name if name else ''}"]

    return setup


@dataclass
class Row:
    setup: Callable[[Path, Path], list[str]]  # (row dir, prior run copy) -> CLI arguments
    words: list[str]  # the error line must contain each
    code: int = RUN_EXIT
    new_run: bool = False  # refused inside the Hydra job: a new run dir with a FAILED file


TABLE: dict[str, Row] = {
    # config: types, values, names, keys
    "config type trainer.epochs=abc": Row(args("run", "trainer.epochs=abc"), ["epochs", "'abc'"]),
    "config value trainer.batch_size=0": Row(
        args("run", "trainer.batch_size=0"), ["trainer.batch_size", ">= 1", "got 0"]
    ),
    "config value trainer.epochs=-1": Row(
        args("run", "trainer.epochs=-1"), ["trainer.epochs", "got -1"]
    ),
    "config value trainer.steps=0": Row(args("run", "trainer.steps=0"), ["trainer.steps", "got 0"]),
    "config value optimizer.lr=-1": Row(
        args("run", "optimizer.lr=-1"), ["optimizer.lr", ">= 0", "-1"]
    ),
    "config value optimizer.betas=[2,0.9]": Row(
        args("run", "optimizer=adamw", "optimizer.betas=[2,0.9]"), ["optimizer.betas", "2.0"]
    ),
    "config value trainer.threads=0": Row(
        args("run", "trainer.threads=0"), ["trainer.threads", "got 0"]
    ),
    "config value trainer.seed=-1": Row(args("run", "trainer.seed=-1"), ["trainer.seed", "-1"]),
    "config value in a sweep -m epochs=1,-1": Row(
        args("run", "-m", "trainer.epochs=1,-1"), ["trainer.epochs", "got -1"]
    ),
    "unknown key trainer.epoch": Row(args("run", "trainer.epoch=3"), ["'epoch'", "TrainerConfig"]),
    # +key adds a key Hydra's schema check does not see (issue 22 item 4)
    "unknown +key optimizer.momentun": Row(
        args("run", "+optimizer.momentun=0.5"),
        ["optimizer.momentun", "OptimizerConfig", "'momentum'"],
    ),
    "unknown +key trainer.epoch": Row(
        args("run", "+trainer.epoch=3"), ["trainer.epoch", "TrainerConfig", "'epochs'"]
    ),
    "unknown +key model.widht": Row(
        args("run", "+model.widht=64"), ["model.widht", "ModelConfig", "'width'"]
    ),
    "unknown +key at the top": Row(args("run", "+trainr.epochs=3"), ["trainr", "'trainer'"]),
    "unknown +model.kwargs of a built-in": Row(
        args("run", "+model.kwargs.nrom=false"), ["model.kwargs", "vgg_small", "'nrom'", "'norm'"]
    ),
    "unknown +model.kwargs of a user's class": Row(
        own_model("+model.kwargs.hiden=6"), ["model.kwargs", "TinyNet", "'hiden'", "'hidden'"]
    ),
    "unknown +policy argument": Row(
        args("run", "policy=gradmax_schedule", "+policy.max_param=100"),
        ["policy", "Grow", "'max_param'", "'max_params'"],
    ),
    "unknown argument of a nested policy part": Row(
        args("run", "policy=gradmax_schedule", "+policy.when.evry=0.5"),
        ["policy.when", "EveryFraction", "'evry'", "'every'"],
    ),
    # values that crash or never end (issue 22 item 7)
    "config value trainer.threads=100000": Row(
        args("run", "trainer.threads=100000"), ["trainer.threads", "<= 1024", "100000"]
    ),
    "config value optimizer.lr=inf": Row(
        args("run", "optimizer.lr=inf"), ["optimizer.lr", "finite", "inf"]
    ),
    "config value trainer.eval_every_epochs=inf": Row(
        args("run", "trainer.eval_every_epochs=inf"), ["trainer.eval_every_epochs", "finite"]
    ),
    "config value trainer.epochs=10**23": Row(
        args("run", f"trainer.epochs={10**23}"), ["trainer.epochs", "<= 1000000", str(10**23)]
    ),
    "config value trainer.steps=10**10": Row(
        args("run", f"trainer.steps={10**10}"), ["trainer.steps", "<= 1000000000"]
    ),
    "config value trainer.epochs=10**6 at batch 1 (over 10**9 steps of digits)": Row(
        args("run", f"trainer.epochs={10**6}", "trainer.batch_size=1"),
        ["trainer.epochs/steps give", "need 1 to 1e+09"],
        new_run=True,  # the data sets the steps per epoch: refused inside the job
    ),
    "run dir that is a file": Row(
        run_dir_at("afile", lambda tmp: (tmp / "afile").write_text("mine\n")),
        ["afile", "not a directory"],
    ),
    "run dir below a file": Row(
        run_dir_at("afile/run", lambda tmp: (tmp / "afile").write_text("mine\n")),
        ["afile", "not a directory"],
    ),
    "run dir that cannot be created": Row(
        args("run", "hydra.run.dir=/proc/dynarch_run"), ["/proc/dynarch_run", "cannot be created"]
    ),
    "empty run dir": Row(run_dir_at(""), ["hydra.run.dir", "empty"]),
    "unknown group option policy=nope": Row(
        args("run", "policy=nope"), ["'policy/nope'", "static"]
    ),
    "unknown model name": Row(
        args("run", "model.name=vgg_smal"), ["'vgg_smal'", "vgg_small"], new_run=True
    ),
    "unknown data name": Row(args("run", "data.name=mnist"), ["'mnist'", "digits"], new_run=True),
    "unknown optimizer name": Row(
        args("run", "optimizer.name=rmsprop"), ["optimizer.name", "'rmsprop'"], new_run=True
    ),
    "unknown policy _target_": Row(
        args("run", "policy._target_=dynarch.policies.Nope"),
        ["policy", "dynarch.policies.Nope"],
        new_run=True,
    ),
    # a model that cannot take the data's images (AlexNet's pooling on 8x8 digits)
    "input shape does not fit the model": Row(
        args("run", "model=torchvision", "model.name=torchvision:alexnet", "policy=static"),
        ["torchvision:alexnet", "1x8x8", "too small"],
        new_run=True,
    ),
    # npz files
    "npz missing file": Row(
        lambda tmp, prior: npz_run(tmp / "missing.npz"), ["missing.npz", "not found"], new_run=True
    ),
    "npz random bytes": Row(random_npz, ["'noise.npz'", "corrupt", "not a zip"], new_run=True),
    "npz truncated": Row(truncated_npz, ["'cut.npz'", "truncated"], new_run=True),
    "npz damaged compressed member": Row(
        damaged_member_npz, ["'damaged.npz'", "corrupt"], new_run=True
    ),
    "npz is a bare .npy": Row(bare_npy, ["'images.npz'", ".npy", "savez"], new_run=True),
    "npz missing a key": Row(
        npz_with("nokey.npz", y_test=None), ["'nokey.npz'", "'y_test'"], new_run=True
    ),
    "npz x/y lengths differ": Row(
        npz_with("short.npz", y_train=np.zeros(39, dtype=np.int64)),
        ["'short.npz'", "40 images", "39 labels"],
        new_run=True,
    ),
    "npz wrong dtype": Row(
        npz_with("float.npz", x_train=np.zeros((40, 8, 8, 1), np.float32)),
        ["'float.npz'", "float32", "uint8"],
        new_run=True,
    ),
    "npz wrong rank": Row(
        npz_with("flat.npz", x_train=np.zeros((40, 64), np.uint8)),
        ["'flat.npz'", "rank 2"],
        new_run=True,
    ),
    "npz object arrays": Row(
        npz_with("obj.npz", y_test=np.array([None] * 10, dtype=object)),
        ["'obj.npz'", "object"],
        new_run=True,
    ),
    # resume of a damaged run: refused before training, the old run untouched
    "resume history of unknown schema version": Row(
        resume(prior_with_schema("99")), ["history.db", "schema version 99", "reads version 1"]
    ),
    "resume history that is not a database": Row(
        resume(prior_with_file("history.db", noise)), ["history.db", "not a dynarch history"]
    ),
    "resume checkpoint carrying code": Row(
        resume(checkpoint_with_payload), ["checkpoint.pt", "not a readable", "plain values"]
    ),
    "resume corrupt checkpoint": Row(
        resume(prior_with_file("checkpoint.pt", noise)), ["checkpoint.pt", "not a readable"]
    ),
    "resume checkpoint with 4 KB zeroed": Row(
        resume(prior_with_file("checkpoint.pt", zeroed_4k)), ["checkpoint.pt", "damaged", "CRC"]
    ),
    "new run in a dir that holds a run": Row(
        lambda tmp, prior: ["run", f"hydra.run.dir={prior}"],
        ["prior_run holds a run already", "resume="],
    ),
    "resume truncated checkpoint": Row(
        resume(prior_with_file("checkpoint.pt", half)), ["checkpoint.pt", "not a readable"]
    ),
    # the weights of the grown model without the mutations that give it those shapes
    "resume checkpoint that does not fit the model": Row(
        resume(
            prior_with_file("checkpoint.pt", checkpoint_edited(lambda p: p.update(mutations=[])))
        ),
        ["checkpoint.pt", "does not fit this run's model", "size mismatch"],
    ),
    "resume checkpoint whose optimizer state does not fit": Row(
        resume(prior_with_file("checkpoint.pt", checkpoint_edited(shrink_momentum))),
        ["checkpoint.pt", "training state does not fit", "momentum_buffer", "shape"],
    ),
    "resume checkpoint with an optimizer of another model": Row(
        resume(prior_with_file("checkpoint.pt", checkpoint_edited(drop_parameter))),
        ["checkpoint.pt", "training state does not fit", "parameter"],
    ),
    "resume checkpoint missing a key": Row(
        resume(prior_with_file("checkpoint.pt", checkpoint_edited(lambda p: p.pop("model")))),
        ["checkpoint.pt", "not a complete checkpoint", "'model'"],
    ),
    "resume missing checkpoint": Row(
        resume(prior_with_file("checkpoint.pt", lambda old: None)),
        ["no checkpoint at", "checkpoint.pt"],
    ),
    "resume missing dir": Row(
        lambda tmp, prior: ["run", f"resume={tmp / 'gone'}"], ["no dynarch run at", "gone"]
    ),
    "resume with other overrides": Row(
        lambda tmp, prior: ["run", f"resume={prior}", "model.width=3"],
        ["takes no other overrides", "model.width=3"],
    ),
    # query
    "query a dir that is not a run": Row(
        query(not_a_run_dir), ["notes", "not a dynarch run"], QUERY_EXIT
    ),
    "query history of unknown schema version": Row(
        query(prior_with_schema("99")), ["schema version 99"], QUERY_EXIT
    ),
    "query a missing dir": Row(
        lambda tmp, prior: ["query", str(tmp / "gone"), "summary"],
        ["no such run directory", "gone"],
        QUERY_EXIT,
    ),
    "query an unknown step": Row(
        query(None, "diff", "0", "999"), ["step 999", "steps 0..23"], QUERY_EXIT
    ),
}


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` but SQLite's side files, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(SIDE_FILES)
    }


def history_content(run_dir: Path) -> dict[str, Any] | None:
    """What a reader sees in the run's history (None when it is deliberately unreadable)."""
    try:
        reader = HistoryReader(run_dir / "history.db")
    except HistoryError:
        return None
    try:
        return {
            "run": reader.run(),
            "events": reader.events(),
            "metrics": reader.metrics(),
            "versions": reader.versions(),
            "graphs": [reader.architecture(v) for v, *_ in reader.versions()],
        }
    finally:
        reader.close()


def the_error_line(result: subprocess.CompletedProcess, code: int) -> str:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), result.stderr
    return lines[0]


@dataclass
class Outcome:
    """One row after its bad command: its directory, what was there before, what happened."""

    root: Path
    prior: Path
    files: dict[str, str]
    history: dict[str, Any] | None
    result: Future[subprocess.CompletedProcess]


@pytest.fixture(scope="module")
def outcomes(
    prior_run: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Callable[[str], Outcome]]:
    """Set up every selected row (prior run copy, input files, snapshot) and start its bad
    command, WORKERS at a time: each command is a fresh process importing torch (~2-4 s), so
    one after another the table would take twice as long; the assertions stay per row. Under
    pytest-xdist a worker knows only the rows it is given, one at a time, so each row starts
    when its test asks (the other worker keeps the second core busy)."""
    pool = ThreadPoolExecutor(max_workers=WORKERS)

    def start(name: str) -> Outcome:
        root = tmp_path_factory.mktemp("row")
        prior = root / "prior_run"
        shutil.copytree(prior_run, prior)
        cli_args = TABLE[name].setup(root, prior)
        files, history = snapshot(root), history_content(prior)
        return Outcome(root, prior, files, history, pool.submit(dynarch, root, *cli_args))

    started = functools.cache(start)  # a row's outcome by name, started on the first ask
    if "PYTEST_XDIST_WORKER" not in os.environ:
        for item in request.session.items:
            if item.module is sys.modules[__name__] and hasattr(item, "callspec"):
                started(item.callspec.params["name"])
    yield started
    pool.shutdown(wait=True)


@pytest.mark.parametrize("name", list(TABLE), ids=list(TABLE))
def test_bad_input_is_one_line_and_prior_data_is_intact(
    name: str, outcomes: Callable[[str], Outcome]
) -> None:
    row, outcome = TABLE[name], outcomes(name)

    line = the_error_line(outcome.result.result(), row.code)

    missing = [w for w in row.words if w not in line]
    assert not missing, f"{missing} not in {line!r}"
    after = snapshot(outcome.root)
    new = after.keys() - outcome.files.keys()
    if row.new_run:  # a fresh run of its own, marked failed; nothing else is new
        assert all(p.startswith("runs" + os.sep) for p in new), new
        (failed,) = [p for p in new if Path(p).name == "FAILED"]
        assert (outcome.root / failed).read_text().strip() == line.removeprefix(PREFIX)
    else:  # refused before any run directory
        assert not new, new
    assert {p: h for p, h in after.items() if p not in new} == outcome.files
    assert not (outcome.prior / "FAILED").exists()
    assert history_content(outcome.prior) == outcome.history
