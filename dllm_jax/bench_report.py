"""The reports of `dllm-jax bench`: the markdown summary, the plots and the JSON/markdown files of a result."""

from __future__ import annotations

import json
import math
import os

import numpy as np

from dllm_jax.bench_costs import PEAKS

# --------------------------------------------------------------------------------------------------------------
# Reports

def _fmt(v, spec=".3g"):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def _si(v, unit=""):
    if v is None:
        return "-"
    for f, s in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= f:
            return f"{v / f:.3g} {s}{unit}"
    return f"{v:.3g} {unit}"


def markdown(result: dict) -> str:
    m, pk = result["machine"], result["peak"]
    ok = [p for p in result["points"] if p["status"] == "ok"]
    L = [f"# dllm-jax efficiency benchmark — {m['name']}", "",
         f"* Machine: **{m['name']}** ({m['platform']}, {m['device_count']} device(s)); jax {m['jax']}; "
         f"host load average at start {_fmt_load(m.get('loadavg_start'))}, at end {_fmt_load(m.get('loadavg_end'))}"
         + (" — **the machine was shared with other jobs: timings are under load**" if m.get("under_load") else ""),
         f"* Weights: {result['weights']} ({result['params'] / 1e6:.1f} M parameters, {result['dtype']})",
         f"* Schedules: {', '.join(result['schedules'])}; block length {result['block_length']}, threshold "
         f"{result['threshold']}; grid `{result['grid']}`; {result['repeats']} timed repeat(s), best kept",
         f"* NFE pattern: {result['nfe_note']}",
         f"* Wall time of the sweep: {result['wall_s']:.0f} s", "",
         "Counting: tok/s = batch × gen_length / best run wall time (compile excluded; EOS early stop off, so every "
         "method generates exactly gen_length tokens and AR and diffusion are compared at the same length); "
         "tok/s (EOS) counts generated tokens up to the first EOS over the same time. TPF = gen_length / mean NFE. "
         "ms/fwd = wall / loop iterations (a batched forward counts once). FLOPs and bytes are analytic (executed "
         "shapes; ideal traffic), AI = FLOPs / bytes; roofline % = roofline time / measured time.", "",
         "## Roofline peaks", "", "| device | peak FLOP/s | bandwidth | ridge (FLOP/byte) |", "|---|---|---|---|",
         f"| **{result['peak_name']}** (this run, {pk['dtype']}) | {_si(pk['flops'], 'FLOP/s')} | "
         f"{_si(pk['bw'], 'B/s')} | {pk['flops'] / pk['bw']:.1f} |"]
    for d, p in PEAKS.items():
        L.append(f"| {d} ({p['dtype']}, data sheet) | {_si(p['flops'], 'FLOP/s')} | {_si(p['bw'], 'B/s')} | "
                 f"{p['flops'] / p['bw']:.0f} |")
    L += ["", "## Headline (same length, per prompt / generation length / batch)", "",
          "| prompt | gen | batch | fastest | tok/s | × vanilla | × AR | AR tok/s | AR TPF | best diffusion TPF |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    keyf = lambda p: (p["prompt_kind"], p["gen_length"], p["batch"])  # noqa: E731
    for key in sorted({keyf(p) for p in ok}, key=lambda k: (k[0] != "short", k[1], k[2])):
        grp = {p["method"]: p for p in ok if keyf(p) == key}
        best = max(grp.values(), key=lambda p: p["tok_s"])
        van, ar = grp.get("vanilla"), grp.get("ar")
        diff_tpf = max((p["tpf"] for n, p in grp.items() if n != "ar"), default=None)
        L.append(f"| {key[0]} | {key[1]} | {key[2]} | {best['method']} | {best['tok_s']:.1f} | "
                 f"{_fmt(best['tok_s'] / van['tok_s'], '.2f') if van else '-'} | "
                 f"{_fmt(best['tok_s'] / ar['tok_s'], '.2f') if ar else '-'} | "
                 f"{_fmt(ar['tok_s'], '.1f') if ar else '-'} | {_fmt(ar['tpf'], '.2f') if ar else '-'} | "
                 f"{_fmt(diff_tpf, '.2f')} |")
    L += ["", "## All points", "",
          "| schedule | prompt | gen | batch | NFE | TPF | tok/s | tok/s (EOS) | ms/fwd | compile s | "
          "GFLOP/fwd | MB/fwd | GFLOP/tok | MB/tok | AI | achieved FLOP/s | roofline % | NFE source |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        if p["status"] != "ok":
            L.append(f"| {p['method']} | {p['prompt_kind']} | {p['gen_length']} | {p['batch']} | "
                     f"**{p['status']}** | | | | | | | | | | | | | {p.get('error', '')} |")
            continue
        L.append(f"| {p['method']} | {p['prompt_kind']} | {p['gen_length']} | {p['batch']} | {p['nfe_mean']:.1f} | "
                 f"{p['tpf']:.2f} | {p['tok_s']:.1f} | {p['tok_s_to_eos']:.1f} | {p['ms_per_forward']:.2f} | "
                 f"{p['compile_s']:.1f} | {p['flops_per_forward'] / 1e9:.3g} | {p['bytes_per_forward'] / 1e6:.3g} | "
                 f"{p['flops_per_token'] / 1e9:.3g} | {p['bytes_per_token'] / 1e6:.3g} | "
                 f"{p['arith_intensity']:.3g} | {_si(p['achieved_flops_s'], 'FLOP/s')} | "
                 f"{100 * p['roofline_fraction']:.0f} | {_short_source(p['nfe_source'])} |")
    for shape, rows in result.get("projections", {}).items():
        devs = list(PEAKS)
        L += ["", f"## Roofline bounds for {shape} (bf16, this run's forward pattern; computed, not measured)", "",
              "| schedule | prompt | gen | batch | TPF | GFLOP/tok | MB/tok | AI | "
              + " | ".join(f"{d} tok/s" for d in devs) + " |", "|" + "---|" * (8 + len(devs))]
        for r in rows:
            L.append(f"| {r['method']} | {r['prompt_kind']} | {r['gen_length']} | {r['batch']} | {r['tpf']:.2f} | "
                     f"{r['flops_per_token'] / 1e9:.3g} | {r['bytes_per_token'] / 1e6:.4g} | "
                     f"{r['arith_intensity']:.3g} | " + " | ".join(f"{r['bound_tok_s'][d]:.0f}" for d in devs) + " |")
    if result.get("plots"):
        L += ["", "## Plots", ""] + [f"![{os.path.splitext(f)[0]}]({f})" for f in result["plots"]]
    return "\n".join(L) + "\n"


def _short_source(s: str) -> str:
    return "replay" if s.startswith("replay") else ("native" if s == "native" else "native (random)")


def _fmt_load(v):
    return "-" if not v else "/".join(f"{x:.1f}" for x in v)


def plots(result: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [p for p in result["points"] if p["status"] == "ok"]
    methods = list(dict.fromkeys(p["method"] for p in ok))
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    prompts = list(dict.fromkeys(p["prompt_kind"] for p in ok))
    files = []
    title = f"{result['machine']['name']}\n{result['weights']}"

    # throughput vs generation length (smallest batch)
    fig, axes = plt.subplots(1, max(1, len(prompts)), figsize=(6 * max(1, len(prompts)), 4.5), squeeze=False)
    for ax, pr in zip(axes[0], prompts):
        pts = [p for p in ok if p["prompt_kind"] == pr]
        b0 = min(p["batch"] for p in pts)
        for m in methods:
            s = sorted((p["gen_length"], p["tok_s"]) for p in pts if p["method"] == m and p["batch"] == b0)
            if s:
                ax.plot(*zip(*s), "o-", color=colors[m], label=m)
        ax.set(xscale="log", yscale="log", xlabel="generation length (tokens)", ylabel="tokens/s",
               title=f"{pr} prompt, batch {b0}")
        _log2_ticks(ax, sorted({p["gen_length"] for p in pts}))
        _grid_legend(ax)
    files.append(_finish(fig, title, out_dir, "throughput_vs_gen_length.png"))

    # throughput vs batch size (the generation length with the most batch sizes)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    by_gen: dict = {}
    for p in ok:
        by_gen.setdefault((p["prompt_kind"], p["gen_length"]), set()).add(p["batch"])
    (pr, g), _ = max(by_gen.items(), key=lambda kv: (len(kv[1]), -kv[0][1]))
    for m in methods:
        s = sorted((p["batch"], p["tok_s"]) for p in ok if p["method"] == m and p["gen_length"] == g
                   and p["prompt_kind"] == pr)
        if s:
            ax.plot(*zip(*s), "o-", color=colors[m], label=m)
    for p in result["points"]:
        if p["status"] == "oom" and p["gen_length"] == g and p["prompt_kind"] == pr:
            ax.axvline(p["batch"], color=colors.get(p["method"], "k"), ls=":", alpha=0.6)
            ax.text(p["batch"], ax.get_ylim()[1], f" OOM {p['method']}", rotation=90, va="top", fontsize=7)
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="tokens/s (all rows)",
           title=f"{pr} prompt, generation length {g}")
    _log2_ticks(ax, sorted({p["batch"] for p in ok}))
    _grid_legend(ax)
    files.append(_finish(fig, title, out_dir, "throughput_vs_batch.png"))

    # roofline
    pk = result["peak"]
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    ai = np.array([p["arith_intensity"] for p in ok])
    lo, hi = min(ai.min(), pk["flops"] / pk["bw"]) / 3, max(ai.max(), pk["flops"] / pk["bw"]) * 3
    xs = np.logspace(math.log10(lo), math.log10(hi), 200)
    ax.plot(xs, np.minimum(pk["flops"], xs * pk["bw"]), "k-", lw=1.5, label=f"roofline: {result['peak_name']}")
    ridge = pk["flops"] / pk["bw"]
    ax.axvline(ridge, color="k", ls="--", lw=0.8)
    ax.text(ridge, pk["flops"] * 1.15, f" ridge {ridge:.1f} FLOP/B", fontsize=7)
    for m in methods:
        pts = [p for p in ok if p["method"] == m]
        ax.scatter([p["arith_intensity"] for p in pts], [p["achieved_flops_s"] for p in pts], color=colors[m],
                   s=[18 + 10 * math.log2(p["batch"]) for p in pts], label=m, alpha=0.8)
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP / byte, analytic)",
           ylabel="achieved FLOP/s", title="achieved vs attainable (marker size ~ log batch)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    files.append(_finish(fig, title, out_dir, "roofline.png"))
    plt.close("all")
    return files


def _log2_ticks(ax, values):
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    ax.xaxis.set_major_locator(FixedLocator(values))
    ax.set_xticklabels([str(v) for v in values])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _grid_legend(ax):
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _finish(fig, title, out_dir, name):
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, out_dir, name)


def _save(fig, out_dir, name):
    path = os.path.join(out_dir, name)
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)
    return name


def write_outputs(result: dict, out_dir: str, make_plots: bool = True) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    ok = [p for p in result["points"] if p["status"] == "ok"]
    result["plots"] = plots(result, out_dir) if (make_plots and ok) else []
    paths = {"json": os.path.join(out_dir, "bench.json"), "markdown": os.path.join(out_dir, "summary.md")}
    for key, text in (("json", json.dumps(result, indent=1, default=_json_default)), ("markdown", markdown(result))):
        with open(paths[key] + ".tmp", "w") as f:
            f.write(text)
        os.replace(paths[key] + ".tmp", paths[key])
    paths["plots"] = [os.path.join(out_dir, f) for f in result["plots"]]
    return paths


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
