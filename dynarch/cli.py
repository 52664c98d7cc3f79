"""The ``dynarch`` command: ``dynarch run [hydra overrides...]`` trains with a mutation schedule.

Configuration comes from Hydra (``configs/config.yaml``, shipped in the package); every run
gets its own directory under ``runs/`` with the resolved config, metrics, mutations and the final
architecture. Mistakes the user can fix end in one ``dynarch: error: ...`` line and exit code 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sqlite3
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dynarch import config as config_module
from dynarch.config import (
    ConfigValueError,
    RunConfig,
    check_arguments,
    check_keys,
    check_values,
    register,
    upgraded,
)
from dynarch.errors import ConfigError, DynarchError, close_matches, first_line
from dynarch.history_store import HistoryReader, records_nothing
from dynarch.launch import launched_ranks
from dynarch.presets import CONFIG_DIR, instantiate_policy
from dynarch.run_dir import (
    CHECKPOINT,
    cannot_create,
    config_disagreement,
    holds_run,
    nearest_existing,
    not_a_dir_path,
    owned,
    write_config,
)
from dynarch.stopping import RunInterrupted

if TYPE_CHECKING:
    from dynarch.controller import RunSummary

register()

USAGE = (
    "usage: dynarch run [hydra overrides...]  (e.g. dynarch run trainer.epochs=3 model.width=8)"
    " | dynarch query RUN_DIR COMMAND (see dynarch query --help)"
    " | dynarch export RUN_DIR [--format pt2|torchscript|onnx|state_dict] [--fold-bn]"
)


# The run's lines: console and run.log (configs/hydra/job_logging/dynarch.yaml)
_LOG = logging.getLogger("dynarch")

# Messages of failed jobs; a multirun keeps going and exits 1 at the end.
_failures: list[str] = []


class SweepFailures(Callback):
    """Collects the failed jobs of a sweep from their FAILED files, in the process that
    launched it: a parallel launcher (joblib, SLURM) runs the jobs in other processes."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failed = sorted(Path(config.hydra.sweep.dir).glob("*/FAILED"))
        _failures[:] = [f.read_text(encoding="utf-8").strip() for f in failed]


