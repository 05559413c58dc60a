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

from dllm_jax.tasks import arith
from dllm_jax.tasks.arith import pad
from dllm_jax.tokenizer import ASSISTANT, EOT, USER

NAME = "drill"
DESCRIPTION = "equation drill for arith (training only): 4-6 additions, subtractions and products"
MAX_PROMPT_CHARS = 60
MAX_TARGET_CHARS = 66
DESCRIPTION_PADDED = "equation drill, zero-padded to 3 digits in the response (training only): 047+038=085"
MAX_TARGET_CHARS_PADDED = 71
DESCRIPTION_SUM = "one zero-padded sum or difference (training only): 047+038= -> 085"
DESCRIPTION_RAWSUM = "one zero-padded sum or difference, no chat template (training only): <|bos|>047+038=085"
DESCRIPTION_CHAINSTEP = "one +/- result of an arith chain, the problem and the chain before it as the prompt " \
    "(training only)"
DESCRIPTION_RAWDRILL = "6-12 zero-padded sums, one a line, no prompt; only the results are masked (training only)"
DESCRIPTION_ASK = "a bare question (training only): What is 12 + 35? -> 012+035=047 / #### 47"
TOTAL_MAX = 199

_LAST = re.compile(r"=(-?\d+)\s*$")


def make(rng, width: int = 0):
    """One problem; `width` > 0 writes the additions and subtractions of the response with zero-padded operands and
    results (`047+038=085`), so every digit sits at a fixed offset from its line's `=` (the prompt stays natural)."""
    eqs, shown = [], []
    for _ in range(int(rng.integers(4, 7))):
        kind = rng.choice(["add", "sub", "mul"], p=[0.45, 0.45, 0.10])
        if kind == "mul":
            a, b = int(rng.integers(2, 10)), int(rng.integers(2, 10))
            eqs.append((f"{a}*{b}", a * b))
            shown.append(f"{a}*{b}={a * b}")
        elif kind == "add":
            a = int(rng.integers(2, TOTAL_MAX - 1))
            b = int(rng.integers(2, min(99, TOTAL_MAX - a) + 1))
            eqs.append((f"{a}+{b}", a + b))
            shown.append(f"{pad(a, width)}+{pad(b, width)}={pad(a + b, width)}")
        else:
            a = int(rng.integers(2, TOTAL_MAX + 1))
            b = int(rng.integers(2, min(99, a) + 1))
            eqs.append((f"{a}-{b}", a - b))
            shown.append(f"{pad(a, width)}-{pad(b, width)}={pad(a - b, width)}")
    prompt = "Work out: " + ", ".join(e for e, _ in eqs) + "."
    target = "\n".join(shown)
    answer = str(eqs[-1][1])
    return prompt, answer, target, ",".join(e for e, _ in eqs)


def make_padded(rng):
    return make(rng, width=3)


def make_sum(rng):
    """One zero-padded addition or subtraction, the operands in the prompt: `047+038=` -> `085` (the `sums` rows of
    `TrainConfig.aux_task`: short, so a batch holds hundreds of them; the same digit offsets as `arith`'s chain)."""
    if rng.random() < 0.5:
        a = int(rng.integers(2, TOTAL_MAX - 1))
        b = int(rng.integers(2, min(99, TOTAL_MAX - a) + 1))
        op, r = "+", a + b
    else:
        a = int(rng.integers(2, TOTAL_MAX + 1))
        b = int(rng.integers(2, min(99, a) + 1))
        op, r = "-", a - b
    return f"{a:03d}{op}{b:03d}=", str(r), f"{r:03d}", f"{a}{op}{b}"


def make_ask(rng):
    """A bare question in words, answered like an `arith` chain: `What is 12 + 35?` -> `012+035=047` / `#### 47`
    (training only: the README's `dllm-jax generate "What is 12 + 35?"` form; `arith` stays word problems)."""
    eq, ans, res, key = make_sum(rng)  # eq '012+035=', res '047'
    a, op, b = int(eq[:3]), eq[3], int(eq[4:7])
    return f"What is {a} {op} {b}?", ans, f"{eq}{res}\n#### {res}", "q" + key


def make_chainstep(rng):
    """One +/- result of an `arith` chain in its own context: the prompt is the problem, the chat template and the
    chain up to that line's `=` (written with the special tokens, so the row is encoded without adding a template:
    `Task.chat` False); the target is the zero-padded result. Nothing after the result is in the row, so the result
    can only be computed, never copied from a later line or the `#### answer` (in `arith` rows the model learned to
    copy and never to compute: benchmarks/arith_probe.py). The key is the `arith` problem's, so the split follows
    `arith`'s (`Task.split_as`)."""
    prompt, _, target, key = arith.make(rng)
    lines = target.split("\n")
    sums = [i for i, ln in enumerate(lines) if _PADDED.fullmatch(ln)]
    i = sums[int(rng.integers(len(sums)))]
    lhs, res = lines[i].split("=")
    return f"{USER}{prompt}{EOT}{ASSISTANT}" + "".join(ln + "\n" for ln in lines[:i]) + lhs + "=", str(int(res)), \
        res, key


_PADDED = re.compile(r"\d{3}[+-]\d{3}=\d{3}")


def make_rawdrill(rng):
    """6-12 independent zero-padded sums and differences, one a line, no prompt and no chat template
    (`<|bos|>047+038=085\n163-025=138\n...`); with `rawdrill_maskable` only the results' digits are ever masked,
    so every masked digit is computable from visible operands and each row supervises up to 12 sums at positions
    all over the 160-token buffer. (`sums` rows, always at the same place in a 16-token buffer, taught run 8 a sum
    circuit that fails once the equation sits elsewhere or the buffer is longer: docs/default_model.md.)"""
    eqs, keys = [], []
    for _ in range(int(rng.integers(6, 13))):
        eq, _, res, key = make_sum(rng)
        eqs.append(eq + res)
        keys.append(key)
    last = eqs[-1]
    return "", str(int(last[-3:])), "\n".join(eqs), ",".join(keys)


def rawdrill_maskable(target: str) -> list[bool]:
    """Per character of a `rawdrill` target: True on the results' digits (offsets 8-10 of each 12-character line)."""
    return [i % 12 in (8, 9, 10) for i in range(len(target))]


def extract_sum(text: str):
    t = text.strip().split("\n")[0] if text.strip() else ""
    return str(int(t)) if t.isdigit() else None


def extract(text: str):
    lines = [ln for ln in text.strip().split("\n") if ln.strip()]
    m = _LAST.search(lines[-1]) if lines else None
    return str(int(m.group(1))) if m else None
