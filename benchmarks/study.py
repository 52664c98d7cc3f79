"""The when / where / how study (docs/study.md): run every arm for several seeds, then read the
runs' histories back (``dynarch.history.open``) into tables and plots.

    python benchmarks/study.py digits                  # 21 arms x 3 seeds = 63 runs
    python benchmarks/study.py cifar --jobs 2          # 63 runs, over 1 h on 2 cores
    python benchmarks/study.py digits --report-only    # tables and plots from existing runs
    python benchmarks/study.py digits --arms "static big" zeros --set trainer.epochs=30 \
        --tag epochs30                                 # a variant: runs/study/digits-epochs30/
    python benchmarks/study.py digits --arms north plateau --init gradmax_fanin --tag fanin
    python benchmarks/study.py cifar --arms "static big" zeros --seeds 0 1 2 3 4 --jobs 2

Runs go to runs/study/<data>/<arm>/<seed>/ (one Hydra sweep per arm over the seeds); the
report is printed as Markdown and the plots are written to docs/images/study/: final accuracy
against training FLOPs and parameters (<study>_accuracy.png), and accuracy over the run against
cumulative training FLOPs (<study>_curves.png, the arms of --curve-arms).
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dynarch.history
from dynarch.run_state import read_checkpoint

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parent.parent
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-10k.npz"
IMAGES = ROOT / "docs" / "images" / "study"

DATA = {
    "digits": {"base": ["experiment=study_digits"], "mid": 8, "big": 16},
    "cifar": {
        "base": ["experiment=study_cifar", "data=npz", f"data.path={CIFAR}"],
        "mid": 16,
        "big": 32,
    },
}

# arm -> (question, overrides); {mid} and {big} are the data set's static widths
ARMS: dict[str, tuple[str, list[str]]] = {
    "static small": ("baseline", ["policy=static"]),
    "static mid": ("baseline", ["policy=static", "model.width={mid}"]),
    "static big": ("baseline", ["policy=static", "model.width={big}"]),
    "gradmax": ("how", ["policy=study/grow_all", "policy.init=gradmax"]),
    # GradMax whose units start on behind BatchNorm (new gamma = the mean |gamma|)
    "gradmax_on": (
        "how",
        ["policy=study/grow_all", "policy.init=gradmax", "+policy.init_options.bn_gamma=1"],
    ),
    "gradmax_opt": ("how", ["policy=study/grow_all", "policy.init=gradmax_opt"]),
    "random": ("how", ["policy=study/grow_all", "policy.init=random"]),
    "zeros": ("how", ["policy=study/grow_all", "policy.init=zeros"]),
    "gradmax_fanin": ("how", ["policy=study/grow_all", "policy.init=gradmax_fanin"]),
    "gradmax_fanin_opt": ("how", ["policy=study/grow_all", "policy.init=gradmax_fanin_opt"]),
    "tiny": ("how", ["policy=study/grow_all", "policy.init=tiny"]),
    # TINY with its line search on the samples that chose the neurons (before held_out=0.5)
    "tiny in-sample": (
        "how",
        ["policy=study/grow_all", "policy.init=tiny", "+policy.init_options.held_out=0"],
    ),
    "net2net": ("how", ["policy=study/grow_all", "policy.init=net2net"]),
    "north": ("when", ["policy=study/north"]),
    "gradient trigger": ("when", ["policy=study/gradient_trigger"]),
    "plateau": ("when", ["policy=study/plateau"]),
    "round robin": ("where", ["policy=study/round_robin"]),
    "top scored": ("where", ["policy=study/top_scored"]),
    "grow then prune": ("grow+prune", ["policy=study/grow_then_prune"]),
    "cycles": ("grow+prune", ["policy=study/cycles"]),
    # the same with zeros growth (random fan-in, zero fan-out), the growth that switches on
    "grow then prune zeros": (
        "grow+prune",
        ["policy=study/grow_then_prune", "policy.policies.0.init=zeros"],
    ),
    "cycles zeros": ("grow+prune", ["policy=study/cycles", "policy.phases.0.policy.init=zeros"]),
    # width vs depth: "zeros" is width only; residual blocks on the same steps instead of / as
    # well as the width growth (docs/study.md)
    "depth": ("width vs depth", ["policy=study/deepen_all"]),
    "depth gradmax": ("width vs depth", ["policy=study/deepen_all", "policy.init=gradmax"]),
    "width and depth": ("width vs depth", ["policy=study/widen_deepen"]),
    # the same at the zeros arm's training FLOPs (the experiment config's depth_*, both_*)
    "depth same flops": ("width vs depth", ["policy=study/deepen_matched"]),
    "depth gradmax same flops": (
        "width vs depth",
        ["policy=study/deepen_matched", "policy.init=gradmax"],
    ),
    "width and depth same flops": ("width vs depth", ["policy=study/widen_deepen_matched"]),
}


def arm_dir(study: str, arm: str) -> Path:
    """runs/study/<study>/<arm>: the study is the data set's name, plus ``-<tag>`` for a
    variant of the whole study (``--tag``)."""
    return ROOT / "runs" / "study" / study / arm.replace(" ", "_")


# where each growing arm's policy keeps its init (``--init`` swaps it, e.g. the when / where /
# grow+prune arms with another initializer)
INIT_KEYS = {arm: "policy.init" for arm, (_, o) in ARMS.items() if "policy=study/grow_all" in o}
INIT_KEYS |= dict.fromkeys(
    ["north", "gradient trigger", "plateau", "round robin", "top scored"], "policy.init"
)
INIT_KEYS |= {"grow then prune": "policy.policies.0.init", "cycles": "policy.phases.0.policy.init"}


def run_arm(
    data: str,
    study: str,
    arm: str,
    seeds: list[int],
    jobs: int,
    extra: list[str],
    init: str | None = None,
) -> None:
    spec = DATA[data]
    overrides = [o.format(mid=spec["mid"], big=spec["big"]) for o in ARMS[arm][1]]
    if init is not None and arm in INIT_KEYS:
        overrides.append(f"{INIT_KEYS[arm]}={init}")
    sweep(arm, arm_dir(study, arm), [*spec["base"], *overrides, *extra], seeds, jobs)


def sweep(label: str, out: Path, overrides: list[str], seeds: list[int], jobs: int) -> None:
    """One Hydra sweep over the seeds not yet completed in ``out`` (an interrupted study
    continues where it stopped; an unfinished run of a seed is removed and run again)."""
    done = [s for s in seeds if _completed(out / str(s))]
    seeds = [s for s in seeds if s not in done]
    if not seeds:
        print(f"== {label}: seeds {done} already completed", flush=True)
        return
    for seed in seeds:
        shutil.rmtree(out / str(seed), ignore_errors=True)
    launcher = (
        ["hydra/launcher=local_parallel", f"hydra.launcher.n_jobs={jobs}"] if jobs > 1 else []
    )
    command = [
        sys.executable,
        "-m",
        "dynarch",
        "run",
        "-m",
        *overrides,
        f"trainer.seed={','.join(map(str, seeds))}",
        "trainer.progress=false",
        f"hydra.sweep.dir={out}",
        "hydra.sweep.subdir=${trainer.seed}",
        *launcher,
    ]
    print(f"== {label}: {' '.join(command[3:])}", flush=True)
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def final_row(run: Path) -> dict[str, float]:
    """Final test accuracy, parameters and training FLOPs of one run, from its history."""
    history = dynarch.history.open(run)
    last = history.metrics("eval").to_dicts()[-1]
    return {
        "accuracy": last["accuracy"],
        "params": last["params"],
        "train_flops": last["train_flops"],
    }


def grown_contribution(run: Path) -> tuple[float, float] | None:
    """How far the grown units are on at the end of a run that only grew (None otherwise),
    from its final checkpoint: the mean over layers of (grown channels' mean gain) /
    (original channels' mean gain), the gain being |gamma| behind a BatchNorm and the fan-in
    norm without one, and the same ratio for a channel's whole contribution, gain x fan-out
    norm (the next conv's input slice, or fc1's columns of the channel). Grown channels are
    appended after the original ones; a layer's original width is its width at version 0.
    Reads vgg_small's layer names (features.convN, classifier.fc1)."""
    history = dynarch.history.open(run)
    kinds = {e["kind"] for e in history.events().to_dicts()}
    if kinds != {"grow"}:
        return None
    initial = history.widths().to_dicts()[0]
    state = read_checkpoint(run / "checkpoint.pt")["model"]  # verified, weights only
    convs = sorted(
        (k.removesuffix(".weight") for k in state if re.fullmatch(r"features\.conv\d+\.weight", k)),
        key=lambda name: int(name.removeprefix("features.conv")),
    )
    gains, contributions = [], []
    for conv, consumer in zip(convs, [*convs[1:], "classifier.fc1"], strict=True):
        bn = conv.replace(".conv", ".bn") + ".weight"
        gain = state[bn].abs() if bn in state else state[conv + ".weight"].flatten(1).norm(dim=1)
        fan_out = state[consumer + ".weight"]
        fan_out = fan_out.reshape(fan_out.shape[0], gain.numel(), -1).transpose(0, 1)
        contribution = gain * fan_out.flatten(1).norm(dim=1)
        width = initial[conv]
        if gain.numel() > width:
            gains.append(float(gain[width:].mean() / gain[:width].mean()))
            contributions.append(float(contribution[width:].mean() / contribution[:width].mean()))
    if not gains:
        return None
    return statistics.fmean(gains), statistics.fmean(contributions)


def _completed(run: Path) -> bool:
    """Only finished runs count (a sweep may still be writing the last ones)."""
    if not (run / "history.db").exists():
        return False
    return dynarch.history.open(run).summary()["status"] == "completed"


def completed_runs(directory: Path) -> list[Path]:
    """The finished runs of one sweep directory (one per seed), in seed order."""
    return [p.parent for p in sorted(directory.glob("*/history.db")) if _completed(p.parent)]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def report(study: str) -> list[dict]:
    rows = []
    for arm, (question, _) in ARMS.items():
        runs = completed_runs(arm_dir(study, arm))
        finals = [final_row(r) for r in runs]
        if not finals:
            continue
        acc, acc_sd = mean_std([f["accuracy"] for f in finals])
        grown = [g[1] for g in map(grown_contribution, runs) if g is not None]
        params, _ = mean_std([f["params"] for f in finals])
        flops, _ = mean_std([f["train_flops"] for f in finals])
        rows.append(
            {
                "question": question,
                "arm": arm,
                "seeds": len(finals),
                "accuracy": acc,
                "accuracy_sd": acc_sd,
                "params": params,
                "train_flops": flops,
                "grown": "{:.3f} ± {:.3f}".format(*mean_std(grown)) if grown else "—",
                "fan_out_grad": _fan_out_grad_cell(runs),
            }
        )
    print(
        "\n| question | arm | seeds | test accuracy (mean ± sd) | final params | training GFLOPs "
        "| grown units' contribution | new fan-out gradient at growth |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['question']} | {r['arm']} | {r['seeds']} | {r['accuracy']:.4f} ± "
            f"{r['accuracy_sd']:.4f} | {r['params']:,.0f} | {r['train_flops'] / 1e9:,.2f} "
            f"| {r['grown']} | {r['fan_out_grad']} |"
        )
    return rows


def fan_out_grad_at_growth(run: Path) -> float | None:
    """Mean over a run's growths of the real gradient norm of the new units' fan-out on the
    growth batch (``info["fan_out_grad_norm"]``, recorded for zero fan-out inits)."""
    events = dynarch.history.open(run).events(kind="grow", info=True).column("info")
    values = [i["fan_out_grad_norm"] for i in events if i.get("fan_out_grad_norm") is not None]
    return statistics.fmean(values) if values else None


def _fan_out_grad_cell(runs: list[Path]) -> str:
    values = [v for v in map(fan_out_grad_at_growth, runs) if v is not None]
    return "{:.3f} ± {:.3f}".format(*mean_std(values)) if values else "—"


def _spread_labels(rows: list[dict], key: str) -> list[float]:
    """Label heights that do not overlap: arms whose labels would meet (x within 2x) are stacked
    upwards from their accuracy, a line of 7-point text apart (1/22 of the plotted range)."""
    top = max(r["accuracy"] + r["accuracy_sd"] for r in rows)
    bottom = min(r["accuracy"] - r["accuracy_sd"] for r in rows)
    gap = (top - bottom) / 22 or 1e-3
    heights = [r["accuracy"] for r in rows]
    order = sorted(range(len(rows)), key=lambda i: rows[i]["accuracy"])
    for n, i in enumerate(order):
        for j in order[:n]:
            near = abs(math.log(rows[i][key] / rows[j][key])) < math.log(2)
            if near and heights[i] < heights[j] + gap:
                heights[i] = heights[j] + gap
    return heights


# one colour per question in the end-point plot; the curves tell arms apart by colour instead
COLOURS = {"baseline": "black", "how": "tab:blue", "when": "tab:orange"}
COLOURS |= {"where": "tab:green", "grow+prune": "tab:red", "width vs depth": "tab:purple"}
# ... and questions by line style
STYLES = {"baseline": "--", "how": "-", "when": "-.", "where": ":", "grow+prune": (0, (5, 1, 1, 1))}
STYLES["width vs depth"] = (0, (3, 1))


def _figure(**kwargs: Any) -> Figure:
    """A matplotlib figure on the Agg backend (files only, no display), imported lazily so
    that running the study does not need matplotlib until the plots."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(fig: Figure, name: str) -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMAGES / name, dpi=90)
    print(f"\nplot: {(IMAGES / name).relative_to(ROOT)}")


def plot(study: str, rows: list[dict]) -> None:
    """Accuracy against training FLOPs and against final parameters, one point per arm."""
    import matplotlib.lines
    import matplotlib.ticker

    fig = _figure(figsize=(11, 5))
    for ax, key, label in zip(
        fig.subplots(1, 2),
        ("train_flops", "params"),
        ("training FLOPs", "final parameters"),
        strict=True,
    ):
        for r in rows:
            ax.errorbar(
                r[key],
                r["accuracy"],
                yerr=r["accuracy_sd"],
                fmt="o",
                capsize=3,
                color=COLOURS[r["question"]],
            )
        for r, label_y in zip(rows, _spread_labels(rows, key), strict=True):
            ax.annotate(
                r["arm"],
                (r[key], r["accuracy"]),
                xytext=(r[key] * 1.08, label_y),
                fontsize=7,
                va="center",
                arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "grey"},
            )
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel("final test accuracy")
        ax.grid(alpha=0.3)
    handles = [
        matplotlib.lines.Line2D([], [], marker="o", ls="", color=c, label=q)
        for q, c in COLOURS.items()
    ]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8)
    fig.suptitle(f"study on {study}: mean ± sd over seeds")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    _save(fig, f"{study}_accuracy.png")


def eval_curve(run: Path) -> dict[int, tuple[float, float]]:
    """Step -> (cumulative training FLOPs, test accuracy) at every evaluation of one run."""
    rows = dynarch.history.open(run).metrics("eval").to_dicts()
    return {
        r["step"]: (r["train_flops"], r["accuracy"])
        for r in rows
        if r["accuracy"] is not None and r.get("train_flops") is not None
    }


def mean_curve(runs: list[Path]) -> dict[str, Any] | None:
    """Mean over seeds at the evaluation steps all seeds have (they share the schedule), FLOPs
    averaged too: they differ between seeds where growth depends on the data. None without
    a common step."""
    curves = [eval_curve(r) for r in runs]
    steps = sorted(set.intersection(*map(set, curves))) if curves else []
    if not steps:
        return None
    accuracy = [mean_std([c[s][1] for c in curves]) for s in steps]
    return {
        "flops": [statistics.fmean(c[s][0] for c in curves) for s in steps],
        "accuracy": [mean for mean, _ in accuracy],
        "sd": [sd for _, sd in accuracy],
        "seeds": len(curves),
    }


def arm_curves(study: str, arms: list[str]) -> dict[str, dict[str, Any]]:
    """The mean curve of each of ``arms`` that has completed runs, in the order given."""
    curves = {arm: mean_curve(completed_runs(arm_dir(study, arm))) for arm in arms}
    missing = [arm for arm, curve in curves.items() if curve is None]
    if missing:
        print(f"\ncurves: no completed runs of {', '.join(missing)}")
    return {arm: curve for arm, curve in curves.items() if curve is not None}


def _arm_colours(arms: list[str]) -> dict[str, str]:
    """Baselines in greys (black in the end-point plot), the same grey for an arm in every
    selection; every other arm its own colour."""
    baselines = [arm for arm, (question, _) in ARMS.items() if question == "baseline"]
    greys = ["black", "dimgrey", "darkgrey"]
    palette = [f"C{i}" for i in range(10) if i != 7]  # C7 is a grey: it would pass for a baseline
    others = iter(palette[i % 9] for i in range(len(arms)))
    return {
        arm: greys[baselines.index(arm) % 3] if arm in baselines else next(others) for arm in arms
    }


def plot_curves(study: str, curves: dict[str, dict[str, Any]]) -> None:
    """Test accuracy over the run against cumulative training FLOPs, one line per arm (mean
    over seeds, ±1 sd shaded): how an arm gets to its end point, e.g. what a growth costs."""
    import matplotlib.ticker

    top = max(max(c["flops"]) for c in curves.values())
    scale, unit = (1e12, "TFLOPs") if top >= 1e12 else (1e9, "GFLOPs")
    fig = _figure(figsize=(10, 5))
    ax = fig.add_subplot()
    for arm, colour in _arm_colours(list(curves)).items():
        c = curves[arm]
        x = [f / scale for f in c["flops"]]
        band = [(a - sd, a + sd) for a, sd in zip(c["accuracy"], c["sd"], strict=True)]
        ax.fill_between(x, *zip(*band, strict=True), color=colour, alpha=0.12, lw=0)
        style = STYLES[ARMS[arm][0]]
        label = f"{arm} ({ARMS[arm][0]}, {c['seeds']} seed{'s' * (c['seeds'] > 1)})"
        ax.plot(x, c["accuracy"], color=colour, ls=style, marker=".", ms=4, lw=1.3, label=label)
    ax.set_xscale("log")
    # 1-2-5 ticks: a short run (or a short range of FLOPs) spans less than a decade
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(f"cumulative training {unit}")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"study on {study}: test accuracy over the run, mean ± sd over seeds")
    fig.tight_layout()
    _save(fig, f"{study}_curves.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", choices=sorted(DATA))
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED", help="default: 0 1 2"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (joblib)")
    arm = {"choices": list(ARMS), "metavar": "ARM"}
    parser.add_argument("--arms", nargs="*", default=list(ARMS), help="a subset of the arms", **arm)
    parser.add_argument(
        "--curve-arms",
        nargs="+",
        default=[a for a, (question, _) in ARMS.items() if question in ("baseline", "how")],
        help="the arms of the accuracy-over-FLOPs curves (default: the baseline and how arms)",
        **arm,
    )
    parser.add_argument(
        "--set", nargs="*", default=[], help="overrides for every arm, e.g. trainer.epochs=30"
    )
    parser.add_argument(
        "--init", help="the initializer of every growing arm (policy init), e.g. gradmax_fanin"
    )
    parser.add_argument("--tag", help="name of this variant of the study (with --set/--init)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if (args.set or args.init) and not args.tag:
        parser.error("--set/--init change every arm: name the variant with --tag")
    study = f"{args.data}-{args.tag}" if args.tag else args.data
    if not args.report_only:
        seeds = list(dict.fromkeys(args.seeds))  # a seed named twice would run twice
        for arm in args.arms:
            run_arm(args.data, study, arm, seeds, args.jobs, args.set, args.init)
    rows = report(study)
    if rows and not math.isnan(rows[0]["accuracy"]):
        plot(study, rows)
        curves = arm_curves(study, args.curve_arms)
        if curves:
            plot_curves(study, curves)


if __name__ == "__main__":
    main()