class RunDirGuard(Callback):
    """Checks the run dir before Hydra writes there (its ``.hydra`` files, run.log): a new
    run (or sweep) is refused in a dir that holds a run, whose files stay byte-identical, and
    any run in a dir that cannot be written."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        new = config.get("resume") is None
        _check_run_dir(str(config.hydra.run.dir), "hydra.run.dir", new)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = str(config.hydra.sweep.dir)
        _check_run_dir(sweep, "hydra.sweep.dir", new=True)
        for run_dir in sorted(Path(sweep).glob("*/")):
            _check_run_dir(str(run_dir), "hydra.sweep.dir", new=True)


def _check_run_dir(given: str, key: str, new: bool) -> None:
    """Exit with one line if ``given`` (``key``'s value) is no path for a run dir, holds a run
    (for a new one), or cannot be written or created."""
    if launched_ranks()[0] != 0:  # rank 0 owns the run dir
        return
    problem = not_a_dir_path(given, key)
    if problem is not None:
        _exit_with(problem)
    run_dir = Path(given).expanduser().resolve()
    existing = nearest_existing(run_dir)
    if new and holds_run(run_dir):
        problem = _holds_a_run(run_dir)
    elif not os.access(existing, os.W_OK):
        problem = f"{existing} cannot be written (read-only, or no permission); a run writes there"
    else:
        problem = cannot_create(run_dir)
    if problem is None and run_dir.is_dir():
        try:  # early too: before Hydra opens run.log there (the job holds it for the run)
            with owned(run_dir):
                pass
        except DynarchError as exc:
            problem = str(exc)
    if problem is not None:
        _exit_with(problem)


def _exit_with(problem: str) -> None:
    print(f"dynarch: error: {problem}", file=sys.stderr)
    sys.exit(1)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _run_app(cfg: DictConfig) -> None:
    """One Hydra job: run it, reporting user errors as one line instead of a traceback. The
    run dir is this process's while the job runs (rank 0's, under torchrun)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    job = _Job(run_dir, resume=cfg.get("resume") is not None, main=launched_ranks()[0] == 0)
    try:
        with owned(run_dir) if job.main else nullcontext():
            summary = job.run(cfg)
    except RunInterrupted as exc:  # checkpointed and marked; a sweep stops here too
        if job.main:
            print(f"dynarch: {exc}; continue with: dynarch run resume={run_dir}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (DynarchError, OmegaConfBaseException, OSError, sqlite3.Error) as exc:
        message = _error_line(exc, run_dir)
        rank = launched_ranks()[0]
        if job.main:
            job.mark_failed(message)
        elif not message.startswith(f"rank {rank} "):  # every rank says why it stopped
            message = f"rank {rank}: {message}"
        print(f"dynarch: error: {message}", file=sys.stderr)
        _failures.append(message)
        return
    if summary is None or not job.main:
        return
    _LOG.info(
        f"final test accuracy {summary.test_accuracy:.4f} (loss {summary.test_loss:.4f}), "
        f"params {summary.params_before} -> {summary.params_after}, "
        f"{summary.mutations} mutations, {summary.steps} steps, {summary.seconds:.1f} s"
    )
    _LOG.info(f"run written to {run_dir}")


@dataclasses.dataclass
class _Job:
    """One ``dynarch run`` job in ``run_dir``: a new run, a resumed one, or one started over
    (a run dir stopped before its first checkpoint), and whose failure it may mark."""

    run_dir: Path
    resume: bool
    main: bool  # rank 0: writes the run dir
    before: dict[str, Any] | None = None  # a resumed run's status row, as it was
    own: bool = False  # the run dir holds this job's run only: a failure is marked there

    def run(self, cfg: DictConfig) -> RunSummary | None:
        """Train (None: a complete run, nothing to do)."""
        if self.resume and not (self.run_dir / CHECKPOINT).is_file():
            plain = self._start_over()
        elif self.resume:  # the run's own config, as it started; its checkpoint moves it on
            self.before = _run_row(self.run_dir)
            longer = _extension()
            if self.before["status"] == "completed" and not longer:
                _LOG.info(f"{self.run_dir} is complete; nothing to resume (extend it: {EXTEND})")
                return None
            disagreement = config_disagreement(self.run_dir, self.before["config"])
            if disagreement is not None and self.main:
                _LOG.warning(f"{disagreement}: the run goes on with its own (history.db), "
                             "written back to config.yaml")  # fmt: skip
            saved = _with_schema(self.before["config"], self.run_dir / "history.db")
            plain = _with_length(saved, longer)
        else:
            plain = self._new_run(cfg)
        policy = instantiate_policy(OmegaConf.create(plain["policy"]))
        from dynarch.controller import run  # torch: only once the command line is valid

        try:
            return run(plain, policy, self.run_dir, log=_LOG.info, resume=self.resume)
        finally:
            self._settle(plain)

    def _settle(self, plain: dict[str, Any]) -> None:
        """Once a resume has moved the run on (completed, stopped or failed anew), its dir
        says what runs: config.yaml rewritten to the config it runs with (a hand edit is
        not what ran), the previous attempt's FAILED file gone (its error is over; a new
        failure writes its own). A resume refused before that leaves the dir as it was."""
        if not (self.resume and self.main and _resume_started(self.run_dir, self.before)):
            return
        with contextlib.suppress(OSError, DynarchError):  # a full disk: the run's error says so
            if config_disagreement(self.run_dir, plain) is not None:
                write_config(self.run_dir, plain)
            (self.run_dir / "FAILED").unlink(missing_ok=True)

    def _new_run(self, cfg: DictConfig) -> dict[str, Any]:
        """The config of a new run, written to the run dir; refused in a dir holding a run."""
        if self.main and holds_run(self.run_dir):
            raise DynarchError(_holds_a_run(self.run_dir))
        self.own = True
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        assert isinstance(plain, dict)
        if plain["data"].get("path"):
            # relative to where the user ran dynarch, even if hydra.job.chdir is switched on
            plain["data"]["path"] = to_absolute_path(str(plain["data"]["path"]))
        if self.main:
            write_config(self.run_dir, plain)
        return plain

    def _start_over(self) -> dict[str, Any]:
        """A run dir without a checkpoint: stopped before its first one, nothing trained. It
        starts over from its config.yaml (said in one line); a history that records more
        than its start is refused instead (its checkpoint is gone)."""
        if self.main and not records_nothing(self.run_dir / "history.db"):
            raise DynarchError(
                f"no checkpoint at {self.run_dir / CHECKPOINT}, though its history records "
                "training (nothing to resume from)"
            )
        plain = _with_length(_saved_config(self.run_dir / "config.yaml"), _extension())
        _LOG.info(f"{self.run_dir} stopped before its first checkpoint: starting it over")
        self.resume, self.own = False, True
        if self.main:  # what the stopped start left: its history, its failure mark
            for name in ("history.db", "history.db-wal", "history.db-shm", "FAILED"):
                (self.run_dir / name).unlink(missing_ok=True)
            write_config(self.run_dir, plain)  # with a new length, if one was given
        return plain

    def mark_failed(self, message: str) -> None:
        """A FAILED file with ``message`` in the run dir, if the failure is this job's to
        mark: its own run, or a resume that got as far as changing the old run. A refused
        resume leaves the old run exactly as it was; a dir that cannot be written, too."""
        if self.own or (self.resume and _resume_started(self.run_dir, self.before)):
            with contextlib.suppress(OSError):
                (self.run_dir / "FAILED").write_text(message + "\n", encoding="utf-8")


def _holds_a_run(run_dir: Path) -> str:
    return (
        f"{run_dir} holds a run already; resume it with: dynarch run resume={run_dir} "
        "(or choose another dir)"
    )


def _saved_config(path: Path) -> dict[str, Any]:
    """A run dir's config.yaml, checked against the config schema (one line if it does not
    fit): the config a run started over runs with."""
    try:
        loaded = OmegaConf.load(path)
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as exc:
        raise ConfigError(f"{path}: not a dynarch run config ({_one_line(exc)})") from None
    return _with_schema(loaded, path)


def _with_schema(config: Any, source: Path) -> dict[str, Any]:
    """``config`` merged with the config schema, resolved and checked: every run (new,
    resumed, started over, extended) reads the same keys, a run from before a key was added
    its default (one line naming ``source`` if it does not fit)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), upgraded(config))
        plain = OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except (ValueError, OmegaConfBaseException) as exc:
        raise ConfigError(f"{source}: not a dynarch run config ({_one_line(exc)})") from None
    assert isinstance(plain, dict)
    check_values(plain)
    return plain


def _error_line(exc: BaseException, run_dir: Path) -> str:
    """The one line a failed job prints: the error's first line, naming the history file
    for SQLite's errors (which name none: "database or disk is full")."""
    line = first_line(exc)
    return f"{run_dir / 'history.db'}: {line}" if isinstance(exc, sqlite3.Error) else line


EXTEND = "dynarch run resume=DIR trainer.epochs=N (or trainer.steps=N) with more"
_EXTENDING = ("trainer.epochs=", "trainer.steps=")


def _extension() -> dict[str, int]:
    """``trainer.epochs``/``trainer.steps`` given with ``resume=``: a longer run."""
    given = [o for o in HydraConfig.get().overrides.task if o.startswith(_EXTENDING)]
    return {o.split("=", 1)[0].removeprefix("trainer."): int(o.split("=", 1)[1]) for o in given}


def _with_length(plain: dict[str, Any], longer: dict[str, int]) -> dict[str, Any]:
    """``plain`` with the length given on the command line, if any: it replaces the old one
    (``steps``, when set, would win over ``epochs``)."""
    if longer:
        plain["trainer"]["steps"] = None
        plain["trainer"] |= longer
    return plain


def _run_row(run_dir: Path) -> dict[str, Any]:
    """The history's run row (config, status, message, finish time); closes the file."""
    reader = HistoryReader(run_dir / "history.db")
    try:
        return reader.run()
    finally:
        reader.close()


def _resume_started(run_dir: Path, before: dict[str, Any] | None) -> bool:
    """Whether a failed resume got as far as changing the old run: training marks the history
    (running, then failed at a new time). A resume refused before that (unreadable history or
    checkpoint, missing data) must leave the old run exactly as it was, without a FAILED file."""
    if before is None:
        return False
    try:
        after = _run_row(run_dir)
    except DynarchError:
        return False
    keys = ("status", "message", "finished_at")
    return any(after.get(k) != before.get(k) for k in keys)


def _process_overrides(overrides: list[str]) -> tuple[list[str], str | None]:
    """Under torchrun, only rank 0 owns the run directory: the other ranks get a throwaway one
    and Hydra writes no config or log files for them."""
    rank, world = launched_ranks()
    if world > 1 and any(o in ("-m", "--multirun") for o in overrides):
        return overrides, "a sweep (-m) cannot run under torchrun; launch one run per torchrun"
    if rank == 0:
        return overrides, None
    quiet = [
        "hydra.output_subdir=null",
        "hydra/job_logging=disabled",
        "hydra/hydra_logging=disabled",
    ]
    if not any(o.startswith("hydra.run.dir=") for o in overrides):
        quiet.append(f"hydra.run.dir={tempfile.gettempdir()}")  # exists; nothing is written
    return overrides + quiet, None


def _resume_overrides(overrides: list[str]) -> tuple[list[str], str | None]:
    """``resume=DIR`` runs in DIR itself (Hydra writes nothing new there); the run's config is
    read from its history, so no other override may change it but its length (a finished
    run extended by ``trainer.epochs``/``trainer.steps``)."""
    given = [o for o in overrides if o.startswith("resume=")]
    if not given:
        return overrides, None
    run_dir = Path(given[-1].removeprefix("resume=")).expanduser().resolve()
    longer = [o for o in overrides if o.startswith(_EXTENDING)]
    others = [o for o in overrides if not o.startswith("resume=") and o not in longer]
    if others:
        return overrides, (
            "resume= takes no other overrides than trainer.epochs/steps (the run keeps its "
            f"config): {others}"
        )
    if not any((run_dir / name).is_file() for name in ("history.db", "config.yaml")):
        return overrides, f"resume: no dynarch run at {run_dir} (no history.db)"
    where = [f"resume={run_dir}", f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]
    return where + longer, None


def composition_error(overrides: list[str], config_dir: str | None = None) -> str | None:
    """Compose the config as Hydra will, once for every value a sweep names, so that an
    unknown group option, key or a wrong type is one line before any run directory exists.
    ``config_dir``: the user's own configs (``--config-dir``), searched as Hydra does."""
    try:
        parsed = OverridesParser.create().parse_overrides(
            [o for o in overrides if not o.startswith("-")]
        )
    except HydraException as exc:
        return _one_line(exc)
    parsed = [o for o in parsed if not o.key_or_group.startswith("hydra")]
    multirun = any(o in ("-m", "--multirun") for o in overrides)
    fixed = [o.input_line for o in parsed if not (multirun and o.is_sweep_override())]
    if config_dir is not None:
        fixed.append(f"hydra.searchpath=[file://{Path(config_dir).resolve()}]")
    variants = [fixed]  # without -m, a sweep fails here with Hydra's own advice
    for o in parsed:
        if multirun and o.is_sweep_override():
            variants += [fixed + [f"{o.get_key_element()}={v}"] for v in o.sweep_string_iterator()]
    for variant in variants:
        try:
            with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
                cfg = compose("config", overrides=variant)
        except (HydraException, OmegaConfBaseException) as exc:
            return _one_line(exc)
        try:  # the targets' signatures last: they import torch (a valid run does anyway)
            check_keys(OmegaConf.to_container(cfg, resolve=False))  # type: ignore[arg-type]
            sections = _checked_sections(cfg)
            check_values(sections)
            check_arguments(sections)
        except ConfigValueError as exc:
            return str(exc)
    return None


def _checked_sections(cfg: DictConfig) -> dict[str, Any]:
    """The sections :func:`check_values` and :func:`check_arguments` read, resolved; one that
    cannot be resolved here is left out (the run itself reports it)."""
    plain: dict[str, Any] = {}
    for section in ("trainer", "optimizer", "lr_schedule", "model", "policy"):
        try:
            plain[section] = OmegaConf.to_container(cfg[section], resolve=True)
        except OmegaConfBaseException:
            continue
    return plain


def _one_line(exc: Exception) -> str:
    """Hydra's message on one line: its first line, the options it lists, and the first line
    of its cause (which names the key or value: "Key 'epoch' not in 'TrainerConfig'")."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    message = lines[0].rstrip(".")
    options = [line for line in lines[1:] if not line.endswith(":") and " " not in line]
    if any(line.startswith("Available options") for line in lines) and options:
        message += f"; options: {', '.join(options)}"
    cause = str(exc.__cause__ or "").strip()
    if cause:
        message += f": {cause.splitlines()[0]}"
    return message + _did_you_mean(message)


def _did_you_mean(message: str) -> str:
    """``Key 'epoch' not in 'TrainerConfig'`` -> "; did you mean: 'epochs'?" from the
    structured config's fields (dynarch/config.py)."""
    found = re.search(r"Key '(\w+)' not in '(\w+)'", message)
    section = getattr(config_module, found.group(2), None) if found else None
    if found is None or not dataclasses.is_dataclass(section):
        return ""
    return close_matches(found.group(1), [f.name for f in dataclasses.fields(section)])


# Hydra's flags (hydra/_internal/utils.py, get_args_parser) that take a value, which may be
# the next argument ("--cfg job" as well as "--cfg=job"); --info's value is optional.
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--experimental-rerun"}  # fmt: skip
_INFO = ({"--info", "-i"}, {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"})
# flags after which Hydra prints or runs something other than one job of our configs: it
# checks the command line itself
_HYDRA_ONLY = {"--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--version",
               "--shell-completion", "-sc", "--config-path", "-cp", "--config-name", "-cn",
               "--experimental-rerun", "--resolve", "-p", "--package"}  # fmt: skip


def split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """Hydra's flags with their values (both spellings), and the overrides."""
    flags, overrides, i = [], [], 0
    while i < len(args):
        arg, name = args[i], args[i].split("=", 1)[0]
        if not arg.startswith("-"):
            overrides.append(arg)
        else:
            flags.append(arg)
            takes = name in _VALUE_FLAGS or (
                name in _INFO[0] and i + 1 < len(args) and args[i + 1] in _INFO[1]
            )
            if "=" not in arg and takes and i + 1 < len(args):
                i += 1
                flags.append(args[i])
        i += 1
    return flags, overrides


def _flag_value(flags: list[str], names: set[str]) -> str | None:
    for i, flag in enumerate(flags):
        name, _, value = flag.partition("=")
        if name in names:
            return value or (flags[i + 1] if i + 1 < len(flags) else None)
    return None


def _checked_command_line(args: list[str]) -> tuple[list[str], str | None]:
    """The command line for Hydra, or a one-line problem with it."""
    flags, overrides = split_flags(args)
    if any(f.split("=", 1)[0] in _HYDRA_ONLY for f in flags):
        return args, None
    checked = [*overrides, *(f for f in flags if f in ("-m", "--multirun"))]
    config_dir = _flag_value(flags, {"--config-dir", "-cd"})
    if config_dir is not None and not Path(config_dir).is_dir():
        return args, f"--config-dir {config_dir}: no such directory"
    problem = composition_error(checked, config_dir)
    if problem is None:
        args, problem = _resume_overrides(args)
    if problem is None:
        args, problem = _process_overrides(args)
    return args, problem


def _import_from_here() -> None:
    """Modules in the current directory import (``model._target_=my_models.Net``,
    ``policy._target_=my_policy.Mine``) as with ``python -m``; the ``dynarch`` script alone
    would not look there."""
    here = os.getcwd()
    if "" not in sys.path and here not in sys.path:
        sys.path.insert(0, here)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dynarch")
    except PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``dynarch`` console script and ``python -m dynarch``."""
    args = sys.argv[1:] if argv is None else list(argv)
    _import_from_here()
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0)
    if args and args[0] in ("-V", "--version"):
        print(f"dynarch {_version()}")
        sys.exit(0)
    if args and args[0] == "query":
        from dynarch.query_cli import main as query_main

        sys.exit(query_main(args[1:]))
    if args and args[0] == "export":
        from dynarch.export_cli import main as export_main

        sys.exit(export_main(args[1:]))
    if not args or args[0] != "run":
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    overrides, problem = _checked_command_line(args[1:])
    if problem is not None:
        if launched_ranks()[0] == 0:
            print(f"dynarch: error: {problem}", file=sys.stderr)
        sys.exit(1)
    # Hydra parses sys.argv itself; it must see only the overrides after "run".
    sys.argv = [sys.argv[0], *overrides]
    _failures.clear()
    try:
        _run_app()
    except KeyboardInterrupt:  # before training began (its own Ctrl-C is handled in the run)
        print("dynarch: interrupted before training started", file=sys.stderr)
        sys.exit(130)
    sys.exit(1 if _failures else 0)
