"""Accuracy and speed of schedules on the task suite: `dllm-jax eval`.

    dllm-jax eval --schedule fastdllm_dual --set threshold=0.9 [--model DIR] [--n 100]
    dllm-jax eval --sweep [--out docs/frontier]      # every preset / composition: the quality-speed frontier

Per task: exact-match accuracy on the held-out split, mean NFE per example, tokens per forward (TPF = generated tokens
up to EOS / NFE) and tokens/s (generated tokens up to EOS / run wall time, compile excluded), batch `--batch-size`.
EOS early stop is on for every schedule (a row stops forwarding once its answer is complete), so NFE and speed are
what a user gets; `--no-eos-stop` reproduces the fixed-length counting of the papers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

# The sweep: (label, preset, preset kwargs). Block 32 everywhere (the task answers are <= 4 blocks long).
SWEEP = [
    ("vanilla (1 tok/step)", "vanilla", dict(block_length=32)),
    ("fastdllm th0.9", "fastdllm", dict(block_length=32, threshold=0.9)),
    ("fastdllm th0.7", "fastdllm", dict(block_length=32, threshold=0.7)),
    ("fastdllm th0.5", "fastdllm", dict(block_length=32, threshold=0.5)),
    ("fastdllm factor1.0", "fastdllm", dict(block_length=32, factor=1.0)),
    ("fastdllm_prefix th0.9", "fastdllm_prefix", dict(block_length=32, threshold=0.9)),
    ("fastdllm_dual th0.9", "fastdllm_dual", dict(block_length=32, threshold=0.9)),
    ("fastdllm_dual th0.7", "fastdllm_dual", dict(block_length=32, threshold=0.7)),
    ("fastdllm_dual factor1.0", "fastdllm_dual", dict(block_length=32, factor=1.0)),
]
# Advanced methods are added when their presets exist: (label, preset, kwargs).
SWEEP_OPTIONAL = [
    ("dsb greedy th0.9", "dsb", dict(block_length=32, threshold=0.9, max_block_length=-1)),
    ("dsb_cache greedy th0.9", "dsb_cache", dict(block_length=32, threshold=0.9, max_block_length=-1,
                                                 prefix_window=8)),
    ("adablock th0.9", "adablock", dict(block_length=32, threshold=0.9)),
    ("adablock_dual th0.9", "adablock_dual", dict(block_length=32, threshold=0.9)),
    ("entropy_elastic", "entropy_elastic", dict()),
    ("d2f", "d2f", dict()),
    ("dinfer_hierarchical", "dinfer_hierarchical", dict()),
    ("localleap", "localleap", dict()),
]


def default_model_path() -> str:
    return os.path.join(os.path.dirname(__file__), "assets", "default_model")


def gen_length_for(task: str, block_length: int = 32) -> int:
    from dllm_jax import tasks

    n = tasks.get_task(task).max_target_chars + 1  # + EOS
    return -(-n // block_length) * block_length


def evaluate_schedule(model, preset: str, kw: dict, task_names=None, n: int = 100, batch_size: int = 50,
                      seed: int = 0, eos_stop: bool = True, split: str = "heldout") -> dict:
    """Run one schedule over the task suite; returns per-task and overall metrics."""
    from dllm_jax import tasks
    from dllm_jax.generate import generate
    from dllm_jax.presets import make_schedule
    from dllm_jax.tokenizer import CharTokenizer

    tok = CharTokenizer()
    task_names = task_names or tasks.list_tasks()
    per_task = {}
    for task in task_names:
        exs = tasks.generate(task, split, n, seed)
        g = gen_length_for(task)
        kw2 = dict(kw)
        if "block_length" in kw2:
            kw2["block_length"] = min(kw2["block_length"], g)
        sched = make_schedule(preset, g, model.cfg, **kw2)
        if eos_stop:
            sched = sched.replace(eos_early_stop=True)
        hits, nfe, toks, run_s, compile_s = 0, [], 0, 0.0, 0.0
        for s in range(0, n, batch_size):
            chunk = exs[s:s + batch_size]
            rows = [tok.encode_prompt(e.prompt) for e in chunk]
            out = generate(model, rows, gen_length=g, schedule=sched)
            run_s += out.run_time_s
            compile_s += out.compile_time_s
            nfe += out.nfe.tolist()
            toks += int(np.sum(out.gen_lengths))
            for e, gen in zip(chunk, out.generated):
                hits += bool(tasks.score(task, tok.decode(gen), e))
        per_task[task] = {"accuracy": hits / len(exs), "mean_nfe": float(np.mean(nfe)), "tokens": toks,
                          "tpf": toks / max(sum(nfe), 1), "tokens_per_s": toks / max(run_s, 1e-9),
                          "run_s": run_s, "compile_s": compile_s, "gen_length": g, "n": len(exs)}
    acc = float(np.mean([v["accuracy"] for v in per_task.values()]))
    mean_nfe = float(np.mean([v["mean_nfe"] for v in per_task.values()]))
    toks = sum(v["tokens"] for v in per_task.values())
    run_s = sum(v["run_s"] for v in per_task.values())
    return {"preset": preset, "kwargs": kw, "tasks": per_task, "accuracy": acc, "mean_nfe": mean_nfe,
            "tokens_per_s": toks / max(run_s, 1e-9)}


def _frontier_md(results, meta) -> str:
    tasks_ = list(results[0]["tasks"])
    head = "| schedule | " + " | ".join(f"{t} acc" for t in tasks_) + " | mean acc | mean NFE | TPF | tokens/s |"
    lines = [f"# Quality-speed frontier on the embedded default model", "",
             f"Machine: {meta['machine']}; jax {meta['jax']}; {meta['n']} held-out examples per task, batch "
             f"{meta['batch_size']}; EOS early stop {'on' if meta['eos_stop'] else 'off'}.", "",
             "Counting: accuracy = exact match of the final answer; NFE = forwards per example (mean over examples, "
             "then over tasks); TPF = generated tokens up to EOS / NFE; tokens/s = generated tokens up to EOS / run "
             "wall time (compile excluded). CPU timings on a shared 2-core machine are indicative only.", "",
             head, "|" + "---|" * (len(tasks_) + 5)]
    for r in results:
        cells = " | ".join(f"{r['tasks'][t]['accuracy'] * 100:.1f}" for t in tasks_)
        tpf = np.mean([r["tasks"][t]["tpf"] for t in tasks_])
        lines.append(f"| {r['label']} | {cells} | {r['accuracy'] * 100:.1f} | {r['mean_nfe']:.1f} | {tpf:.2f} | "
                     f"{r['tokens_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.scatter(r["mean_nfe"], r["accuracy"] * 100)
        ax.annotate(r["label"], (r["mean_nfe"], r["accuracy"] * 100), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("mean NFE per example (lower = faster)")
    ax.set_ylabel("mean exact-match accuracy (%)")
    ax.set_title("Quality-speed frontier, embedded default model")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    os.replace(path + ".tmp.png", path)
    return True


def main(argv=None) -> int:
    from dllm_jax.cli import _parse_value

    ap = argparse.ArgumentParser(prog="dllm-jax eval", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--schedule", default="vanilla")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE")
    ap.add_argument("--sweep", action="store_true", help="run every preset/composition of the frontier")
    ap.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--no-eos-stop", action="store_true")
    ap.add_argument("--out", default=None, help="write OUT.json, OUT.md and (sweep) OUT.png")
    a = ap.parse_args(argv)
    import jax

    import dllm_jax
    from dllm_jax.presets import PRESETS

    path = a.model or default_model_path()
    if not os.path.exists(path):
        print(f"error: model {path!r} not found", file=sys.stderr)
        return 2
    model = dllm_jax.load(path)
    task_names = a.tasks.split(",") if a.tasks else None
    if a.sweep:
        runs = list(SWEEP) + [r for r in SWEEP_OPTIONAL if r[1] in PRESETS]
    else:
        kw = {}
        for item in a.set or []:
            k, _, v = item.partition("=")
            kw[k] = _parse_value(v)
        runs = [(a.schedule, a.schedule, kw)]
    results = []
    for label, preset, kw in runs:
        t = time.perf_counter()
        try:
            r = evaluate_schedule(model, preset, kw, task_names, a.n, a.batch_size, eos_stop=not a.no_eos_stop)
        except (ValueError, TypeError) as e:
            print(f"{label}: skipped ({e})", file=sys.stderr)
            continue
        r["label"] = label
        results.append(r)
        accs = "  ".join(f"{k} {v['accuracy'] * 100:5.1f}%" for k, v in r["tasks"].items())
        print(f"{label:28s} {accs}  mean NFE {r['mean_nfe']:6.1f}  {r['tokens_per_s']:7.0f} tok/s  "
              f"({time.perf_counter() - t:.0f}s)", flush=True)
    if a.out and results:
        meta = {"machine": f"{platform.machine()} {os.cpu_count()} cores ({jax.devices()[0].platform})",
                "jax": jax.__version__, "n": a.n, "batch_size": a.batch_size, "eos_stop": not a.no_eos_stop}
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out + ".json.tmp", "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        os.replace(a.out + ".json.tmp", a.out + ".json")
        with open(a.out + ".md.tmp", "w") as f:
            f.write(_frontier_md(results, meta))
        os.replace(a.out + ".md.tmp", a.out + ".md")
        if a.sweep:
            _plot(results, a.out + ".png")
        print("wrote", a.out + ".{json,md" + (",png}" if a.sweep else "}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
