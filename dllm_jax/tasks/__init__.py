"""Synthetic tasks with exact answers: the training data and the evaluation testbed of the embedded default model.

Every task is a seeded generator of `Example`s (prompt, answer, full target text). Each problem has a canonical key
(its underlying numbers/structure, not its surface wording); a hash of the key puts it in the "train" or the
"heldout" split, so the two splits are disjoint by construction. `score(task, generated_text, example)` is an exact
match of the final answer.

    >>> from dllm_jax import tasks
    >>> ex = tasks.generate("arith", split="heldout", n=2, seed=0)[0]
    >>> tasks.score("arith", ex.target, ex)
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable

import numpy as np

from dllm_jax.tasks import arith, code, drill, sort

SPLITS = ("train", "heldout")
HELDOUT_MOD = 10  # one problem key in HELDOUT_MOD goes to the held-out split


@dataclasses.dataclass(frozen=True)
class Example:
    task: str
    prompt: str  # the user message (no chat template)
    answer: str  # the exact final answer that `score` compares
    target: str  # the full response the model is trained to write (worked chain / code / list)
    key: str  # canonical problem key; its hash decides the split


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    description: str
    make: Callable  # (np.random.Generator) -> (prompt, answer, target, key)
    extract: Callable  # (generated text) -> the final answer string, or None
    max_prompt_chars: int
    max_target_chars: int
    chat: bool = True  # training rows wrap the prompt in the chat template; False: <|bos|> + the raw prompt
    split_as: str = ""  # the task whose split the problem keys follow (default: this task's own)
    maskable: Callable | None = None  # (target) -> per character, whether training may mask it (None: all)
    # training rows continue after the target with <|mask|> (visible, never scored, no EOS) instead of EOS padding:
    # the row looks like a canvas mid-decoding, with the rest still to come (`chainstep`)
    mask_after: bool = False
    # (target) -> per character the index of the character whose noise draw it shares (masked together: a
    # result and its copies, `arith.ties`); None: independent
    ties: Callable | None = None


def _task(m) -> Task:
    return Task(m.NAME, m.DESCRIPTION, m.make, m.extract, m.MAX_PROMPT_CHARS, m.MAX_TARGET_CHARS)


TASKS: dict[str, Task] = {m.NAME: _task(m) for m in (arith, code, sort)}  # the evaluation testbed
TASKS["arith"] = dataclasses.replace(TASKS["arith"], ties=arith.ties)
# training-only tasks: may appear in a training mixture's task weights, never in `list_tasks()` / evaluation
TRAIN_ONLY: dict[str, Task] = {m.NAME: _task(m) for m in (drill,)}
TRAIN_ONLY["drillpad"] = Task("drillpad", drill.DESCRIPTION_PADDED, drill.make_padded, drill.extract,
                              drill.MAX_PROMPT_CHARS, drill.MAX_TARGET_CHARS_PADDED)
TRAIN_ONLY["sums"] = Task("sums", drill.DESCRIPTION_SUM, drill.make_sum, drill.extract_sum, 8, 3)
# `sums` without the chat template, `<|bos|>047+038=085<|eos|>`: the result at the same offset from `=` as in
# `arith`'s chain lines (with the template, `<|eot|><|assistant|>` sit between; run 8 learned those and did not
# transfer them to the chain)
TRAIN_ONLY["rawsums"] = Task("rawsums", drill.DESCRIPTION_RAWSUM, drill.make_sum, drill.extract_sum, 8, 3,
                             chat=False)
# one result of an `arith` chain, with the problem and the chain before it as the prompt (arith's split)
TRAIN_ONLY["chainstep"] = Task("chainstep", drill.DESCRIPTION_CHAINSTEP, drill.make_chainstep, drill.extract_sum,
                               170, 3, chat=False, split_as="arith", mask_after=True)
# many sums a row, at positions all over the buffer, only the results maskable
TRAIN_ONLY["rawdrill"] = Task("rawdrill", drill.DESCRIPTION_RAWDRILL, drill.make_rawdrill, drill.extract, 0, 143,
                              chat=False, maskable=drill.rawdrill_maskable)
TRAIN_ONLY["ask"] = Task("ask", drill.DESCRIPTION_ASK, drill.make_ask, arith.extract, 20, 20)


def list_tasks() -> list[str]:
    """Names of the tasks, in a fixed order."""
    return list(TASKS)


def get_task(name: str) -> Task:
    if name in TASKS:
        return TASKS[name]
    if name in TRAIN_ONLY:
        return TRAIN_ONLY[name]
    raise ValueError(f"unknown task {name!r}; expected one of {list_tasks()} (or, for training only, "
                     f"{list(TRAIN_ONLY)})")


def split_of(key: str) -> str:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return "heldout" if h % HELDOUT_MOD == 0 else "train"


def sample(task: str, rng: np.random.Generator, split: str = "train") -> Example:
    """Draw one example of `task` from `split` (rejection on the key hash)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    t = get_task(task)
    while True:
        prompt, answer, target, key = t.make(rng)
        if split_of(f"{t.split_as or task}:{key}") == split:
            return Example(task, prompt, answer, target, key)


def generate(task: str, split: str = "train", n: int = 100, seed: int = 0) -> list[Example]:
    """`n` examples of `task` from `split`, deterministic given `seed`."""
    get_task(task)
    order = list_tasks() + list(TRAIN_ONLY)
    rng = np.random.default_rng([seed, order.index(task), SPLITS.index(split)])
    return [sample(task, rng, split) for _ in range(n)]


def strip_eos(text: str, eos: str = "<|eos|>") -> str:
    i = text.find(eos)
    return text if i < 0 else text[:i]


def extract_answer(task: str, generated_text: str) -> str | None:
    return get_task(task).extract(strip_eos(generated_text))


def score(task: str, generated_text: str, example: Example) -> bool:
    """Exact match of the final answer in `generated_text` (the decoded response) against `example.answer`."""
    got = extract_answer(task, generated_text)
    return got is not None and got == example.answer


def char_accuracy(generated_text: str, example: Example) -> float:
    """Secondary, partial-credit metric: the fraction of the target response's characters reproduced at the same
    position, over max(len(generated), len(target)) (trailing spaces ignored; a longer or shorter output loses the
    difference). 1.0 iff the response equals the target. Exact match (`score`) stays the task metric."""
    got = strip_eos(generated_text).rstrip()
    want = example.target.rstrip()
    n = max(len(got), len(want))
    if n == 0:
        return 1.0
    return sum(a == b for a, b in zip(got, want)) / n
