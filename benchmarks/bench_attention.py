"""Block-attention timings: jnp reference vs the Pallas kernels at LLaDA-8B attention shapes.

    python benchmarks/bench_attention.py [--batch 1 8 32] [--cache 256 512 1024 2048 4096] [--window 32 full]
                                         [--block-size 0] [--dtype bfloat16] [--reps 10]
                                         [--out docs/benchmarks/attention.md]
    python benchmarks/bench_attention.py --quick [--out FILE]      # tiny shapes, CPU smoke run (interpret mode)

LLaDA-8B attention: 32 query heads, 32 kv heads, head_dim 128. A "window 32" row is the cached diffusion step
(32 queries at the end of the cache attending over the whole S-long buffer); a "full" row is the uncached forward
(T = S). Every implementation that can run on the default backend is timed ("reference" always; "pallas_tpu" on a
TPU, "pallas_mgpu" (Mosaic GPU) and "pallas_gpu" (Triton) on a GPU; in --quick mode every kernel also runs in its
interpreter). Each kernel's output is checked against the reference (max |err|). Baselines:
`jax.nn.dot_product_attention` with the same masks as a dense boolean mask, XLA's lowering ("sdpa_xla") and on a
GPU cuDNN's fused attention ("sdpa_cudnn") — the measurement that decides whether the Pallas GPU kernels pay off
against the cuDNN fallback.

Reported: median wall time of `--reps` calls after a warm-up (compile) call; achieved TFLOP/s counts the attention
matmuls 4 * B * H * T * S * D; GB/s counts the minimum HBM traffic (q, k, v, o and the masks, each once). The
percentages are against the device's peak dense bf16 FLOP/s and HBM bandwidth where the device kind is known.
Without --quick the markdown table is written to docs/benchmarks/attention.md (or --out).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels.block_attention import api  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "docs", "benchmarks", "attention.md")

# device_kind substring -> (peak dense bf16 TFLOP/s, peak HBM GB/s); vendor datasheet numbers.
PEAKS = [
    ("H200", (989.0, 4800.0)),
    ("H100 PCIe", (756.0, 2000.0)),
    ("H100", (989.0, 3350.0)),        # SXM
    ("A100", (312.0, 2039.0)),
    ("L4", (121.0, 300.0)),
    ("TPU v6", (918.0, 1640.0)),
    ("TPU v5p", (459.0, 2765.0)),
    ("TPU v5 lite", (197.0, 819.0)),
    ("TPU v5e", (197.0, 819.0)),
    ("TPU v4", (275.0, 1228.0)),
]


def device_peaks(kind: str):
    for key, peaks in PEAKS:
        if key.lower() in kind.lower():
            return peaks
    return None


def make_inputs(B, T, S, H, K, D, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (B, T, H, D), dtype)
    k = jax.random.normal(ks[1], (B, S, K, D), dtype)
    v = jax.random.normal(ks[2], (B, S, K, D), dtype)
    key_valid = jnp.ones((B, S), bool)
    q_index = jnp.broadcast_to(jnp.arange(S - T, S, dtype=jnp.int32), (B, T))   # window at the end of the cache
    return q, k, v, key_valid, q_index


# Baselines that are not implementations of the API: jax.nn.dot_product_attention with the same masks as a dense
# boolean [B, 1, T, S] mask. "sdpa_cudnn" (GPU only) is the cuDNN fused attention the issue names as the fallback
# for the Pallas GPU kernels where a custom kernel does not pay off; "sdpa_xla" is XLA's own lowering of the same call.
SDPA = {"sdpa_xla": "xla", "sdpa_cudnn": "cudnn"}


def sdpa(q, k, v, key_valid, q_index, *, block_size=0, implementation="xla"):
    S = k.shape[1]
    mask = key_valid[:, None, None, :]
    if block_size:
        k_blk = jnp.arange(S, dtype=jnp.int32) // block_size
        mask = mask & ((q_index[:, :, None] // block_size) >= k_blk[None, None, :])[:, None]
    mask = jnp.broadcast_to(mask, (q.shape[0], 1, q.shape[1], S))
    return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask,
                                        implementation=implementation)


def baseline_names(backend: str) -> list:
    return ["sdpa_xla"] + (["sdpa_cudnn"] if backend == "gpu" else [])


def time_fn(fn, args, reps):
    out = jax.block_until_ready(fn(*args))                  # compile + warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def run(shapes, impls, *, dtype, block_size, reps, interpret, peaks=None, log=print):
    """shapes: iterable of (B, T, S, H, K, D). Returns a list of result dicts."""
    rows = []
    for (B, T, S, H, K, D) in shapes:
        args = make_inputs(B, T, S, H, K, D, dtype)
        itemsize = jnp.dtype(dtype).itemsize
        flops = 4 * B * H * T * S * D
        nbytes = (2 * B * T * H * D + 2 * B * S * K * D) * itemsize + B * S + 4 * B * T
        ref_out = None
        for name in impls:
            if name in SDPA:
                fn = jax.jit(lambda *a, _n=name: sdpa(*a, block_size=block_size, implementation=SDPA[_n]))
            else:
                fn = jax.jit(lambda *a, _n=name: api.block_attention(
                    *a, block_size=block_size, implementation=_n, interpret=interpret))
            row = dict(B=B, T=T, S=S, H=H, K=K, D=D, impl=name, flops=flops, bytes=nbytes)
            try:
                sec, out = time_fn(fn, args, reps)
                row["sec"] = sec
                if name == "reference":
                    ref_out = out
                elif ref_out is not None:
                    row["err"] = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref_out.astype(jnp.float32))))
                del out
            except Exception as e:  # noqa: BLE001 - e.g. the reference's [B,H,T,S] scores do not fit
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            rows.append(row)
            log(format_row(row, peaks))
        del args, ref_out
    return rows


def format_row(r, peaks):
    shape = f"B={r['B']} T={r['T']} S={r['S']}"
    if "sec" not in r:
        return f"| {shape} | {r['impl']} | failed: {r['error']} | | | | | |"
    tflops = r["flops"] / r["sec"] / 1e12
    gbs = r["bytes"] / r["sec"] / 1e9
    pf = f"{100 * tflops / peaks[0]:.1f}%" if peaks else "n/a"
    pb = f"{100 * gbs / peaks[1]:.1f}%" if peaks else "n/a"
    err = f"{r['err']:.2e}" if "err" in r else ""
    return f"| {shape} | {r['impl']} | {r['sec'] * 1e3:.3f} | {tflops:.2f} | {pf} | {gbs:.1f} | {pb} | {err} |"


HEADER = ("| shape | impl | ms | TFLOP/s | % peak FLOP/s | GB/s | % peak BW | max abs err vs ref |\n"
          "|---|---|---|---|---|---|---|---|")


def markdown(rows, *, device, peaks, dtype, block_size, reps, quick):
    lines = [
        "# Block-attention benchmark",
        "",
        f"Device: `{device}`; dtype {jnp.dtype(dtype).name}; block_size {block_size}; median of {reps} calls after "
        "a warm-up call." + (" **--quick smoke run (tiny shapes, interpret mode): not a measurement.**" if quick
                            else ""),
        "",
        "Peaks: " + (f"{peaks[0]:.0f} TFLOP/s dense bf16, {peaks[1]:.0f} GB/s HBM." if peaks
                     else "unknown for this device (percentages n/a)."),
        "FLOPs = 4·B·H·T·S·D (QKᵀ and PV); bytes = q + k + v + o + masks, each read or written once.",
        "",
        HEADER,
    ]
    lines += [format_row(r, peaks) for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes; checks the script and kernels run (CPU)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--cache", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--window", nargs="+", default=["32", "full"], help="query window sizes; 'full' means T = S")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=0, help="block-causal block size (0: bidirectional)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--impl", nargs="+", default=None,
                   help="implementations to time (default: all runnable + the jax.nn.dot_product_attention baselines "
                        "sdpa_xla, and sdpa_cudnn on a GPU)")
    p.add_argument("--out", default=None, help=f"markdown output (default {DEFAULT_OUT}; none in --quick mode)")
    a = p.parse_args(argv)

    dtype = jnp.bfloat16 if a.dtype == "bfloat16" else jnp.float32
    if a.quick:
        shapes = [(1, 8, 256, 4, 2, 128), (2, 256, 256, 4, 4, 64)]
        reps, block_size, interpret = 1, a.block_size or 32, True
    else:
        shapes = [(B, S if w == "full" else int(w), S, a.heads, a.kv_heads, a.head_dim)
                  for B in a.batch for S in a.cache for w in a.window if w == "full" or int(w) <= S]
        reps, block_size, interpret = a.reps, a.block_size, False
    impls = a.impl or ([n for n in api.runnable_implementations(interpret) if n != "auto"]
                       + baseline_names(jax.default_backend()))

    dev = jax.devices()[0]
    device = f"{dev.platform}: {getattr(dev, 'device_kind', '?')}"
    peaks = device_peaks(getattr(dev, "device_kind", ""))
    print(f"device {device}; peaks {peaks}; implementations {impls}")
    print(HEADER)
    rows = run(shapes, impls, dtype=dtype, block_size=block_size, reps=reps, interpret=interpret,
               peaks=peaks, log=lambda s: print(s, flush=True))
    md = markdown(rows, device=device, peaks=peaks, dtype=dtype, block_size=block_size, reps=reps, quick=a.quick)
    out = a.out if (a.out or a.quick) else DEFAULT_OUT
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(md)
        print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
