"""Frontier statistics: Wilson intervals, exact McNemar, the paired report against the reference schedule."""

import math

import pytest

from dllm_jax import frontier_stats as fs


def test_wilson_known_values():
    lo, hi = fs.wilson(0, 50)
    assert lo == 0.0 and hi == pytest.approx(0.0713, abs=1e-4)  # the "0 of 50" interval
    lo, hi = fs.wilson(40, 200)
    assert (lo, hi) == (pytest.approx(0.15045, abs=1e-4), pytest.approx(0.26085, abs=1e-4))  # by hand
    assert fs.wilson(5, 0) == (0.0, 1.0)
    lo, hi = fs.wilson(200, 200)
    assert hi == 1.0 and lo == pytest.approx(0.9812, abs=1e-4)


def test_mcnemar_exact_known_values():
    assert fs.mcnemar_exact(0, 0) == 1.0
    assert fs.mcnemar_exact(0, 6) == pytest.approx(2 / 64)  # all six discordant problems one way
    assert fs.mcnemar_exact(3, 3) == 1.0
    assert fs.mcnemar_exact(2, 8) == pytest.approx(2 * sum(math.comb(10, i) for i in range(3)) / 1024)


def _result(label, preset, correct_by_task, chars_by_task, nfe_by_task):
    tasks = {}
    for t in correct_by_task:
        c = correct_by_task[t]
        tasks[t] = {"correct": c, "chars": chars_by_task[t], "accuracy": sum(c) / len(c),
                    "char_accuracy": sum(chars_by_task[t]) / len(c), "mean_nfe": nfe_by_task[t]}
    return {"label": label, "preset": preset, "tasks": tasks}


def test_report_paired_verdicts_and_elastic_question():
    n = 40
    ref = _result("fastdllm_dual th0.9", "fastdllm_dual", {"sort": [True] * 30 + [False] * 10},
                  {"sort": [0.9] * n}, {"sort": 20.0})
    # 0.6x the NFE, two problems lost and one gained: not significantly lower -> meets the goal
    ok = _result("fastdllm th0.5", "fastdllm", {"sort": [True] * 28 + [False] * 2 + [True] + [False] * 9},
                 {"sort": [0.9] * n}, {"sort": 12.0})
    # 0.5x the NFE but 12 problems lost: significantly lower -> does not meet it
    bad = _result("dsb greedy th0.5", "dsb", {"sort": [True] * 18 + [False] * 22},
                  {"sort": [0.7] * n}, {"sort": 10.0})
    lines = fs.report([ref, ok, bad])
    text = "\n".join(lines)
    goal = [ln for ln in lines if ln.startswith("**Goal")][0]
    assert "`fastdllm th0.5` (0.60×" in goal and "dsb greedy" not in goal
    row = [ln for ln in lines if ln.startswith("| dsb greedy th0.5 |")][0]
    assert "exact, char" in row and "0 / 12" in row
    # the elastic schedule (dsb) is dominated by no fixed-block schedule with <= its NFE (10 is the lowest)
    assert "| sort | dsb greedy th0.5 | 10.0 |" in text and "not dominated" in text
    # a fixed-block schedule with fewer forwards and better accuracy dominates it
    cheap = _result("fastdllm th0.3", "fastdllm", {"sort": [True] * 30 + [False] * 10}, {"sort": [0.9] * n},
                    {"sort": 9.0})
    text = "\n".join(fs.report([ref, ok, bad, cheap]))
    assert "| sort | dsb greedy th0.5 | 10.0 | 45.0 | 70.0 | fastdllm th0.3 |" in text


def test_report_needs_per_problem_results():
    r = {"label": "fastdllm_dual th0.9", "tasks": {"sort": {"accuracy": 0.5, "mean_nfe": 3.0}}}
    assert fs.report([r]) == []
