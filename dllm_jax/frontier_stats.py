"""Statistics for the quality-speed frontier: Wilson intervals, paired tests against a reference schedule, and the
questions the frontier is asked (which schedules cut NFE without a significant accuracy loss; does an elastic
block beat fixed blocks).

Every schedule of a sweep runs the same held-out problems, so schedules are compared *paired*: for exact match,
McNemar's exact test on the discordant problems (X right / reference wrong vs the reverse); for character accuracy,
the mean paired difference with a normal 95 % interval. "Not significantly lower" = the paired test does not show
X below the reference at the 5 % level (two-sided).
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (95 % by default); (0, 1) for n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (0.0 if k == 0 else max(0.0, mid - half)), (1.0 if k == n else min(1.0, mid + half))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs (binomial(b + c, 1/2))."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(ref: dict, other: dict, tasks: list[str]) -> dict:
    """Paired comparison of `other` against `ref` over the problems of `tasks` (per-example lists `correct` and
    `chars` in each result's per-task dict, same problems in the same order)."""
    ra = [x for t in tasks for x in ref["tasks"][t]["correct"]]
    oa = [x for t in tasks for x in other["tasks"][t]["correct"]]
    if len(ra) != len(oa):
        raise ValueError("paired comparison needs the same problems for both schedules")
    b = sum(1 for r, o in zip(ra, oa) if o and not r)  # other right, reference wrong
    c = sum(1 for r, o in zip(ra, oa) if r and not o)
    n = len(ra)
    d = [o - r for t in tasks for r, o in zip(ref["tasks"][t]["chars"], other["tasks"][t]["chars"])]
    mean = sum(d) / n if n else 0.0
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    half = Z95 * sd / math.sqrt(n) if n else 0.0
    p = mcnemar_exact(b, c)
    return {"n": n, "b": b, "c": c, "p": p, "d_exact": (b - c) / n if n else 0.0,
            "d_char": mean, "d_char_ci": (mean - half, mean + half),
            "exact_lower": c > b and p < 0.05, "char_lower": mean + half < 0}


def _nfe(r: dict, tasks) -> float:
    return sum(r["tasks"][t]["mean_nfe"] for t in tasks) / len(tasks)


def _acc(r: dict, tasks, key="accuracy") -> float:
    return sum(r["tasks"][t][key] for t in tasks) / len(tasks)


# schedules whose block follows the model's local uncertainty or content, and the fixed-block ones they compete with
ELASTIC_PRESETS = ("entropy_elastic", "dsb", "dsb_cache", "adablock", "adablock_prefix", "adablock_dual")
FIXED_PRESETS = ("vanilla", "fastdllm", "fastdllm_prefix", "fastdllm_dual")


def report(results: list[dict], ref_label: str = "fastdllm_dual th0.9", nfe_goal: float = 0.7) -> list[str]:
    """Markdown lines: every schedule against the reference (paired), the goal's answer, and the elastic-block
    question per task."""
    by = {r["label"]: r for r in results}
    if ref_label not in by or not all("correct" in v for r in results for v in r["tasks"].values()):
        return []
    ref = by[ref_label]
    tasks = list(ref["tasks"])
    n = sum(len(ref["tasks"][t]["correct"]) for t in tasks)
    lines = [f"## Against `{ref_label}` (paired over the same {n} problems)", "",
             "Exact match: McNemar's exact test on the discordant problems (b = schedule right / reference wrong, "
             "c = the reverse). Character accuracy: mean paired difference, 95 % normal interval. NFE ratio = mean "
             "NFE / the reference's.", "",
             "| schedule | NFE ratio | Δ exact (pts) | b / c | p | Δ char (pts, 95 % CI) | significantly lower? |",
             "|---|---|---|---|---|---|---|"]
    ref_nfe = _nfe(ref, tasks)
    meets, rows = [], []
    for r in results:
        if r is ref:
            continue
        pr = paired(ref, r, tasks)
        ratio = _nfe(r, tasks) / ref_nfe
        lower = [m for m, f in (("exact", pr["exact_lower"]), ("char", pr["char_lower"])) if f]
        rows.append((ratio, f"| {r['label']} | {ratio:.2f} | {pr['d_exact'] * 100:+.1f} | {pr['b']} / {pr['c']} | "
                            f"{pr['p']:.3f} | {pr['d_char'] * 100:+.1f} ({pr['d_char_ci'][0] * 100:+.1f}, "
                            f"{pr['d_char_ci'][1] * 100:+.1f}) | {', '.join(lower) or 'no'} |"))
        if ratio <= nfe_goal and not pr["exact_lower"]:
            meets.append((r["label"], ratio, pr))
    lines += [row for _, row in sorted(rows)]
    best = max(results, key=lambda r: _acc(r, tasks))
    best_c = max(results, key=lambda r: _acc(r, tasks, "char_accuracy"))
    lines += ["", f"**Goal (≤ {nfe_goal}× the reference's NFE, exact match not significantly lower):** "
              + (", ".join(f"`{lab}` ({ratio:.2f}×, Δ exact {pr['d_exact'] * 100:+.1f} pts, p {pr['p']:.2f}; Δ char "
                           f"{pr['d_char'] * 100:+.1f} pts{' — character accuracy significantly lower' if pr['char_lower'] else ''})"
                           for lab, ratio, pr in meets) or "none") + ".",
              f"**Best exact match at any NFE:** `{best['label']}` ({_acc(best, tasks) * 100:.1f} %, mean NFE "
              f"{_nfe(best, tasks):.1f}); best character accuracy: `{best_c['label']}` "
              f"({_acc(best_c, tasks, 'char_accuracy') * 100:.1f} %)."]
    if n and max(_acc(r, tasks) for r in results) < 0.1:
        lines.append("Exact match is below 10 % for every schedule: 'not significantly lower' is then weak evidence "
                     "(few discordant problems); read the character-accuracy column.")
    lines += ["", "## Elastic blocks vs fixed blocks, per task", "",
              "An elastic schedule (block set by local uncertainty or content: entropy-elastic, DSB, AdaBlock) *beats* "
              "fixed blocks on a task when no fixed-block schedule of the sweep has both ≤ its NFE and ≥ its accuracy "
              "(it is on the frontier); it is *beaten* when some fixed-block schedule dominates it.", "",
              "| task | elastic schedule | NFE | exact | char | dominated by (fixed blocks) |", "|---|---|---|---|---|---|"]
    el = [r for r in results if r.get("preset") in ELASTIC_PRESETS]
    fx = [r for r in results if r.get("preset") in FIXED_PRESETS]
    for t in tasks:
        for r in el:
            tr = r["tasks"][t]
            dom = [f["label"] for f in fx if f["tasks"][t]["mean_nfe"] <= tr["mean_nfe"]
                   and f["tasks"][t]["accuracy"] >= tr["accuracy"]
                   and f["tasks"][t]["char_accuracy"] >= tr["char_accuracy"]]
            lines.append(f"| {t} | {r['label']} | {tr['mean_nfe']:.1f} | {tr['accuracy'] * 100:.1f} | "
                         f"{tr['char_accuracy'] * 100:.1f} | {', '.join(dom[:3]) or '— (not dominated)'} |")
    return lines
