"""Complete a tiny Python function from a one-line description: the response is indented, multi-line code.

    Write f(a, b): if a is more than b give a times 3, else give b minus 2.
    ->  def f(a, b):
            if a > b:
                return a * 3
            return b - 2

Four shapes (expression, if/else, temporary variable, for loop), random names, operators and constants. The answer
is the whole function (compared line by line, trailing spaces ignored).
"""

from __future__ import annotations

NAME = "code"
DESCRIPTION = "write a tiny Python function (2-4 body lines, indented) from a one-line description"
MAX_PROMPT_CHARS = 80
MAX_TARGET_CHARS = 96

VARS = ["a", "b", "c", "n", "k", "m", "x", "y", "z", "p", "q", "w"]
OPS = {"plus": "+", "minus": "-", "times": "*"}
CMPS = {"more than": ">", "less than": "<", "equal to": "=="}
FUNCS = ["f", "g", "h", "F", "G"]


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _operand(rng, names):
    """A variable or a constant 1-9, as (words, code)."""
    if rng.random() < 0.4:
        c = str(int(rng.integers(1, 10)))
        return c, c
    v = _pick(rng, names)
    return v, v


def _expr(rng, names, first=None):
    a = first if first is not None else _pick(rng, names)
    opw = _pick(rng, list(OPS))
    bw, bc = _operand(rng, names)
    return f"{a} {opw} {bw}", f"{a} {OPS[opw]} {bc}"


def make(rng):
    fn = _pick(rng, FUNCS)
    nargs = int(rng.integers(2, 4))
    idx = rng.permutation(len(VARS))[:nargs]
    args = [VARS[i] for i in sorted(idx)]
    sig = f"{fn}({', '.join(args)})"
    shape = _pick(rng, ["expr", "ifelse", "temp", "loop"])
    if shape == "expr":
        w1, c1 = _expr(rng, args)
        opw = _pick(rng, list(OPS))
        w2, c2 = _operand(rng, args)
        desc = f"give {w1} {opw} {w2}"
        body = [f"return {c1} {OPS[opw]} {c2}"]
    elif shape == "ifelse":
        x, y = _pick(rng, args), _pick(rng, args)
        while y == x:
            y = _pick(rng, args)
        cw = _pick(rng, list(CMPS))
        w1, c1 = _expr(rng, args)
        w2, c2 = _expr(rng, args)
        desc = f"if {x} is {cw} {y} give {w1}, else give {w2}"
        body = [f"if {x} {CMPS[cw]} {y}:", f"    return {c1}", f"return {c2}"]
    elif shape == "temp":
        t = _pick(rng, ["t", "r", "s", "u"])
        w1, c1 = _expr(rng, args)
        w2, c2 = _expr(rng, [t], first=t)
        desc = f"set {t} to {w1}, give {w2}"
        body = [f"{t} = {c1}", f"return {c2}"]
    else:
        n = _pick(rng, args)
        s = _pick(rng, ["s", "t", "r"])
        i = _pick(rng, ["i", "j"])
        start = int(rng.integers(0, 2))
        opw = "plus" if start == 0 else "times"
        w1, c1 = _expr(rng, args + [i], first=i)
        verb = "add" if start == 0 else "multiply"
        desc = f"{s} from {start}, for {i} below {n} {verb} {w1}, give {s}"
        body = [f"{s} = {start}", f"for {i} in range({n}):", f"    {s} = {s} {OPS[opw]} ({c1})", f"return {s}"]
    prompt = f"Write {sig}: {desc}."
    target = "\n".join([f"def {sig}:"] + ["    " + b for b in body])
    return prompt, target, target, f"{shape}|{','.join(args)}|{desc}"


def normalize(text: str) -> str:
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    return "\n".join(lines)


def extract(text: str):
    t = normalize(text)
    return t if t else None
