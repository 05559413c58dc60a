"""MoE expert compute: grouped (only the selected experts) vs the dense all-experts reference, on a toy shape.

    python benchmarks/moe_grouped.py [--d 512 --f 256 --k 4 --experts 16 64 --windows 1 32 --reps 5]
                                     [--out docs/benchmarks/moe_cpu.md]

One LLaDA2 MoE block (router + routed experts + shared expert, dllm_jax.models.llada2_moe.moe_mlp) on N = windows x
32 tokens (a block-diffusion window of 32 per row). For each implementation: FLOPs of the compiled program (XLA
cost_analysis, the count the compiler reports for the whole jitted function; gathers and sorts count ~0) and wall time
(median of --reps runs after one warm-up, block_until_ready). All implementations are checked equal to the dense
reference before timing. Prints a markdown table and writes it to --out.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dllm_jax.models import llada2_moe  # noqa: E402
from dllm_jax.models.config import ModelConfig  # noqa: E402

IMPLS = ("dense", "gather", "segment", "ragged")


def toy_cfg(E, k, d, f):
    return ModelConfig(family="llada2_moe", vocab_size=64, d_model=d, n_layers=2, n_heads=4, n_kv_heads=2,
                       head_dim=d // 4, mlp_hidden=2 * f, rope_theta=1e4, norm_eps=1e-6, qkv_bias=False,
                       mask_token_id=63, eos_token_id=62, pad_token_id=62, max_seq_len=4096, qk_norm=True,
                       rope_dim=d // 8, n_experts=E, n_experts_per_tok=k, moe_hidden=f, n_shared_experts=1,
                       n_group=min(8, E // 2), topk_group=min(4, E // 4), routed_scaling=2.5, first_dense_layers=1)


def moe_params(cfg, seed=0):
    p = llada2_moe.init_params(cfg, jax.random.key(seed), scale=0.05)
    return jax.tree.map(lambda a: a[0], p["moe"])


def compiled_moe(cfg, impl, mp, x):
    c = cfg.replace(moe_impl=impl)
    return jax.jit(lambda mp, x: llada2_moe.moe_mlp(c, mp, x)).lower(mp, x).compile()


def flops_of(compiled) -> float:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", float("nan")))


def measure(E, k, d, f, windows, reps):
    cfg = toy_cfg(E, k, d, f)
    mp = moe_params(cfg)
    x = jax.random.normal(jax.random.key(1), (windows, 32, d), jnp.float32)
    rows, ref = [], None
    for impl in IMPLS:
        t0 = time.perf_counter()
        fn = compiled_moe(cfg, impl, mp, x)
        comp = time.perf_counter() - t0
        y = jax.block_until_ready(fn(mp, x))
        if ref is None:
            ref = y
        err = float(jnp.max(jnp.abs(y - ref)))
        assert err < 1e-3, (impl, err)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(fn(mp, x))
            ts.append(time.perf_counter() - t)
        rows.append(dict(E=E, k=k, windows=windows, tokens=windows * 32, impl=impl, gflops=flops_of(fn) / 1e9,
                         ms=1e3 * statistics.median(ts), compile_s=comp, max_err=err))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--f", type=int, default=256)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--experts", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--windows", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    rows = []
    for E in a.experts:
        for w in a.windows:
            rows += measure(E, a.k, a.d, a.f, w, a.reps)
            for r in rows[-len(IMPLS):]:
                print(r, flush=True)
    ideal = {}
    for r in rows:  # 3 matmuls of the k selected experts + the shared expert, 2 flops per MAC
        ideal[(r["E"], r["windows"])] = 2 * 3 * r["tokens"] * a.d * a.f * (a.k + 1) / 1e9
    head = ("| experts | windows (tokens) | impl | GFLOP (XLA) | GFLOP ideal (k + shared) | wall ms (median) | "
            "vs dense |\n|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        dense = next(q for q in rows if q["E"] == r["E"] and q["windows"] == r["windows"] and q["impl"] == "dense")
        lines.append(f"| {r['E']} | {r['windows']} ({r['tokens']}) | {r['impl']} | {r['gflops']:.3f} | "
                     f"{ideal[(r['E'], r['windows'])]:.3f} | {r['ms']:.2f} | {dense['ms'] / r['ms']:.2f}x |")
    table = "\n".join(lines)
    meta = (f"machine: {platform.machine()} {os.cpu_count()} cores ({platform.processor() or 'cpu'}), jax "
            f"{jax.__version__}, backend {jax.default_backend()}; shape d_model={a.d}, moe_hidden={a.f}, top-k={a.k}, "
            f"1 shared expert, float32; median of {a.reps} runs after a warm-up")
    print(meta)
    print(table)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(f"<!-- generated by benchmarks/moe_grouped.py -->\n{meta}\n\n{table}\n")
    return rows


if __name__ == "__main__":
    main()
