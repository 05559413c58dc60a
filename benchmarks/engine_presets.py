"""Tokens/s and NFE of each reference preset on the tiny golden LLaDA checkpoint (CPU numbers).

    python benchmarks/engine_presets.py [--quick] [--out docs/benchmarks/engine_presets_cpu.md]

Counting rule: tokens/s = batch x gen_length generated tokens (no EOS early stop) / run wall time of the compiled
program (compile time excluded and reported separately; each point is the best of `--repeats` runs after one warm-up
run). NFE = forwards per row (all rows take the same number here). Prompt: 32 random ids.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

PRESETS = [
    ("llada (1 tok/step)", "llada", lambda g: dict(steps=g, block_length=32)),
    ("fastdllm th0.9", "fastdllm", lambda g: dict(block_length=32, threshold=0.9)),
    ("fastdllm_prefix th0.9", "fastdllm_prefix", lambda g: dict(block_length=32, threshold=0.9)),
    ("fastdllm_dual th0.9", "fastdllm_dual", lambda g: dict(block_length=32, threshold=0.9)),
    ("fastdllm_dual factor1", "fastdllm_dual", lambda g: dict(block_length=32, factor=1.0)),
]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="gen 64 only, batch 1 (smoke run)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures",
                                                    "llada_tiny"))
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    import dllm_jax
    from dllm_jax.generate import generate
    from dllm_jax.presets import make_schedule

    model = dllm_jax.load(a.model)
    gens = [64] if a.quick else [64, 128, 256, 512]
    batches = [1] if a.quick else [1, 8]
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, model.cfg.eos_token_id, 32).tolist()
    rows = []
    for g in gens:
        for b in batches:
            for label, name, kw in PRESETS:
                sched = make_schedule(name, g, model.cfg, **kw(g))
                out = generate(model, [prompt] * b, gen_length=g, schedule=sched)
                best = min(generate(model, [prompt] * b, gen_length=g, schedule=sched).run_time_s
                           for _ in range(a.repeats))
                tps = b * g / best
                rows.append((g, b, label, int(out.nfe[0]), tps, best * 1e3 / out.nfe[0], out.compile_time_s))
                print(f"gen {g:4d} batch {b:2d} {label:24s} NFE {out.nfe[0]:4d}  {tps:9.1f} tok/s  "
                      f"{best * 1e3 / out.nfe[0]:7.2f} ms/forward  compile {out.compile_time_s:5.1f}s", flush=True)
    dev = jax.devices()[0]
    md = [f"# Engine presets on the tiny golden LLaDA checkpoint ({dev.platform.upper()})", "",
          f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, device `{dev}`; "
          f"jax {jax.__version__}. CPU numbers on a 2-layer d_model-64 random model: they measure engine overhead "
          "and NFE, not accelerator throughput.", "",
          "Counting rule: tokens/s = batch x gen_length / run wall time (compile excluded; best of "
          f"{a.repeats} after a warm-up); prompt 32 tokens; no EOS early stop.", "",
          "| gen | batch | preset | NFE | tokens/s | ms/forward | compile s |", "|---|---|---|---|---|---|---|"]
    md += [f"| {g} | {b} | {lab} | {n} | {t:.1f} | {ms:.2f} | {c:.1f} |" for g, b, lab, n, t, ms, c in rows]
    text = "\n".join(md) + "\n"
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out + ".tmp", "w") as f:
            f.write(text)
        os.replace(a.out + ".tmp", a.out)
        print("wrote", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
