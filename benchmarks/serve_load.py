"""Serving load benchmark: Poisson arrivals against a running `dllm-jax serve`, three batching modes, two schedules.

    python benchmarks/serve_load.py [--requests 32] [--rates vanilla=1,2,4,8 --rates fastdllm_dual=4,8,16,32]
                                    [--slots 8] [--out docs/benchmarks/serving]

For each schedule (one token per step: `vanilla`; threshold + dual cache: `fastdllm_dual` threshold 0.9) and each
mode — continuous batching (`--slots N`), one request at a time (`--slots 1`), static batches of N (`--slots N
--batching static`: a batch is refilled only when all its requests finished) — a server is started on a free port
with the embedded model (the three servers run side by side and take turns at each rate), and for each rate the same requests (chat prompts, max_tokens 64, greedy) are sent with
Poisson arrivals, streamed. Per run: requests/s and generated tokens/s over the span from the first arrival to the
last completion, p50/p99 latency and time to first token (first streamed content), NFE per token from /metrics.
Every request's token ids must be the same in all modes (the server's exactness), else the script fails.

Counting rule: generated tokens = completion tokens up to (excluding) the first EOS, as the server reports them.
Writes OUT.json, OUT.md (table) and OUT.png (plot). The machine's load average is recorded before and after each run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time

import numpy as np

SCHEDULES = {"vanilla": [], "fastdllm_dual": ["--set", "threshold=0.9"]}
LABEL = {"vanilla": "one token per step (vanilla, block 32)", "fastdllm_dual": "threshold 0.9 + dual cache (fastdllm_dual)"}
COLORS = {"continuous": "C0", "one-at-a-time": "C1", "static": "C2"}
MODES = {"continuous": lambda n: ["--slots", str(n)], "one-at-a-time": lambda n: ["--slots", "1"],
         "static": lambda n: ["--slots", str(n), "--batching", "static"]}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, log_path):
    import httpx

    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
           "DLLM_JAX_CACHE_DIR": os.environ.get("DLLM_JAX_CACHE_DIR", "/tmp/dllm_serve_load_xla_cache")}
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "dllm_jax.cli", "serve", "--port", str(port),
                             "--prompt-buckets", "32", "--gen-buckets", "64", "--max-queue", "1024", *args],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); see {log_path}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if time.time() - t0 > 600:
            proc.kill()
            raise RuntimeError("server did not start")
        time.sleep(0.5)


def metrics(base) -> dict:
    import httpx

    out = {}
    for line in httpx.get(base + "/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


async def one(client, base, prompt, t_send, t0):
    await asyncio.sleep(max(0.0, t0 + t_send - time.perf_counter()))
    start = time.perf_counter()
    body = {"model": "dllm-jax-default", "messages": [{"role": "user", "content": prompt}], "max_tokens": 64,
            "stream": True, "seed": 0}
    ttft, ids = None, None
    async with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ch = json.loads(line[6:])
            if ttft is None and ch["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - start
            if "dllm" in ch:
                ids = ch["dllm"]["token_ids"]
    end = time.perf_counter()
    return {"start": start - t0, "end": end - t0, "latency": end - start, "ttft": ttft if ttft is not None else
            end - start, "ids": ids}


async def run_rate(base, prompts, rate, seed):
    import httpx

    gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(prompts))
    sends = np.cumsum(gaps) - gaps[0]
    limits = httpx.Limits(max_connections=len(prompts) + 8, max_keepalive_connections=len(prompts) + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(client, base, p, float(s), t0) for p, s in zip(prompts, sends)))
    return res


def summarize(res):
    span = max(r["end"] for r in res) - min(r["start"] for r in res)
    toks = sum(len(r["ids"]) for r in res)
    lat = np.array([r["latency"] for r in res])
    ttft = np.array([r["ttft"] for r in res])
    return {"requests": len(res), "span_s": span, "req_per_s": len(res) / span, "tokens": toks,
            "tok_per_s": toks / span, "lat_p50": float(np.percentile(lat, 50)), "lat_p99": float(np.percentile(lat, 99)),
            "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p99": float(np.percentile(ttft, 99))}


def prompts_for(n, seed=0):
    rng = np.random.default_rng(seed)
    kinds = [lambda a, b: f"What is {a}+{b}?", lambda a, b: f"What is {a}*{b}?",
             lambda a, b: f"Sort: {a} {b} {a + b}", lambda a, b: f"Reverse the word {'abcdefgh'[a % 5:]}"]
    return [kinds[i % len(kinds)](int(rng.integers(1, 99)), int(rng.integers(1, 99))) for i in range(n)]


def parse_rates(items):
    out = {"vanilla": [1, 2, 4, 8], "fastdllm_dual": [4, 8, 16, 32]}
    for it in items or []:
        k, _, v = it.partition("=")
        out[k] = [float(x) for x in v.split(",")]
    return out


def write_outputs(rows, meta, out):
    with open(out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"| schedule | mode | offered req/s | req/s | tokens/s | p50 latency s | p99 latency s | p50 TTFT s | "
             f"p99 TTFT s | NFE/token | load avg |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['schedule']} | {r['mode']} | {r['rate']:g} | {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} | "
                     f"{r['lat_p50']:.2f} | {r['lat_p99']:.2f} | {r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | "
                     f"{r['nfe_per_token']:.2f} | {r['load_before']:.1f} / {r['load_after']:.1f} |")
    groups = {}
    for r in rows:
        groups.setdefault((r["schedule"], r["rate"]), {}).setdefault(r["mode"], []).append(r)
    lines += ["", "Median over repeats (ratio: requests/s over one-at-a-time's at the same offered rate):", "",
              "| schedule | offered req/s | mode | runs | req/s (min-max) | tokens/s | p50 latency s | p99 latency s | "
              "p50 TTFT s | ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (sched, rate), by_mode in groups.items():
        base = by_mode.get("one-at-a-time")
        base_rps = float(np.median([r["req_per_s"] for r in base])) if base else None
        for mode, rs in by_mode.items():
            med = {k: float(np.median([r[k] for r in rs])) for k in ("req_per_s", "tok_per_s", "lat_p50", "lat_p99",
                                                                      "ttft_p50")}
            rps = [r["req_per_s"] for r in rs]
            ratio = f"{med['req_per_s'] / base_rps:.2f}x" if base_rps else "-"
            lines.append(f"| {sched} | {rate:g} | {mode} | {len(rs)} | {med['req_per_s']:.2f} ({min(rps):.2f}-"
                         f"{max(rps):.2f}) | {med['tok_per_s']:.1f} | {med['lat_p50']:.2f} | {med['lat_p99']:.2f} | "
                         f"{med['ttft_p50']:.2f} | {ratio} |")
    with open(out + ".table.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    scheds = list(dict.fromkeys(r["schedule"] for r in rows))
    fig, axes = plt.subplots(2, len(scheds), figsize=(5.5 * len(scheds), 7), squeeze=False)
    for j, s in enumerate(scheds):
        for mode in MODES:
            pts = [r for r in rows if r["schedule"] == s and r["mode"] == mode]
            if not pts:
                continue
            x, col = [p["rate"] for p in pts], COLORS.get(mode)
            axes[0, j].plot(x, [p["req_per_s"] for p in pts], "o-", label=mode, color=col)
            axes[1, j].plot(x, [p["lat_p50"] for p in pts], "o-", label=f"{mode} p50", color=col)
            axes[1, j].plot(x, [p["lat_p99"] for p in pts], "x--", label=f"{mode} p99", alpha=0.6, color=col)
        axes[0, j].set_title(LABEL.get(s, s), fontsize=10)
        axes[0, j].set_ylabel("completed requests/s")
        axes[1, j].set_ylabel("latency s")
        for ax in axes[:, j]:
            ax.set_xlabel("offered load (Poisson arrivals, requests/s)")
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
        axes[1, j].set_yscale("log")
        axes[0, j].legend(fontsize=8)
        axes[1, j].legend(fontsize=7)
    fig.suptitle(f"dllm-jax serve, embedded model, {meta['machine']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=110)
    plt.close(fig)


def batch_sweep(sizes=(1, 2, 4, 8), gen_length=64):
    """What batching buys on this machine, without the server: `generate` on B identical-shape chat prompts, time
    per loop iteration and requests/s (best of 3 after a warm-up)."""
    import dllm_jax
    from dllm_jax.cli import default_model_path
    from dllm_jax.generate import generate
    from dllm_jax.presets import make_schedule
    from dllm_jax.tokenizer import CharTokenizer

    model, tok = dllm_jax.load(default_model_path()), CharTokenizer()
    prompts = [[tok.bos_id, tok.user_id, *tok.encode(p), tok.eot_id, tok.assistant_id] for p in prompts_for(max(sizes))]
    out = []
    for sched_name, extra in (("vanilla", {}), ("fastdllm_dual", {"threshold": 0.9})):
        sched = make_schedule(sched_name, gen_length, model.cfg, **extra)
        for b in sizes:
            generate(model, prompts[:b], gen_length=gen_length, schedule=sched)
            runs = [generate(model, prompts[:b], gen_length=gen_length, schedule=sched) for _ in range(3)]
            best = min(runs, key=lambda o: o.run_time_s)
            row = {"schedule": sched_name, "batch": b, "run_s": best.run_time_s, "iterations": best.loop_iterations,
                   "ms_per_iteration": 1000 * best.run_time_s / best.loop_iterations,
                   "req_per_s": b / best.run_time_s, "load": os.getloadavg()[0]}
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


def slot_sweep(n_requests=32, n_slots=8, chunk=8, gen_length=64, refresh=(1, 2, 4)):
    """The server's engine without HTTP: `n_requests` chat prompts through a SlotGroup (refilled between chunks, as
    the batcher does) against one slot, for each schedule, with the refresh sub-batch sizes `refresh`; best of 2
    after a warm-up. Tokens are identical in every mode (the tests check it); this measures requests/s only."""
    import dllm_jax
    from dllm_jax.cli import default_model_path
    from dllm_jax.presets import make_schedule
    from dllm_jax.serve.slots import SlotGroup
    from dllm_jax.tokenizer import CharTokenizer

    model, tok = dllm_jax.load(default_model_path()), CharTokenizer()
    prompts = [[tok.bos_id, tok.user_id, *tok.encode(p), tok.eot_id, tok.assistant_id][-32:]
               for p in prompts_for(n_requests)]

    def run(sched, slots):
        grp = SlotGroup(model, sched, 32, gen_length, slots)

        def once():
            waiting, nfe, t = list(range(n_requests)), 0, time.perf_counter()
            while waiting or grp.busy():
                for b in grp.free_slots():
                    if waiting:
                        r = waiting.pop(0)
                        grp.load(b, prompts[r], 0, r)
                for b, v in enumerate(grp.step(chunk, stop_on_finish=bool(waiting))):
                    if grp.owner[b] is not None and not v.active:
                        nfe += v.nfe
                        grp.clear(b)
            return time.perf_counter() - t, nfe

        once()
        return min(once() for _ in range(2))

    out = []
    for name, kw in (("fastdllm_dual", {"threshold": 0.9}), ("vanilla", {})):
        base = make_schedule(name, gen_length, model.cfg, **kw)
        modes = [("one-at-a-time", base, 1), (f"{n_slots} slots, refresh all", base, n_slots)]
        if base.cache.has_cache:
            modes += [(f"{n_slots} slots, refresh_rows {k}", base.replace(refresh_rows=k), n_slots) for k in refresh]
        for label, sched, slots in modes:
            secs, nfe = run(sched, slots)
            row = {"schedule": name, "mode": label, "run_s": secs, "req_per_s": n_requests / secs, "nfe": nfe,
                   "load": os.getloadavg()[0]}
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rates", action="append", metavar="SCHEDULE=R1,R2,...")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1, help="runs per (rate, mode), interleaved; the summary takes "
                                                          "the median")
    ap.add_argument("--schedules", default="vanilla,fastdllm_dual")
    ap.add_argument("--modes", default="continuous,one-at-a-time,static")
    ap.add_argument("--out", default="docs/benchmarks/serving")
    ap.add_argument("--sweep-only", action="store_true", help="only the batch-size sweep (OUT.sweep.json)")
    ap.add_argument("--slots-only", action="store_true",
                    help="only the slot-level comparison without HTTP (OUT.slots.json): one slot vs --slots slots, "
                         "refresh sub-batch sizes")
    ap.add_argument("--replot", action="store_true", help="redraw OUT.table.md and OUT.png from OUT.json")
    a = ap.parse_args(argv)
    if a.replot:
        with open(a.out + ".json") as f:
            d = json.load(f)
        write_outputs(d["rows"], d["meta"], a.out)
        return 0
    if a.sweep_only:
        with open(a.out + ".sweep.json", "w") as f:
            json.dump(batch_sweep(), f, indent=1)
        return 0
    if a.slots_only:
        rows = slot_sweep(n_requests=a.requests, n_slots=a.slots)
        with open(a.out + ".slots.json", "w") as f:
            json.dump(rows, f, indent=1)
        return 0
    rates = parse_rates(a.rates)
    prompts = prompts_for(a.requests)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
            "python": platform.python_version(), "slots": a.slots, "requests_per_run": a.requests,
            "max_tokens": 64, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import jax

        meta["jax"] = jax.__version__
    except ImportError:
        pass
    rows, ids_by = [], {}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    modes = a.modes.split(",")
    for sched in a.schedules.split(","):
        # the servers of all modes are up together and the modes take turns at each rate, so a change in the
        # machine's load (shared with other jobs) hits every mode alike; an idle server costs nothing
        servers = {}
        try:
            for mode in modes:
                args = ["--schedule", sched, *SCHEDULES[sched], *MODES[mode](a.slots)]
                servers[mode] = start_server(args, f"/tmp/serve_load_{sched}_{mode}.log")
                asyncio.run(run_rate(servers[mode][1], prompts[:4], 100.0, 99))  # warm the HTTP path
            for k, rate in enumerate(rates[sched] * a.repeats):
                for mode in modes:
                    base = servers[mode][1]
                    m0 = metrics(base)
                    load0 = os.getloadavg()[0]
                    res = asyncio.run(run_rate(base, prompts, rate, seed=k % len(rates[sched])))
                    m1 = metrics(base)
                    s = summarize(res)
                    fw = m1["dllm_forwards_total"] - m0["dllm_forwards_total"]
                    tk = m1["dllm_generated_tokens_total"] - m0["dllm_generated_tokens_total"]
                    row = {"schedule": sched, "mode": mode, "rate": rate, "repeat": k // len(rates[sched]), **s, "nfe_per_token": fw / max(tk, 1),
                           "load_before": load0, "load_after": os.getloadavg()[0]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    for i, r in enumerate(res):
                        prev = ids_by.setdefault((sched, i), r["ids"])
                        if prev != r["ids"]:
                            raise SystemExit(f"{sched} request {i}: tokens differ between modes ({mode})")
                    write_outputs(sorted(rows, key=lambda r: (r["schedule"], modes.index(r["mode"]), r["rate"])),
                                  meta, a.out)
        finally:
            for proc, _ in servers.values():
                proc.send_signal(signal.SIGTERM)
            for proc, _ in servers.values():
                proc.wait(120)
    rows.sort(key=lambda r: (r["schedule"], modes.index(r["mode"]), r["rate"]))
    write_outputs(rows, meta, a.out)
    print(f"wrote {a.out}.json, {a.out}.table.md, {a.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
