"""The paper's teacher-student toy, fast: GradMax growth beats random growth on training loss
and on the fan-in gradient of the new units (benchmarks/teacher_student.py, 4 seeds)."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "teacher_student.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("teacher_student_benchmark", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


# Paper protocol (one fixed teacher, 200 SGD steps between growths, 5 -> 10 units), 4 seeds.
# Margins measured before choosing (teacher seed 0, five disjoint 4-seed sets, seeds 0..19):
#   final loss GradMax / random = 0.63, 0.51, 0.78, 0.79, 0.74 (GradMax lower on 20/20 seeds);
#   mean new fan-in gradient norm GradMax / random >= 2.66 on every set (>= 2.35 with 100 steps,
#   >= 2.48 for teacher seeds 1 and 2 too).
# The loss win depends on the teacher: for teacher seed 1 GradMax's loss is lower after growths
# 1-4 and averaged over the last interval, but its *final* loss is not (0.149 vs 0.139 over 10
# seeds), so the loss assertion pins teacher 0, as the paper does; the gradient one does not
# depend on it. Each run is deterministic (seeded student, seeded global RNG for random growth).
SEEDS = range(4)
STEPS = 200


@pytest.fixture(scope="module")
def runs():
    bench = _benchmark()
    x, y = bench.teacher_data(seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 10x10 matmuls: extra threads only spin (30x slower under load)
    try:
        return {
            init: [bench.train_with_growth(init, s, x, y, steps_per_growth=STEPS) for s in SEEDS]
            for init in ("gradmax", "random")
        }
    finally:
        torch.set_num_threads(threads)


def test_every_init_starts_from_the_same_student(runs) -> None:
    for g, r in zip(runs["gradmax"], runs["random"], strict=True):
        assert g.loss_before_growth[0] == r.loss_before_growth[0]
    assert len(runs["gradmax"][0].fan_in_grad_norm) == 5  # 5 -> 10 units


def test_gradmax_final_loss_is_lower_than_random(runs) -> None:
    gradmax = statistics.fmean(r.final_loss for r in runs["gradmax"])
    random = statistics.fmean(r.final_loss for r in runs["random"])
    assert gradmax < random, (gradmax, random)


def test_gradmax_new_units_get_more_gradient_than_random(runs) -> None:
    def mean_norm(init: str) -> float:
        return statistics.fmean(statistics.fmean(r.fan_in_grad_norm) for r in runs[init])

    assert mean_norm("gradmax") > 2 * mean_norm("random"), (
        mean_norm("gradmax"),
        mean_norm("random"),
    )


def test_growth_preserves_the_function_up_to_the_eps_fan_in(runs) -> None:
    for r in runs["gradmax"] + runs["random"]:
        assert max(r.output_change) < 1e-5
    assert torch.isfinite(torch.tensor([r.final_loss for r in runs["gradmax"]])).all()
