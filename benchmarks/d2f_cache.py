"""D2F with and without its KV cache (cache="pipeline") on the embedded default model (CPU numbers).

    python benchmarks/d2f_cache.py [--quick] [--out docs/benchmarks/d2f_cache_cpu.md]

Two attention modes: bidirectional (the embedded model as trained; the cache is an approximation there) and
block-causal with the prompt as one block (`with_block_causal(32)`, D2F's mask; the cache is exact there, so cached
and uncached runs must decode the same tokens with the same NFE — checked and reported). The embedded model was not
trained block-causally, so its block-causal answers are worse; that mode is here for the cost of each forward.

Counting rule: tokens/s = generated tokens up to (excluding) the first EOS, summed over the batch / run wall time of
the compiled program (compile excluded; best of `--repeats` runs after a warm-up). NFE = forwards per row (mean);
"full" = the share of those forwards that were full forwards (the rest are cached windows). Prompts: held-out `sort`
task prompts (41-61 tokens, bucket 64). D2F defaults tau_add 0.1, tau_act 0.95, tau_conf 0.9, block 32; the
official end (no early stop): after an EOS the blocks already added are finished.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="gen 64, batch 1, two variants (smoke run)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    import dllm_jax
    from dllm_jax.bench import task_prompts
    from dllm_jax.evaluate import default_model_path
    from dllm_jax.generate import generate
    from dllm_jax.presets import make_schedule

    base = dllm_jax.load(default_model_path())
    gens = [64] if a.quick else [128, 192]  # the embedded model holds 256 positions (prompt bucket 64)
    batches = [1] if a.quick else [1, 8]
    variants = [("none", None), ("pipeline", 3)] if a.quick else [("none", None), ("pipeline", 2), ("pipeline", 3),
                                                                   ("pipeline", 4)]
    modes = [("bidirectional", base), ("block_causal", base.with_block_causal(32))]
    rows = []
    for g in gens:
        for b in batches:
            prompts = task_prompts(b, 64, seed=0)
            for mode, model in modes:
                ref = None
                for cache, span in variants:
                    kw = dict(attention=mode, cache=cache) | ({"span_blocks": span} if span else {})
                    sched = make_schedule("d2f", g, model.cfg, **kw)
                    out = generate(model, prompts, gen_length=g, schedule=sched, trace=True)
                    best = min(generate(model, prompts, gen_length=g, schedule=sched).run_time_s
                               for _ in range(a.repeats))
                    full = np.asarray(out.trace["full"])
                    nfe = np.asarray(out.nfe)
                    n_full = sum(int(full[: nfe[r], r].sum()) for r in range(b))
                    toks = int(np.sum(out.gen_lengths))
                    if ref is None:
                        ref = out
                        same = "—"
                    else:
                        same = f"{100.0 * np.mean(out.generated == ref.generated):.1f} %"
                    label = "none" if cache == "none" else f"pipeline, span {span} blocks"
                    rows.append((g, b, mode, label, float(nfe.mean()), 100.0 * n_full / nfe.sum(), toks / best,
                                 best * 1e3 / nfe.max(), out.compile_time_s, same))
                    print(f"G={g} B={b} {mode:13s} {label:26s} NFE {nfe.mean():6.1f}  full {rows[-1][5]:5.1f} %  "
                          f"{rows[-1][6]:8.1f} tok/s  {rows[-1][7]:6.2f} ms/fwd  same tokens {same}", flush=True)
    lines = ["# D2F with and without its KV cache on the embedded default model (CPU)", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, device `{jax.devices()[0]}`; "
             f"jax {jax.__version__}. Model: the embedded 1.6 M-parameter default model, float32.", "",
             "Counting rule: tokens/s = generated tokens up to the first EOS, summed over the batch / run wall time "
             f"(compile excluded; best of {a.repeats} after a warm-up). NFE = forwards per row (mean); full = share "
             "of those forwards that were full forwards. Prompts: held-out `sort` prompts (bucket 64). D2F defaults "
             "(block 32, tau_add 0.1, tau_act 0.95, tau_conf 0.9), official end after an EOS. \"same tokens\" = "
             "share of generated positions equal to the uncached run of the same mode (block-causal: must be "
             "100 %, the cache is exact; bidirectional: the cache is an approximation).", "",
             "| gen | batch | attention | cache | NFE | full | tokens/s | ms/forward | compile s | same tokens |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for g, b, mode, label, nfe, fullp, tps, ms, comp, same in rows:
        lines.append(f"| {g} | {b} | {mode} | {label} | {nfe:.1f} | {fullp:.0f} % | {tps:.1f} | {ms:.2f} | "
                     f"{comp:.1f} | {same} |")
    text = "\n".join(lines) + "\n"
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, a.out)
        print(f"wrote {a.out}")
    else:
        print(text)


if __name__ == "__main__":
    main()
