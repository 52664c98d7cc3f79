"""`dynarch run` end to end, as a user runs it: a subprocess in a fresh directory.

The training run is short (2 epochs of digits, one grow and one prune after epoch 1) but real:
it checks the history, the architecture file and the printed summary agree.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dynarch.cli import composition_error, main
from dynarch.config import BUILTIN_BUILDERS
from dynarch.history import HistoryReader
from dynarch.models import BUILTIN_MODELS
from dynarch.policies import Mutation, TrainState

# Two epochs of vgg_small (width 16) on digits with this schedule reach 0.97-0.99 test accuracy
# (measured on seeds 0-4); chance is 0.1. 0.93 leaves room for BLAS differences across machines
# yet fails when a mutation or the optimizer hand-off breaks training.
MIN_ACCURACY = 0.93
TESTS = Path(__file__).resolve().parent

FAST = [
    "trainer.epochs=2",
    "policy.mutations=[{epoch:1,op:grow,target:features.conv2,k:8,init:gradmax},"
    "{epoch:1,op:prune,target:features.conv3,k:8,importance:magnitude}]",
]


class GrowEveryN:
    """A user's own policy, run by ``_target_`` only: grow ``target`` by 2 every ``every`` steps."""

    def __init__(self, target: str, every: int) -> None:
        self.target, self.every = target, every

    def decide(self, state: TrainState) -> list[Mutation]:
        if state.step and state.step % self.every == 0:
            return [Mutation("grow", self.target, 2, init="random", reason="my policy")]
        return []


def child_pythonpath() -> str:
    """The tests' helper modules first, then the caller's PYTHONPATH (a checkout to test that
    is not the installed one)."""
    return os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)


