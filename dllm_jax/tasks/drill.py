"""Training-only drill for `arith`: the equation lines of its worked chains, without the story.

    Work out: 47+38, 103-29, 7*6, 150-88.
    ->  47+38=85
        103-29=74
        7*6=42
        150-88=62

Same operand and result ranges as `arith` (first operand up to 199, second up to 99, every result in [0, 199],
single-digit products), 4-6 equations per problem: about three times as many additions and subtractions per
training sequence as an `arith` problem. Not an evaluation task (`tasks.list_tasks()` does not list it); training
mixtures name it in their task weights (`dllm-jax train --preset cont3`).
"""

from __future__ import annotations

import re

NAME = "drill"
DESCRIPTION = "equation drill for arith (training only): 4-6 additions, subtractions and products"
MAX_PROMPT_CHARS = 60
MAX_TARGET_CHARS = 66
TOTAL_MAX = 199

_LAST = re.compile(r"=(-?\d+)\s*$")


def make(rng):
    eqs = []
    for _ in range(int(rng.integers(4, 7))):
        kind = rng.choice(["add", "sub", "mul"], p=[0.45, 0.45, 0.10])
        if kind == "mul":
            a, b = int(rng.integers(2, 10)), int(rng.integers(2, 10))
            eqs.append((f"{a}*{b}", a * b))
        elif kind == "add":
            a = int(rng.integers(2, TOTAL_MAX - 1))
            b = int(rng.integers(2, min(99, TOTAL_MAX - a) + 1))
            eqs.append((f"{a}+{b}", a + b))
        else:
            a = int(rng.integers(2, TOTAL_MAX + 1))
            b = int(rng.integers(2, min(99, a) + 1))
            eqs.append((f"{a}-{b}", a - b))
    prompt = "Work out: " + ", ".join(e for e, _ in eqs) + "."
    target = "\n".join(f"{e}={v}" for e, v in eqs)
    answer = str(eqs[-1][1])
    return prompt, answer, target, ",".join(e for e, _ in eqs)


def extract(text: str):
    lines = [ln for ln in text.strip().split("\n") if ln.strip()]
    m = _LAST.search(lines[-1]) if lines else None
    return m.group(1) if m else None
