"""Long, easy output: sort 20-40 digits. Every output token is determined by the prompt (parallel decoding shines).

    Sort the digits: 50913371486204419975
    ->  00111233444556779999
"""

from __future__ import annotations

NAME = "sort"
DESCRIPTION = "sort a list of 20-40 digits (long, easy output)"
MAX_PROMPT_CHARS = 57
MAX_TARGET_CHARS = 40


def make(rng):
    n = int(rng.integers(20, 41))
    digits = "".join(str(d) for d in rng.integers(0, 10, size=n))
    answer = "".join(sorted(digits))
    return f"Sort the digits: {digits}", answer, answer, digits


def extract(text: str):
    t = text.strip().split("\n")[0].strip()
    return t if t else None