def dynarch(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": child_pythonpath()}
    return subprocess.run(
        [sys.executable, "-m", "dynarch", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_dir_of(result: subprocess.CompletedProcess) -> Path:
    return Path(result.stdout.strip().splitlines()[-1].removeprefix("run written to "))


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dynarch: error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    cwd = tmp_path_factory.mktemp("fast_run")
    return dynarch(cwd, "run", *FAST), cwd


def test_run_prints_run_dir_last(fast_run) -> None:
    result, cwd = fast_run
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    run_dir = run_dir_of(result)
    assert run_dir.is_absolute() and run_dir.parent == (cwd / "runs").resolve()
    assert lines[-2].startswith("final test accuracy ")
    for name in ("config.yaml", "history.db", "architecture.json"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "FAILED").exists()
    assert sum(line.startswith("epoch ") for line in lines) == 2
    assert sum(line.strip().startswith("step ") for line in lines) == 2


def test_resuming_a_complete_run_says_so_and_changes_nothing(fast_run) -> None:
    result, cwd = fast_run
    run_dir = run_dir_of(result)
    kept = ("history.db", "checkpoint.pt", "config.yaml", "metrics.csv", "architecture.json")
    before = {name: (run_dir / name).read_bytes() for name in kept}
    again = dynarch(cwd, "run", f"resume={run_dir}")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"{run_dir} is complete; nothing to resume (extend it: ")
    assert {name: (run_dir / name).read_bytes() for name in kept} == before


def test_a_finished_run_can_be_made_longer(tmp_path: Path) -> None:
    """``resume=DIR trainer.steps=N`` continues a complete run to N steps (the history's config
    says N after); fewer steps than done is refused with one line, changing nothing."""
    first = dynarch(tmp_path, "run", "trainer.steps=4", "policy=static")
    assert first.returncode == 0, first.stderr
    run_dir = run_dir_of(first)
    before = (run_dir / "history.db").read_bytes()
    line = one_error_line(dynarch(tmp_path, "run", f"resume={run_dir}", "trainer.steps=3"))
    assert line.endswith("the run is at step 4 already; trainer.epochs/steps give 3 steps "
                         "(extend it with more)")  # fmt: skip
    assert (run_dir / "history.db").read_bytes() == before
    longer = dynarch(tmp_path, "run", f"resume={run_dir}", "trainer.steps=8")
    assert longer.returncode == 0, longer.stderr
    history = HistoryReader(run_dir / "history.db")
    assert history.run()["status"] == "completed"
    assert history.run()["config"]["trainer"]["steps"] == 8
    assert [m["step"] for m in history.metrics("eval")] == [4, 8]


def test_query_latest_and_plots_beside_the_run(fast_run) -> None:
    """``latest`` names the newest run under ./runs; ``plot`` writes to RUN/plots by default."""
    result, cwd = fast_run
    run_dir = run_dir_of(result)
    older = cwd / "runs" / "multirun" / "0" / "history.db"  # an older run in a sweep dir
    older.parent.mkdir(parents=True)
    older.write_bytes((run_dir / "history.db").read_bytes())
    os.utime(older, (0, 0))
    summary = dynarch(cwd, "query", "latest", "summary", "--json")
    assert summary.returncode == 0, summary.stderr
    assert json.loads(summary.stdout)["run"] == run_dir.name
    plots = dynarch(cwd, "query", "latest", "plot")
    assert plots.returncode == 0, plots.stderr
    written = sorted(Path(p).name for p in plots.stdout.split())
    assert written == ["graph.png", "metrics.png", "widths.png"]
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == written


def test_history_has_the_scheduled_mutations_and_metrics(fast_run) -> None:
    result, _ = fast_run
    run_dir = run_dir_of(result)
    history = HistoryReader(run_dir / "history.db")
    assert history.run()["status"] == "completed"
    assert history.run()["config"]["trainer"]["epochs"] == 2
    grow, prune = history.events()
    assert (grow["kind"], grow["target"], grow["width_before"], grow["width_after"]) == (
        "grow",
        "features.conv2",
        16,
        24,
    )
    assert (prune["kind"], prune["target"], prune["width_before"], prune["width_after"]) == (
        "prune",
        "features.conv3",
        32,
        24,
    )
    assert grow["step"] == prune["step"] > 0 and grow["epoch"] == 1.0
    assert grow["fan_in_grad_norm"] > 0 and grow["reason"] == "schedule: epoch 1"
    assert prune["params_before"] == grow["params_after"]
    assert prune["macs_after"] < prune["macs_before"]
    assert [v[1] for v in history.versions()] == [0, grow["step"], grow["step"]]
    metrics = history.metrics("eval")
    assert [m["epoch"] for m in metrics] == [1.0, 2.0]
    assert metrics[-1]["accuracy"] > MIN_ACCURACY
    assert metrics[0]["params"] == grow["params_before"]
    assert metrics[1]["params"] == prune["params_after"]
    # training FLOPs: 6 x MACs per sample x samples, each epoch at that epoch's architecture
    flops = [json.loads(m["extra"])["train_flops"] for m in metrics]
    samples = 1437  # digits training split
    assert flops[0] == 6 * grow["macs_before"] * samples
    assert flops[1] == flops[0] + 6 * prune["macs_after"] * samples
    # the final architecture holds exactly the parameters the last evaluation counted
    arch = json.loads((run_dir / "architecture.json").read_text())
    assert arch == history.architecture(2)
    modules = [n for n in arch["nodes"] if n.get("kind") == "module"]
    assert sum(n["params"] for n in modules) == metrics[-1]["params"]
    # the cosine schedule kept its place through the parameter swaps of both mutations
    total = metrics[-1]["step"]
    for m in metrics:
        expected = 0.05 * (1 + math.cos(math.pi * m["step"] / total)) / 2
        assert m["lr"] == pytest.approx(expected, abs=1e-9)


def test_own_policy_by_target(tmp_path: Path) -> None:
    result = dynarch(
        tmp_path,
        "run",
        "trainer.epochs=1",
        "policy=static",
        "policy._target_=test_cli.GrowEveryN",
        "+policy.target=features.conv1",
        "+policy.every=10",
    )
    assert result.returncode == 0, result.stderr
    events = HistoryReader(run_dir_of(result) / "history.db").events()
    assert [(e["step"], e["width_after"], e["reason"]) for e in events] == [
        (10, 18, "my policy"),
        (20, 20, "my policy"),
    ]


OWN_MODEL = """
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes, in_channels, hidden=8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.head = nn.Sequential(
            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x):
        return self.head(self.conv2(self.bn1(self.conv1(x)).relu()))
"""


def test_own_model_and_policy_from_the_current_directory(tmp_path: Path) -> None:
    """``model._target_`` builds a user's class (given the data's classes and channels); the
    ``dynarch`` script imports it, and a policy, from where it runs, without PYTHONPATH=."""
    (tmp_path / "my_models.py").write_text(OWN_MODEL)
    (tmp_path / "my_policy.py").write_text(
        "from dynarch.policies import Mutation\n\n\n"
        "class GrowOnce:\n"
        "    def decide(self, state):\n"
        "        step5 = state.step == 5\n"
        '        return [Mutation("grow", "conv1", 2, init="zeros", reason="mine")] * step5\n'
    )
    script = Path(sys.executable).parent / "dynarch"
    args = ["run", "model._target_=my_models.TinyNet", "+model.kwargs.hidden=6", "policy=static"]
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [script, *args, "policy._target_=my_policy.GrowOnce", "trainer.steps=8"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "my_models.TinyNet on digits: 472 params" in result.stdout
    events = HistoryReader(run_dir_of(result) / "history.db").events()
    assert [(e["step"], e["target"], e["width_after"]) for e in events] == [(5, "conv1", 8)]
    wrong = dynarch(tmp_path, "run", "model._target_=my_models.TinyNett")
    assert one_error_line(wrong).endswith(
        "model: cannot import 'my_models.TinyNett': module 'my_models' has no attribute 'TinyNett'"
    )


def test_unknown_target_fails_before_training(tmp_path: Path) -> None:
    line = one_error_line(
        dynarch(
            tmp_path,
            "run",
            "trainer.epochs=2",
            "policy.mutations=[{epoch:1,op:grow,target:features.conv9,k:4}]",
        )
    )
    assert "'features.conv9'" in line
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "FAILED").read_text().strip() == line.removeprefix("dynarch: error: ")
    assert not (run_dir / "history.db").exists()  # nothing ran


@pytest.mark.parametrize(
    "override, words",
    [
        (["policy.mutations=[{epoch:1,op:widen,target:features.conv2,k:4}]"], ["'widen'", "grow"]),
        (["policy.mutations=[{epoch:1,op:grow,target:features.conv2,k:-2}]"], ["k must be", "-2"]),
        (["policy.mutations=[{epoch:9,op:grow,target:features.conv2,k:2}]"], ["outside the run"]),
        (["policy.mutations=[{epoch:1,op:prune,target:features.conv2,k:16}]"], ["would leave 0"]),
        (["model.name=vgg_smal"], ["'vgg_smal'", "vgg_small"]),
        (["data.name=npz", "data.path=no_such/images.npz"], ["no_such/images.npz"]),
        (["data=npz"], ["npz", "needs a path"]),
        (["policy._target_=dynarch.policies.Nope"], ["policy", "dynarch.policies.Nope"]),
        (["policy=nope"], ["'policy/nope'", "options: ", "static"]),
        (["-m", "policy=static,nope"], ["'policy/nope'"]),
        (["trainer.batch_size=big"], ["trainer.batch_size", "'big'"]),
        (["policy=gradmax_schedule", "+policy.max_params=100"], ["max_params 100", "25370"]),
        (["policy=top_scored", "policy.where.score=gradiant"], ["'gradiant'", "'gradient'"]),
        (["policy.mutations=[{at:0.5,op:grow,target:'conv[7]',k:1}]"], ["'conv[7]'", "conv4"]),
        (["-cd", "no_such_dir", "policy=mine"], ["--config-dir no_such_dir: no such directory"]),
    ],
)
def test_user_errors_are_one_line(tmp_path: Path, override: list[str], words: list[str]) -> None:
    line = one_error_line(dynarch(tmp_path, "run", *override))
    assert all(word in line for word in words), line


def test_a_typo_in_a_key_fails_at_start_with_hydras_message(tmp_path: Path) -> None:
    line = one_error_line(dynarch(tmp_path, "run", "trainer.epoch=3"))
    assert "Key 'epoch' not in 'TrainerConfig'" in line and not (tmp_path / "runs").exists()
    assert line.endswith("(did you mean: 'epochs'?)")


OPEN_MODEL = """

class OpenNet(TinyNet):
    def __init__(self, num_classes, in_channels, **options):
        super().__init__(num_classes, in_channels)


def make_net(num_classes, in_channels):
    return TinyNet(num_classes, in_channels)
"""


def test_plus_keys_are_refused_where_the_schema_or_the_target_does_not_know_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 22 item 4, checked in this process as the command line is (no run dir): a
    ``+key`` goes past Hydra's schema check, so the schema's sections are checked again and
    the open ones (model kwargs, policy arguments) by their target's signature."""
    (tmp_path / "kw_models.py").write_text(OWN_MODEL + OPEN_MODEL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    accepted = [
        ["model._target_=kw_models.TinyNet", "+model.kwargs.hidden=6"],
        ["model._target_=kw_models.OpenNet", "+model.kwargs.anything=1"],  # takes **options
        ["model._target_=kw_models.make_net", "+model.kwargs.x=1"],  # a function: the run says
        ["model=resnet_small", "model.kwargs.blocks=[2,1,1]"],
        ["model=torchvision", "+model.kwargs.weights=DEFAULT"],
        ["policy._target_=test_cli.GrowEveryN", "~policy.mutations", "+policy.target=a",
         "+policy.every=2"],
        ["+study.anything=1"],  # an open section
        ["++trainer.epochs=3", "++model.kwargs.norm=false"],  # ++: set or add
    ]  # fmt: skip
    assert [composition_error(a) for a in accepted] == [None] * len(accepted)
    assert composition_error(["-m", "+trainer.epoch=1,2"]) == (
        "unknown key trainer.epoch: TrainerConfig has no 'epoch' (did you mean: 'epochs'?)"
    )
    assert composition_error(["model=wrn28", "+model.kwargs.dept=16"]) == (
        "model.kwargs: dynarch.models.wrn takes no argument 'dept' (did you mean: 'depth'?)"
    )
    line = composition_error(["policy=gradient_trigger", "+policy.amount.max_kk=2"])
    assert line is not None and line.startswith("policy.amount: dynarch.policies.GradientSVD")
    assert line.endswith("takes no argument 'max_kk' (did you mean: 'max_k'?)")
    assert BUILTIN_BUILDERS == BUILTIN_MODELS


@pytest.mark.parametrize(
    "flags, shown",
    [
        (["--cfg", "job"], "model:\n  name: vgg_small"),
        (["--cfg=job", "model=resnet_small"], "model:\n  name: resnet_small"),
        (["-c", "job"], "optimizer:\n  name: sgd"),
        (["--info", "defaults"], "Defaults List"),
        (["-i", "searchpath"], "Config search path"),
        (["--help"], "dynarch run: train a CNN while a policy grows"),
    ],
)
def test_hydras_flags_work_in_both_spellings(tmp_path: Path, flags: list[str], shown: str) -> None:
    """``dynarch run --cfg job`` used to fail with "Error parsing override 'job'"."""
    result = dynarch(tmp_path, "run", *flags)
    assert result.returncode == 0, result.stderr
    assert shown in result.stdout and "powered by Hydra" not in result.stdout
    assert not (tmp_path / "runs").exists()


def test_own_configs_with_config_dir(tmp_path: Path) -> None:
    mine = tmp_path / "my_configs" / "policy"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text(
        "_target_: dynarch.policies.Schedule\n"
        "mutations: [{at: 0.5, op: grow, target: 'conv[0]', k: 2, init: zeros}]\n"
    )
    result = dynarch(
        tmp_path, "run", "--config-dir", "my_configs", "policy=mine", "trainer.steps=4"
    )
    assert result.returncode == 0, result.stderr
    events = HistoryReader(run_dir_of(result) / "history.db").events()
    assert [(e["step"], e["target"], e["k"]) for e in events] == [(2, "features.conv1", 2)]


def test_version(tmp_path: Path) -> None:
    result = dynarch(tmp_path, "--version")
    assert result.returncode == 0 and result.stdout.strip() == "dynarch 0.1.0"


@pytest.mark.parametrize("args", [[], ["train"], ["--run"]])
def test_no_or_unknown_subcommand_prints_usage(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: dynarch run") and len(err.strip().splitlines()) == 1


def test_sweep_over_policies_and_seeds_runs_four_runs_that_list_and_compare_show(
    tmp_path: Path,
) -> None:
    result = dynarch(
        tmp_path,
        "run",
        "-m",
        "policy=gradmax_schedule,random_schedule",
        "trainer.seed=0,1",
        "trainer.epochs=1",
    )
    assert result.returncode == 0, result.stderr
    dbs = sorted((tmp_path / "runs" / "multirun").glob("*/*/history.db"))
    assert len(dbs) == 4
    inits = sorted({e["method"] for db in dbs for e in HistoryReader(db).events()})
    assert inits == ["gradmax", "random"]
    assert all(HistoryReader(db).run()["status"] == "completed" for db in dbs)
    # query list shows every run (a failed start too); compare takes the sweep's directory,
    # whose multirun.yaml and .hydra are not runs
    failed = tmp_path / "runs" / "broken"
    failed.mkdir()
    (failed / "FAILED").write_text("data: no such file\n")
    listed = dynarch(tmp_path, "query", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["run"]: r for r in json.loads(listed.stdout)}
    assert (
        rows["broken"]["status"] == "failed" and rows["broken"]["message"] == "data: no such file"
    )
    jobs = sorted(r for r in rows if r.startswith("multirun/"))
    assert len(jobs) == 4 and all(rows[j]["status"] == "completed" for j in jobs)
    (sweep,) = (tmp_path / "runs" / "multirun").iterdir()
    compared = dynarch(tmp_path, "query", "compare", str(sweep), "--json")
    assert compared.returncode == 0, compared.stderr
    assert list(json.loads(compared.stdout)[0])[1:] == ["0", "1", "2", "3"]


CIFAR = TESTS.parent.parent / "shared" / "data" / "cifar10-10k.npz"


@pytest.mark.skipif(not CIFAR.is_file(), reason="needs ../shared/data/cifar10-10k.npz")
@pytest.mark.parametrize(
    "experiment, growth_steps",
    [
        ("gradmax_round_robin", {25, 30}),  # every 5 steps from step 25
    ],
)
def test_paper_presets_run_on_the_cifar_subset(
    tmp_path: Path, experiment: str, growth_steps: set[int]
) -> None:
    result = dynarch(
        tmp_path,
        "run",
        f"experiment={experiment}",
        "data=npz",
        f"data.path={CIFAR}",
        "trainer.steps=31",
        "trainer.threads=1",
    )
    assert result.returncode == 0, result.stderr
    events = HistoryReader(run_dir_of(result) / "history.db").events()
    assert {e["step"] for e in events} == growth_steps
    assert all(e["kind"] == "grow" and e["method"] == "gradmax" for e in events)


def test_config_error_is_reported_before_torch_is_imported(tmp_path: Path) -> None:
    """A mistyped command line is answered at once: the one-line error comes before the
    ~2 s torch import (which only a valid run needs)."""
    script = (
        "import sys\n"
        "from dynarch.cli import main\n"
        "try:\n"
        "    main(['run', 'trainer.epochs=-1'])\n"
        "except SystemExit as exit:\n"
        "    print('exit', exit.code, 'torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "exit 1 False"
    assert result.stderr.strip().splitlines() == [
        "dynarch: error: trainer.epochs must be >= 1 (or set trainer.steps), got -1"
    ]
    assert not any(tmp_path.iterdir())  # no run directory


def test_default_policy_grows_with_the_init_the_study_supports() -> None:
    """docs/study.md: zeros growth is the most accurate on the CIFAR subset (5 seeds), so the
    policy behind a plain ``dynarch run`` grows with it."""
    from hydra import compose, initialize_config_dir

    from dynarch.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config")
    grows = [m for m in cfg.policy.mutations if m.op == "grow"]
    assert grows and all(m.init == "zeros" for m in grows)


@pytest.mark.parametrize("saved, mode", [(True, "fp16"), (False, "off"), ("bf16", "bf16")])
def test_a_run_saved_when_amp_was_a_bool_resumes_in_its_precision(saved, mode) -> None:
    """Before bf16, ``trainer.amp: true`` meant fp16 with a GradScaler: a resumed run keeps it."""
    from dynarch.cli import _with_schema
    from dynarch.config import run_config

    saved_config = {"policy": {"_target_": "dynarch.policies.Static"}, "trainer": {"amp": saved}}
    plain = _with_schema(saved_config, Path("config.yaml"))
    assert plain["trainer"]["amp"] == run_config(plain).trainer.amp == mode
