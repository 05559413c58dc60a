"""GSM8K-like arithmetic word problems: 2-4 worked steps (one equation a line) and a final `#### answer` line.

    Ivy has 47 beads. She finds 38. She gets 3 bags of 6. She loses 29. How many now?
    ->  047+038=085
        3*6=18
        085+018=103
        103-029=074
        #### 074

Additions and subtractions of two-digit numbers (with carries and borrows), single-digit products; every running
total stays in [0, 199]. The chain's additions and subtractions are written zero-padded to three digits (`WIDTH`),
so each digit of a result sits at a fixed offset from the digits it depends on: the model learns sums at those
offsets (the `sums` training rows, `tasks/drill.py`) and writes them in the chain. The `#### answer` is padded
the same way (`ANSWER_WIDTH`, since session 2026-12-03 (8)), so the response's length follows from the prompt; the
scored answer is the number (`74`). Products are plain numbers. (Until session 2026-12-03 (6) the chain was
unpadded, `47+38=85`, and until session 8 the answer: `make(rng, width=0, answer_width=0)`.)
"""

from __future__ import annotations

import re

NAME = "arith"
DESCRIPTION = "arithmetic word problems, 2-4 worked steps, final '#### answer' line"
MAX_PROMPT_CHARS = 104
MAX_TARGET_CHARS = 56

NAMES = [("Ann", "She"), ("Ben", "He"), ("Cal", "He"), ("Dee", "She"), ("Eve", "She"), ("Gus", "He"),
         ("Ivy", "She"), ("Jo", "He"), ("Kim", "She"), ("Max", "He"), ("Ned", "He"), ("Pam", "She"),
         ("Ray", "He"), ("Sam", "He"), ("Tia", "She"), ("Uma", "She")]
ITEMS = ["pens", "cards", "eggs", "coins", "books", "shells", "stamps", "beads", "nuts", "toys"]
ADD = ["buys {n}", "finds {n}", "gets {n}", "wins {n}"]
SUB = ["gives away {n}", "loses {n}", "sells {n}", "drops {n}"]
BOXES = ["bags", "boxes", "packs"]
TOTAL_MAX = 199
WIDTH = 3  # zero-padding of the chain's sums and differences (0 = plain numbers)
# zero-padding of the `#### answer` (0 = plain): `#### 074` makes the response's length follow from the prompt alone,
# so a decoder never has to guess where EOS goes before the sums are done (scoring compares the numbers)
ANSWER_WIDTH = 3

_ANSWER = re.compile(r"####\s*(-?\d+)")


def pad(v: int, width: int) -> str:
    """`v` zero-padded to `width` digits (0: as it is)."""
    return str(v).zfill(width) if width else str(v)


def make(rng, width: int = WIDTH, answer_width: int = ANSWER_WIDTH):
    """One problem. `width` > 0 zero-pads the operands and results of the chain's additions and subtractions
    (`047+038=085`: every digit at a fixed offset from its line's `=`), `answer_width` the `#### answer`
    (`#### 074`); products stay natural. The example's `answer` is the plain number (`74`)."""
    name, pron = NAMES[rng.integers(len(NAMES))]
    item = ITEMS[rng.integers(len(ITEMS))]
    n_eq = int(rng.integers(2, 5))  # equations in the worked chain
    total = int(rng.integers(10, 100))
    sents = [f"{name} has {total} {item}."]
    lines, key = [], [str(total)]
    while len(lines) < n_eq:
        left = n_eq - len(lines)
        kind = rng.choice(["add", "sub", "mul"] if left >= 2 else ["add", "sub"])
        if kind == "add" and total > TOTAL_MAX - 12:
            kind = "sub"
        if kind == "sub" and total < 12:
            kind = "add"
        if kind == "mul":
            k, m = int(rng.integers(2, 10)), int(rng.integers(2, 10))
            if total + k * m > TOTAL_MAX:
                kind = "sub"
            else:
                box = BOXES[rng.integers(len(BOXES))]
                sents.append(f"{pron} gets {k} {box} of {m}.")
                lines += [f"{k}*{m}={k * m}", f"{pad(total, width)}+{pad(k * m, width)}={pad(total + k * m, width)}"]
                key.append(f"+{k}*{m}")
                total += k * m
                continue
        if kind == "add":
            n = int(rng.integers(2, min(99, TOTAL_MAX - total) + 1))
            sents.append(f"{pron} {ADD[rng.integers(len(ADD))].format(n=n)}.")
            lines.append(f"{pad(total, width)}+{pad(n, width)}={pad(total + n, width)}")
            key.append(f"+{n}")
            total += n
        else:
            n = int(rng.integers(2, min(99, total) + 1))
            sents.append(f"{pron} {SUB[rng.integers(len(SUB))].format(n=n)}.")
            lines.append(f"{pad(total, width)}-{pad(n, width)}={pad(total - n, width)}")
            key.append(f"-{n}")
            total -= n
    sents.append("How many now?")
    answer = str(total)
    target = "\n".join(lines + [f"#### {pad(total, answer_width)}"])
    return " ".join(sents), answer, target, "".join(key)


def ties(target: str) -> list[int]:
    """Per character of a chain, the character whose training noise it shares: each number equal to an earlier
    line's result (the running total as the next line's operand, a product as an operand, the `#### answer`) is
    tied digit by digit, right-aligned, to that result; every other character to itself. Masked together, a result
    is never visible as its own copy elsewhere, so training asks for it to be computed in any masking state, not
    only left to right (the model that copied did so and committed guesses: docs/default_model.md). A later
    result that happens to equal an earlier one is tied to it too (rare; both still have to be computed); the
    shipped runs were trained with exactly this rule."""
    src = list(range(len(target)))
    results: dict[int, tuple[int, int]] = {}  # value -> (start, end) of its first appearance as a result
    for m in re.finditer(r"\d+", target):
        a, b = m.span()
        v = int(m.group())
        if v in results:
            ra, rb = results[v]
            for k in range(1, min(b - a, rb - ra) + 1):
                src[b - k] = rb - k
        elif a > 0 and target[a - 1] == "=":
            results[v] = (a, b)
    return src


def extract(text: str):
    m = _ANSWER.findall(text)
    return str(int(m[-1])) if m else None  # the number: `#### 074` and `#### 74` both answer 74
