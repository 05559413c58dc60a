"""`dllm-jax bench`: how efficient are diffusion LMs? Throughput, forwards and roofline of every schedule against an
autoregressive and a block-diffusion baseline on the same engine and network shape.

    dllm-jax bench --preset quick                                   # embedded default model, ~5 min on 2 CPU cores
    dllm-jax bench --model DIR --gen-lengths 64,256,1024 --batch-sizes 1,8,64
    dllm-jax bench --random-weights --shape llada-8b --dtype bfloat16 --preset full

Grid axes: generation length x prompt length (short ~40 / long ~900 tokens) x batch size x schedule. Batch sizes run
in increasing order per (prompt, generation length, schedule); the first out-of-memory is recorded as a point and the
larger batches of that group are skipped.

Schedules (`--schedules`, comma-separated): vanilla (one token per forward, blocks of 32, no cache), dual (+ Fast-dLLM
dual cache), threshold (+ threshold parallel decoding, no cache), dual_threshold (both), ar (the same network run
causally, KV cache, greedy one token per forward), bd / bd_threshold (block-causal attention over blocks of 32, block
KV cache, one token per forward / threshold), or any preset name of `dllm-jax presets`.

Counting rules (see docs/benchmarks/README.md): tokens/s = batch x gen_length generated tokens / wall time of the
compiled program (compile time excluded and reported apart; best of --repeats runs after a warm-up run). EOS early
stop is off, so every method generates exactly gen_length tokens per row and AR and diffusion are compared at the
same length; tokens up to the first EOS are reported beside it (tok_s_to_eos). NFE = forwards per row; TPF = tokens
per forward = gen_length / mean NFE; ms/forward = wall time / loop iterations (a batched forward counts once).

FLOPs and bytes are analytic, from the config and the executed shapes (static shapes: a forward computes T queries
against all S = P + G key slots, masks included), per loop iteration: a full forward (T = S), a cached window forward
(T = window width), or both when rows of a batch disagree. Bytes are an ideal-traffic model: weights read once per
forward, per layer K/V of the T computed positions written and of the S attended positions read once, embedding rows
read, float32 logits written once; activations and attention scores stay on chip (flash-style). Roofline time of a
forward = max(FLOPs / peak, bytes / bandwidth).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import json
import math
import os
import platform
import re
import sys
import time
from typing import Any, Callable

import numpy as np

# --------------------------------------------------------------------------------------------------------------
# Shapes, peaks

SMALL = dict(family="llada", rope_theta=10000.0, norm_eps=1e-5, qkv_bias=False, max_seq_len=4096)

SHAPES: dict[str, dict] = {
    # ~92M parameters: 10 layers of d_model 640 (SwiGLU 1728), vocabulary 32768
    "100m": dict(vocab_size=32768, d_model=640, n_layers=10, n_heads=10, n_kv_heads=10, head_dim=64, mlp_hidden=1728),
    "150m": dict(vocab_size=32768, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, head_dim=64, mlp_hidden=2048),
    "500m": dict(vocab_size=32768, d_model=1280, n_layers=20, n_heads=20, n_kv_heads=20, head_dim=64,
                 mlp_hidden=3456),
    # GSAI-ML/LLaDA-8B-Instruct config.json
    "llada-8b": dict(family="llada", vocab_size=126464, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                     head_dim=128, mlp_hidden=12288, rope_theta=500000.0, norm_eps=1e-5, qkv_bias=False,
                     mask_token_id=126336, eos_token_id=126081, pad_token_id=126081, max_seq_len=4096),
    # Dream-org/Dream-v0-Instruct-7B config.json (Qwen2.5-7B body)
    "dream-7b": dict(family="dream", vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                     head_dim=128, mlp_hidden=18944, rope_theta=1e6, norm_eps=1e-6, qkv_bias=True,
                     mask_token_id=151666, eos_token_id=151643, pad_token_id=151643, max_seq_len=131072,
                     logit_shift=True),
}

# Dense peak compute (bf16 tensor units, no sparsity) and memory bandwidth from the vendors' data sheets.
PEAKS: dict[str, dict] = {
    "A100 SXM 80GB": {"flops": 312e12, "bw": 2.039e12, "dtype": "bfloat16"},
    "H100 SXM": {"flops": 989e12, "bw": 3.35e12, "dtype": "bfloat16"},
    "H200 SXM": {"flops": 989e12, "bw": 4.8e12, "dtype": "bfloat16"},
    "TPU v5e": {"flops": 197e12, "bw": 819e9, "dtype": "bfloat16"},
    "TPU v6e": {"flops": 918e12, "bw": 1640e9, "dtype": "bfloat16"},
}
_KIND_TO_PEAK = (("H200", "H200 SXM"), ("H100", "H100 SXM"), ("A100", "A100 SXM 80GB"), ("v5 lite", "TPU v5e"),
                 ("v5e", "TPU v5e"), ("v6", "TPU v6e"))

PROMPT_KINDS = {"short": 40, "long": 900}
DEFAULT_SCHEDULES = ("vanilla", "dual", "threshold", "dual_threshold", "ar", "bd")

PRESETS: dict[str, dict] = {
    # the CI-sized sweep: the embedded default model unless weights are given
    "quick": dict(gen_lengths=[64, 128], prompts=["short"], batch_sizes=[1, 4], schedules=list(DEFAULT_SCHEDULES),
                  repeats=1, grid="star", base_gen=64),
    # CPU runs committed under docs/benchmarks
    "cpu": dict(gen_lengths=[64, 128, 256, 512], prompts=["short", "long"], batch_sizes=[1, 4, 16],
                schedules=list(DEFAULT_SCHEDULES) + ["bd_threshold"], repeats=2, grid="star"),
    # accelerator sweep
    "full": dict(gen_lengths=[64, 128, 256, 512, 1024, 2048], prompts=["short", "long"], base_gen=256,
                 batch_sizes=[1, 2, 4, 8, 16, 32, 64], schedules=list(DEFAULT_SCHEDULES) + ["bd_threshold"],
                 repeats=3, grid="star"),
}


def shape_config(name: str):
    """A ModelConfig for a named shape (random-weight benchmarks)."""
    from dllm_jax.models.config import ModelConfig

    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; available: {', '.join(SHAPES)}")
    d = dict(SHAPES[name])
    if "family" not in d:
        d = {**SMALL, **d}
        v = d["vocab_size"]
        d.update(mask_token_id=v - 1, eos_token_id=v - 2, pad_token_id=v - 2)
    return ModelConfig(**d)


def param_count(cfg) -> int:
    D, L, H, K, hd, F, V = (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_hidden,
                            cfg.vocab_size)
    per_layer = D * H * hd + 2 * D * K * hd + H * hd * D + 3 * D * F + 2 * D + ((H + 2 * K) * hd if cfg.qkv_bias else 0)
    return L * per_layer + D + 2 * V * D


# --------------------------------------------------------------------------------------------------------------
# Analytic cost model

@dataclasses.dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float

    def __add__(self, o: "Cost") -> "Cost":
        return Cost(self.flops + o.flops, self.bytes + o.bytes)

    def time(self, peak_flops: float, bw: float) -> float:
        """Roofline time: the forward is bound by compute or by memory traffic, whichever is slower."""
        return max(self.flops / peak_flops, self.bytes / bw)


def forward_cost(cfg, batch: int, T: int, S: int, wbytes: int = 4, kvbytes: int | None = None,
                 head_rows: float | None = None) -> Cost:
    """FLOPs and ideal bytes of one forward of `batch` rows computing T queries over S key slots (module doc), the
    LM head on `head_rows` of them (default all T; the engine computes it only where a schedule reads).

    FLOPs: 2 per multiply-add of every matmul (q/k/v/o projections, SwiGLU MLP, lm head) + QK^T and PV
    (4 T S H hd per layer); norms, RoPE, softmax and the argmax/confidence reduction are not counted."""
    kvbytes = wbytes if kvbytes is None else kvbytes
    Th = T if head_rows is None else head_rows
    D, L, H, K, hd, F, V = (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_hidden,
                            cfg.vocab_size)
    lin = 2 * (D * H * hd + 2 * D * K * hd + H * hd * D + 3 * D * F)
    flops = batch * (L * (T * lin + 4 * T * S * H * hd) + Th * 2 * D * V)
    weights = (param_count(cfg) - V * D) * wbytes  # every weight but the embedding table
    by = (weights + batch * T * D * wbytes  # embedding rows gathered
          + L * batch * 2 * K * hd * (T + S) * kvbytes  # K/V written (T) and read (S)
          + batch * Th * V * 4)  # float32 logits
    return Cost(float(flops), float(by))


def iteration_kinds(trace: dict | None, nfe, iterations: int, has_cache: bool) -> dict:
    """Count loop iterations by the forward(s) they executed: full, window, or mixed (both: rows disagreed)."""
    if not has_cache or trace is None:
        return {"full": int(iterations), "window": 0, "mixed": 0}
    full = np.asarray(trace["full"])
    nfe = np.asarray(nfe)
    out = {"full": 0, "window": 0, "mixed": 0}
    B = full.shape[1]
    for it in range(int(iterations)):
        live = it < nfe
        f = full[min(it, full.shape[0] - 1)] & live
        if B == 1:
            out["full" if f[0] else "window"] += 1
        elif np.all(f | ~live):
            out["full"] += 1
        elif np.any(f):
            out["mixed"] += 1
        else:
            out["window"] += 1
    return out


def run_costs(cfg, batch: int, total_len: int, width: float, kinds: dict, cfg_scale: float = 0.0,
              wbytes: int = 4, head_full: float | None = None, head_window: float | None = None) -> dict:
    """Per-kind forward costs and run totals for a run whose iterations are counted in `kinds`. width: the cached
    forwards' query rows (their mean where the width varies: the costs are linear in it); head_full / head_window:
    the LM head's rows in a full / cached forward (default: all)."""
    fb = batch * (2 if cfg_scale > 0 else 1)
    full = forward_cost(cfg, fb, total_len, total_len, wbytes, head_rows=head_full)
    win = forward_cost(cfg, batch, width, total_len, wbytes,
                       head_rows=None if head_window is None else min(head_window, width))
    total = Cost(kinds["full"] * full.flops + kinds["window"] * win.flops + kinds["mixed"] * (full.flops + win.flops),
                 kinds["full"] * full.bytes + kinds["window"] * win.bytes + kinds["mixed"] * (full.bytes + win.bytes))
    return {"full": full, "window": win, "total": total, "kinds": kinds}


def mean_window_width(trace: dict | None, nfe, iterations: int, widths: tuple, total_len: int) -> float:
    """Mean query rows of the cached forwards of a run: each takes the narrowest of `widths` that holds every live
    row's [s, L) (a prefix cache's suffix; with one width, that width)."""
    if len(widths) == 1 or trace is None:
        return float(widths[-1])
    full, s = np.asarray(trace["full"]), np.asarray(trace["s"])
    nfe, ws, used = np.asarray(nfe), np.asarray(widths), []
    for it in range(min(int(iterations), full.shape[0])):
        live = it < nfe
        if not np.any(live & ~full[it]):
            continue
        need = int(np.max(np.where(live, total_len - s[it], 0)))
        used.append(int(ws[np.searchsorted(ws, need)]) if need <= ws[-1] else int(ws[-1]))
    return float(np.mean(used)) if used else float(widths[-1])


def roofline_time(costs: dict, peak_flops: float, bw: float) -> float:
    k = costs["kinds"]
    tf, tw = costs["full"].time(peak_flops, bw), costs["window"].time(peak_flops, bw)
    return k["full"] * tf + k["window"] * tw + k["mixed"] * (tf + tw)


# --------------------------------------------------------------------------------------------------------------
# Machine

def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import jax

    dev = jax.devices()[0]
    info = {"platform": dev.platform, "device_kind": getattr(dev, "device_kind", str(dev)),
            "device_count": jax.device_count(), "jax": jax.__version__, "python": platform.python_version(),
            "host_cpu": _cpu_name(), "host_cores": os.cpu_count()}
    try:
        info["loadavg_start"] = list(os.getloadavg())
    except OSError:
        pass
    if dev.platform == "cpu":
        info["name"] = f"CPU {info['host_cpu']} x{os.cpu_count()} cores"
        info["slug"] = f"cpu-{os.cpu_count()}core"
    else:
        info["name"] = f"{info['device_kind']} ({dev.platform})"
        info["slug"] = re.sub(r"[^a-z0-9]+", "-", info["device_kind"].lower()).strip("-")
    return info


def measure_peaks(dtype: str = "float32", n: int = 2048, mib: int = 256, repeats: int = 5) -> dict:
    """Measure this device once: a jitted n x n matmul (FLOP/s) and a copy of `mib` MiB (bytes/s, read + write
    counted; a host memcpy on CPU). Best of `repeats`."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    a = jnp.ones((n, n), dt)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        mm(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    flops = 2.0 * n ** 3 / best
    if jax.default_backend() == "cpu":
        # memcpy into a preallocated buffer (an XLA op would also time the page faults of a fresh output)
        src = np.ones(mib * 2 ** 20 // 4, np.float32)
        dst = np.empty_like(src)
        np.copyto(dst, src)
        best_c = math.inf
        for _ in range(repeats):
            t = time.perf_counter()
            np.copyto(dst, src)
            best_c = min(best_c, time.perf_counter() - t)
        bw = 2.0 * src.nbytes / best_c
        del src, dst
    else:
        m = jnp.ones((mib * 2 ** 20 // 4,), jnp.float32)
        cp = jax.jit(lambda x: x + 1.0)
        cp(m).block_until_ready()
        best_c = math.inf
        for _ in range(repeats):
            t = time.perf_counter()
            cp(m).block_until_ready()
            best_c = min(best_c, time.perf_counter() - t)
        bw = 2.0 * m.size * 4 / best_c
        del m
    del a
    return {"flops": flops, "bw": bw, "dtype": str(dt), "how": f"measured: {n}x{n} {dt} matmul, {mib} MiB copy"}


def device_peak(info: dict, dtype: str, measure: Callable = measure_peaks) -> tuple[str, dict]:
    """Peak of the run's device: the table entry for a known accelerator, otherwise measured here."""
    if info["platform"] != "cpu":
        for key, name in _KIND_TO_PEAK:
            if key.lower() in info["device_kind"].lower():
                return name, PEAKS[name]
    return f"{info['name']} (measured)", measure(dtype)


def available_memory_bytes() -> float | None:
    import jax

    dev = jax.devices()[0]
    if dev.platform != "cpu":
        try:
            st = dev.memory_stats() or {}
            if "bytes_limit" in st:
                return float(st["bytes_limit"] - st.get("bytes_in_use", 0))
        except Exception:  # noqa: BLE001 - memory_stats is optional on some backends
            return None
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def memory_estimate(cfg, batch: int, total_len: int, has_cache: bool, wbytes: int, cfg_scale: float = 0.0) -> float:
    """Rough peak bytes of a run with the reference attention (scores materialised per layer), for OOM prediction."""
    fb = batch * (2 if cfg_scale > 0 else 1)
    kv = 2 * cfg.n_layers * batch * total_len * cfg.n_kv_heads * cfg.head_dim * wbytes
    scores = 2 * fb * cfg.n_heads * total_len * total_len * 4
    logits = fb * total_len * cfg.vocab_size * 4
    acts = fb * total_len * (4 * cfg.d_model + 2 * cfg.mlp_hidden) * 4
    return param_count(cfg) * wbytes + (2 if has_cache else 1) * kv + scores + logits + acts


def is_oom(e: BaseException) -> bool:
    msg = str(e)
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()


# --------------------------------------------------------------------------------------------------------------
# Methods: (model config variant, schedule) per generation length

@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    build: Callable  # (cfg, gen_length) -> (cfg_variant, Schedule)
    attention: str


def _preset_kwargs(name: str, block_length: int, threshold: float, extra: dict) -> dict:
    from dllm_jax.presets import PRESETS as P

    if name not in P:
        raise ValueError(f"unknown schedule {name!r}: use one of {', '.join(DEFAULT_SCHEDULES + ('bd_threshold',))} "
                         f"or a preset name ({', '.join(sorted(P))})")
    params = inspect.signature(P[name]).parameters
    kw = {}
    if "block_length" in params:
        kw["block_length"] = block_length
    if "threshold" in params:
        kw["threshold"] = threshold
    kw.update(extra)
    return kw


def make_method(name: str, block_length: int = 32, threshold: float = 0.9, extra: dict | None = None) -> Method:
    from dllm_jax.engine.ar import ar_config, ar_schedule, block_config, block_diffusion_schedule
    from dllm_jax.presets import make_schedule

    extra = extra or {}

    def bl(G):
        return min(block_length, G)

    if name == "vanilla":
        return Method(name, lambda c, G: (c, make_schedule("vanilla", G, c, block_length=bl(G))), "bidirectional")
    if name == "dual":
        return Method(name, lambda c, G: (c, make_schedule("fastdllm_dual", G, c, block_length=bl(G), steps=G)),
                      "bidirectional")
    if name == "threshold":
        return Method(name, lambda c, G: (c, make_schedule("fastdllm", G, c, block_length=bl(G),
                                                           threshold=threshold)), "bidirectional")
    if name == "dual_threshold":
        return Method(name, lambda c, G: (c, make_schedule("fastdllm_dual", G, c, block_length=bl(G),
                                                           threshold=threshold)), "bidirectional")
    if name == "ar":
        return Method(name, lambda c, G: (ar_config(c), ar_schedule(G)), "causal")
    if name in ("bd", "bd_threshold"):
        th = threshold if name == "bd_threshold" else None
        return Method(name, lambda c, G: (block_config(c, bl(G)), block_diffusion_schedule(G, bl(G), threshold=th)),
                      f"block-causal({block_length})")
    kw = _preset_kwargs(name, block_length, threshold, extra)
    return Method(name, lambda c, G: (c, make_schedule(name, G, c, **{**kw, **(
        {"block_length": bl(G)} if "block_length" in kw else {})})), "bidirectional")


def data_dependent(sched) -> bool:
    """Whether the number of tokens committed per forward depends on the logits (then random weights would give an
    unrealistic NFE pattern and the benchmark replays a recorded one)."""
    from dllm_jax.engine.acceptance import DreamQuota, TopKQuota

    return not isinstance(sched.accept, (TopKQuota, DreamQuota))


# --------------------------------------------------------------------------------------------------------------
# Running one point

def task_prompts(n_rows: int, length: int, seed: int) -> list[list[int]]:
    """`n_rows` held-out `sort` prompts of the task suite, chat-formatted with the embedded character tokenizer (41-61
    tokens): real prompts for the embedded model, whose decode on random ids is degenerate (EOS at once)."""
    from dllm_jax import tasks
    from dllm_jax.generate import bucket_length
    from dllm_jax.tokenizer import CharTokenizer

    tok = CharTokenizer()
    rows = [tok.encode_prompt(e.prompt) for e in tasks.generate("sort", "heldout", n_rows, seed)]
    if max(map(len, rows)) > bucket_length(length):
        raise ValueError(f"task prompts ({max(map(len, rows))} tokens) do not fit the {length}-token prompt bucket "
                         f"({bucket_length(length)}); use --prompts short or --prompt-source random")
    return rows


def make_prompts(cfg, n_rows: int, length: int, seed: int, source: str = "random") -> list[list[int]]:
    """`n_rows` distinct prompts of exactly `length` random ordinary token ids (source="tasks": held-out task
    prompts of the embedded model, see task_prompts)."""
    if source == "tasks":
        return task_prompts(n_rows, length, seed)
    hi = min(cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.vocab_size)
    bos = cfg.get("bos_token_id")
    if isinstance(bos, int) and 0 < bos < hi:
        hi = bos
    lo = 0
    if hi < cfg.vocab_size // 2:  # special ids at the bottom of the vocabulary (the embedded char model: 0..6)
        specials = [cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id] + \
            [v for v in (cfg.get("bos_token_id"), cfg.get("eot_token_id")) if isinstance(v, int)]
        lo, hi = max(specials) + 1, cfg.vocab_size
    rng = np.random.default_rng(seed)
    return [rng.integers(lo, hi, length).tolist() for _ in range(n_rows)]


def _generate(model, prompts, gen_length, schedule):
    from dllm_jax.generate import generate

    return generate(model, prompts, gen_length=gen_length, schedule=schedule, trace=True)


def clear_compiled():
    import importlib

    import jax

    importlib.import_module("dllm_jax.generate")._COMPILED.clear()  # the module (the package exports the function)
    jax.clear_caches()
    gc.collect()


@dataclasses.dataclass
class Bench:
    model: Any  # dllm_jax Model
    weights: str  # "checkpoint:PATH" | "random:SHAPE"
    random_weights: bool
    peak_name: str
    peak: dict
    repeats: int = 2
    block_length: int = 32
    threshold: float = 0.9
    replay_model: Any = None
    replay_label: str | None = None
    prompt_source: str = "random"  # "tasks": held-out task prompts (embedded character model)
    replay_rows: int = 8
    seed: int = 0
    mem_limit: float | None = None
    extra: dict = dataclasses.field(default_factory=dict)
    _traces: dict = dataclasses.field(default_factory=dict)

    @property
    def wbytes(self) -> int:
        import jax

        return int(np.dtype(jax.tree.leaves(self.model.params)[0].dtype).itemsize)

    def _recorded(self, method: Method, G: int, p_len: int):
        """(trace, nfe) of the method on the replay model, `replay_rows` rows, cached."""
        from dllm_jax.model import Model

        key = (method.name, G, p_len)
        if key not in self._traces:
            rcfg, rsched = method.build(self.replay_model.cfg, G)
            rmodel = Model(rcfg, self.replay_model.params)
            prompts = make_prompts(rcfg, self.replay_rows, p_len, self.seed + 7)
            out = _generate(rmodel, prompts, G, rsched)
            self._traces[key] = (out.trace, out.nfe)
        return self._traces[key]

    def point(self, method: Method, G: int, prompt_kind: str, p_len: int, B: int) -> dict:
        from dllm_jax.engine.loop import head_width
        from dllm_jax.engine.replay import replay_schedule, replayable
        from dllm_jax.generate import bucket_length
        from dllm_jax.model import Model

        cfg, sched = method.build(self.model.cfg, G)
        P = bucket_length(p_len)
        L = P + G
        has_cache = sched.cache.has_cache
        W = sched.cache.width(_ctx(B, P, G, cfg), sched.window) if has_cache else L
        rec: dict = {"method": method.name, "schedule": sched.name, "attention": method.attention,
                     "cache": type(sched.cache).__name__, "window_width": int(W), "gen_length": G,
                     "prompt_kind": prompt_kind, "prompt_tokens": p_len, "prompt_bucket": P, "batch": B,
                     "weights": self.weights, "dtype": str(np.dtype(self._dtype())), "status": "ok"}
        nfe_source = "native"
        if self.random_weights and data_dependent(sched):
            if self.replay_model is not None and replayable(sched):
                trace, nfe = self._recorded(method, G, p_len)
                rows = min(B, self.replay_rows)
                sub = {k: np.asarray(v)[:, :rows] for k, v in trace.items()}
                sched = replay_schedule(sched, sub, np.asarray(nfe)[:rows])
                nfe_source = f"replay of {self.replay_label} ({rows} recorded rows, row b replays b % {rows})"
            else:
                why = "no replay model" if self.replay_model is None else "data-dependent window"
                nfe_source = f"native on random weights ({why}): NFE pattern not realistic"
        rec["nfe_source"] = nfe_source
        need = memory_estimate(cfg, B, L, has_cache, self.wbytes, sched.cfg_scale)
        rec["memory_estimate_bytes"] = need
        if self.mem_limit is not None and need > self.mem_limit:
            rec.update(status="oom", error=f"predicted: needs ~{need / 2**30:.1f} GiB, "
                                           f"{self.mem_limit / 2**30:.1f} GiB available (not run)")
            return rec
        model = Model(cfg, self.model.params)
        prompts = make_prompts(cfg, B, p_len, self.seed, self.prompt_source)
        try:
            first = _generate(model, prompts, G, sched)
            times = [_generate(model, prompts, G, sched).run_time_s for _ in range(self.repeats)]
        except Exception as e:  # noqa: BLE001 - OOM is recorded, anything else re-raised
            if not is_oom(e):
                raise
            clear_compiled()
            rec.update(status="oom", error=str(e).splitlines()[0][:300])
            return rec
        run_s = min(times) if times else first.run_time_s
        iters = int(first.loop_iterations)
        kinds = iteration_kinds(first.trace, first.nfe, iters, has_cache)
        ctx = _ctx(B, P, G, cfg)
        if has_cache:
            W = mean_window_width(first.trace, first.nfe, iters, sched.cache.widths(ctx, sched.window), L)
            rec["window_width_mean"] = W
        head = dict(head_full=head_width(sched, cfg, ctx, L), head_window=head_width(sched, cfg, ctx, L))
        rec["head_rows"] = head
        costs = run_costs(cfg, B, L, W, kinds, sched.cfg_scale, self.wbytes, **head)
        tot = costs["total"]
        tokens = B * G
        t_roof = roofline_time(costs, self.peak["flops"], self.peak["bw"])
        nfe_mean = float(np.mean(first.nfe))
        rec.update(
            nfe=[int(v) for v in first.nfe], nfe_mean=nfe_mean, nfe_max=int(np.max(first.nfe)),
            loop_iterations=iters, iteration_kinds=kinds, unfinished=int(np.sum(first.unfinished)),
            compile_s=first.compile_time_s, run_s=run_s, run_s_all=[first.run_time_s] + times,
            tokens=tokens, tokens_to_eos=int(np.sum(first.gen_lengths)),
            tok_s=tokens / run_s, tok_s_to_eos=float(np.sum(first.gen_lengths)) / run_s,
            tpf=G / nfe_mean, ms_per_forward=run_s / max(iters, 1) * 1e3,
            flops_total=tot.flops, bytes_total=tot.bytes,
            flops_per_forward=tot.flops / max(iters, 1), bytes_per_forward=tot.bytes / max(iters, 1),
            flops_per_token=tot.flops / tokens, bytes_per_token=tot.bytes / tokens,
            arith_intensity=tot.flops / tot.bytes,
            forward_full={"flops": costs["full"].flops, "bytes": costs["full"].bytes},
            forward_window={"flops": costs["window"].flops, "bytes": costs["window"].bytes},
            achieved_flops_s=tot.flops / run_s, roofline_time_s=t_roof,
            attainable_flops_s=tot.flops / t_roof, roofline_fraction=t_roof / run_s,
        )
        bf16 = run_costs(cfg, B, L, W, kinds, sched.cfg_scale, 2, **head)
        rec["bound_tok_s_bf16"] = {d: tokens / roofline_time(bf16, p["flops"], p["bw"]) for d, p in PEAKS.items()}
        return rec

    def _dtype(self):
        import jax

        return jax.tree.leaves(self.model.params)[0].dtype


def _ctx(B, P, G, cfg):
    from dllm_jax.engine.context import Ctx

    return Ctx(batch=B, prompt_len=P, gen_length=G, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id,
               pad_id=cfg.pad_token_id)


def project(points: list[dict], shape: str) -> list[dict]:
    """Roofline bounds (bf16, no measurement) of every ok point's forward pattern on another network shape."""
    cfg = shape_config(shape)
    out = []
    for p in points:
        if p.get("status") != "ok":
            continue
        L = p["prompt_bucket"] + p["gen_length"]
        costs = run_costs(cfg, p["batch"], L, p["window_width"], p["iteration_kinds"], 0.0, 2)
        out.append({k: p[k] for k in ("method", "gen_length", "prompt_kind", "batch", "nfe_mean", "tpf")} | {
            "shape": shape, "flops_per_token": costs["total"].flops / p["tokens"],
            "bytes_per_token": costs["total"].bytes / p["tokens"],
            "arith_intensity": costs["total"].flops / costs["total"].bytes,
            "bound_tok_s": {d: p["tokens"] / roofline_time(costs, pk["flops"], pk["bw"]) for d, pk in PEAKS.items()}})
    return out


# --------------------------------------------------------------------------------------------------------------
# Grid

def grid(gen_lengths, prompts, batch_sizes, schedules, kind: str = "product", base_gen: int | None = None):
    """Groups (prompt, gen, schedule) -> batch sizes ascending. product: every combination; star: every generation
    length x prompt at the smallest batch, plus the batch sweep at `base_gen` (default: the middle length) and the
    first prompt."""
    batches = sorted(set(batch_sizes))
    groups = []
    if kind == "product":
        for p in prompts:
            for g in gen_lengths:
                for s in schedules:
                    groups.append((p, g, s, batches))
    elif kind == "star":
        base_gen = base_gen or sorted(gen_lengths)[(len(gen_lengths) - 1) // 2]
        for p in prompts:
            for g in gen_lengths:
                for s in schedules:
                    bs = batches if (p == prompts[0] and g == base_gen) else batches[:1]
                    groups.append((p, g, s, bs))
    else:
        raise ValueError(f"grid must be 'product' or 'star', got {kind!r}")
    return groups


def run_grid(bench: Bench, groups, methods: dict, prompt_lengths: dict, progress: bool = True,
             on_point: Callable | None = None) -> list[dict]:
    from tqdm.auto import tqdm

    total = sum(len(bs) for *_, bs in groups)
    points = []
    bar = tqdm(total=total, disable=not progress, desc="bench", unit="pt", dynamic_ncols=True)
    for p, g, s, bs in groups:
        for i, b in enumerate(bs):
            bar.set_postfix_str(f"{s} G={g} {p} B={b}")
            rec = bench.point(methods[s], g, p, prompt_lengths[p], b)
            points.append(rec)
            bar.update(1)
            if on_point:
                on_point(rec)
            if rec["status"] == "oom":
                for b2 in bs[i + 1:]:
                    points.append({"method": s, "gen_length": g, "prompt_kind": p, "prompt_tokens": prompt_lengths[p],
                                   "batch": b2, "status": "skipped", "error": f"larger than the OOM batch {b}"})
                bar.update(len(bs) - i - 1)
                break
    bar.close()
    return points


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
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    files.append(_save(fig, out_dir, "throughput_vs_gen_length.png"))

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
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    files.append(_save(fig, out_dir, "throughput_vs_batch.png"))

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
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    files.append(_save(fig, out_dir, "roofline.png"))
    plt.close("all")
    return files


def _log2_ticks(ax, values):
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    ax.xaxis.set_major_locator(FixedLocator(values))
    ax.set_xticklabels([str(v) for v in values])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


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


# --------------------------------------------------------------------------------------------------------------
# CLI

def _repo_fixture(name: str) -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", name)


def default_replay_model() -> tuple[str | None, str | None]:
    """The embedded default model if present, else the golden tiny LLaDA checkpoint of the repository."""
    from dllm_jax.cli import default_model_path

    emb = default_model_path()
    if any(os.path.isfile(os.path.join(emb, f)) for f in ("dllm_jax_config.json", "config.json")):
        return emb, "the embedded default model"
    tiny = _repo_fixture("llada_tiny")
    if os.path.exists(tiny):
        return tiny, "the golden tiny LLaDA checkpoint (tests/fixtures/llada_tiny)"
    return None, None


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _prompts(s: str) -> dict:
    out = {}
    for x in s.split(","):
        x = x.strip()
        if not x:
            continue
        if x in PROMPT_KINDS:
            out[x] = PROMPT_KINDS[x]
        else:
            out[f"p{int(x)}"] = int(x)
    return out


def parse_args(argv):
    from dllm_jax.cli import ArgParser, quiet_transformers

    quiet_transformers()  # also when run as python -m

    ap = ArgParser(prog="dllm-jax bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a named grid (explicit options override it)")
    w = ap.add_mutually_exclusive_group()
    w.add_argument("--model", help="checkpoint directory (HF or converted)")
    w.add_argument("--random-weights", action="store_true", help="random weights of --shape")
    ap.add_argument("--shape", default="100m", help=f"random-weight shape: {', '.join(SHAPES)}")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: float32 on CPU, bfloat16 otherwise")
    ap.add_argument("--gen-lengths", type=_ints)
    ap.add_argument("--prompts", type=_prompts, help="short (~40), long (~900) or token counts, comma-separated")
    ap.add_argument("--batch-sizes", type=_ints)
    ap.add_argument("--schedules", help="comma-separated: " + ", ".join(DEFAULT_SCHEDULES) + ", bd_threshold or "
                                        "any preset name")
    ap.add_argument("--grid", choices=["product", "star"])
    ap.add_argument("--base-gen", type=int, help="star grid: generation length of the batch sweep")
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="extra argument for preset-name schedules")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--replay-from", help="checkpoint whose decode traces random-weight threshold runs replay "
                                          "(default: embedded model, else tests/fixtures/llada_tiny)")
    ap.add_argument("--replay-rows", type=int, default=8)
    ap.add_argument("--prompt-source", choices=["auto", "random", "tasks"], default="auto",
                    help="prompt token ids: random ordinary ids, or held-out task prompts (the embedded character "
                         "model; auto = tasks for a checkpoint with the character tokenizer, else random)")
    ap.add_argument("--project", default="llada-8b,dream-7b",
                    help="shapes (comma-separated, '' for none) to project this run's forward patterns onto under "
                         "the roofline (bf16 bounds, computed)")
    ap.add_argument("--out", help="output directory (default: a new ./bench_<machine>_<weights>_<time> directory)")
    ap.add_argument("--name", help="machine label (default: detected)")
    ap.add_argument("--under-load", action="store_true", help="say in the report that the machine was shared")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--replot", metavar="DIR", help="only re-render summary.md and the plots from DIR/bench.json")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def load_weights(a):
    import jax

    import dllm_jax
    from dllm_jax.model import Model
    from dllm_jax.models import transformer

    dtype = a.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    if a.random_weights:
        cfg = shape_config(a.shape)
        params = transformer.init_params(cfg, jax.random.key(a.seed), dtype=getattr(jax.numpy, dtype))
        return Model(cfg, params), f"random:{a.shape}", True, a.shape
    from dllm_jax.cli import default_model_path

    path = a.model or default_model_path()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {a.model!r}: no such checkpoint directory (give an HF or converted "
                                f"checkpoint dir, or leave --model out for the embedded default model)")
    model = dllm_jax.load(path, dtype=dtype)
    label = os.path.basename(os.path.normpath(path))
    shown = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else path
    return model, f"checkpoint:{shown}", False, label


def main(argv=None) -> int:
    a = parse_args(list(argv or []))
    if a.replot:
        with open(os.path.join(a.replot, "bench.json")) as f:
            result = json.load(f)
        paths = write_outputs(result, a.replot, make_plots=not a.no_plots)
        print(f"[bench] re-rendered {paths['markdown']}", file=sys.stderr)
        return 0
    preset = a.preset or ("quick" if not (a.model or a.random_weights) else "cpu")
    cfg = dict(PRESETS[preset])
    for k in ("gen_lengths", "batch_sizes", "repeats", "grid"):
        if getattr(a, k) is not None:
            cfg[k] = getattr(a, k)
    if a.gen_lengths is not None and cfg.get("base_gen") not in a.gen_lengths:
        cfg.pop("base_gen", None)
    prompt_lengths = a.prompts or {p: PROMPT_KINDS[p] for p in cfg["prompts"]}
    schedules = [s.strip() for s in a.schedules.split(",")] if a.schedules else cfg["schedules"]
    extra = {}
    for item in a.set or []:
        k, _, v = item.partition("=")
        from dllm_jax.cli import _parse_value

        extra[k.strip()] = _parse_value(v.strip())
    methods = {s: make_method(s, a.block_length, a.threshold, extra) for s in schedules}

    import jax

    model, weights, random_w, wlabel = load_weights(a)
    info = machine_info()
    if a.name:
        info["name"] = a.name
    dtype = str(np.dtype(jax.tree.leaves(model.params)[0].dtype))
    peak_name, peak = device_peak(info, dtype)
    replay_model, replay_label = None, None
    if random_w:
        import dllm_jax

        rpath, replay_label = (a.replay_from, f"checkpoint {a.replay_from}") if a.replay_from \
            else default_replay_model()
        if rpath:
            replay_model = dllm_jax.load(rpath)
    prompt_source = a.prompt_source
    if prompt_source == "auto":
        prompt_source = "random"
        if not random_w and getattr(model, "tokenizer_path", None):
            from dllm_jax.tokenizer import CharTokenizer

            try:
                CharTokenizer.load(model.tokenizer_path)
                prompt_source = "tasks"
            except (ValueError, KeyError, OSError):
                pass
    bench = Bench(model=model, weights=weights, random_weights=random_w, peak_name=peak_name, peak=peak,
                  repeats=cfg["repeats"], block_length=a.block_length, threshold=a.threshold,
                  replay_model=replay_model, replay_label=replay_label, replay_rows=a.replay_rows, seed=a.seed,
                  mem_limit=_mem_limit(), extra=extra, prompt_source=prompt_source)
    groups = grid(cfg["gen_lengths"], list(prompt_lengths), cfg["batch_sizes"], schedules, cfg["grid"],
                  a.base_gen or cfg.get("base_gen"))
    wslug = re.sub(r"[^a-z0-9]+", "-", wlabel.lower())
    # never into an existing directory by default (run from the repository root, docs/benchmarks/... would
    # overwrite the committed results): a fresh, time-stamped directory under the current one
    out_dir = a.out or f"bench_{info['slug']}_{wslug}_{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    # finished points are streamed to OUT.partial.jsonl (one JSON line each, flushed) so a run stopped by a time limit
    # keeps what it measured; the file is removed once the complete outputs are written
    partial = out_dir.rstrip("/") + ".partial.jsonl"
    os.makedirs(os.path.dirname(os.path.abspath(partial)), exist_ok=True)
    with open(partial, "w") as plog:
        def on_point(rec):
            plog.write(json.dumps(rec, default=_json_default) + "\n")
            plog.flush()
            if a.no_progress:
                print(f"[bench] {rec['method']} G={rec['gen_length']} {rec['prompt_kind']} B={rec['batch']}: "
                      f"{rec['status']}" + (f" {rec['tok_s']:.1f} tok/s" if rec.get("tok_s") else ""),
                      file=sys.stderr, flush=True)

        points = run_grid(bench, groups, methods, prompt_lengths, progress=not a.no_progress, on_point=on_point)
    try:
        info["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    info["under_load"] = bool(a.under_load or (info["platform"] == "cpu" and info.get("loadavg_start", [0])[0]
                                               > 0.5 * (os.cpu_count() or 1)))
    if random_w:
        nfe_note = (f"threshold-type schedules replay decode traces recorded on {replay_label} (an acceptance policy "
                    "that commits exactly the recorded count per forward); fixed-quota schedules run natively"
                    if replay_model is not None else "native on random weights (no replay model found)")
    else:
        nfe_note = f"native: the checkpoint's own decode ({weights})"
    if prompt_source == "tasks":
        nfe_note += "; prompts: held-out `sort` task prompts, chat-formatted (41-61 tokens, bucket 64)"
    result = {"machine": info, "peak_name": peak_name, "peak": peak, "weights": weights,
              "params": param_count(model.cfg), "model_config": model.cfg.to_dict(), "dtype": dtype,
              "schedules": schedules,
              "block_length": a.block_length, "threshold": a.threshold, "grid": cfg["grid"],
              "repeats": cfg["repeats"], "nfe_note": nfe_note, "prompt_source": prompt_source,
              "wall_s": time.perf_counter() - t0,
              "counting": "tok_s = batch * gen_length / best run wall time (no EOS early stop; compile excluded); "
                          "tok_s_to_eos = tokens up to the first EOS / the same time; tpf = gen_length / mean NFE",
              "peaks_table": PEAKS, "argv": list(argv or []), "points": points}
    proj = [s.strip() for s in (a.project or "").split(",") if s.strip()]
    result["projections"] = {s: project(points, s) for s in proj}
    paths = write_outputs(result, out_dir, make_plots=not a.no_plots)
    os.remove(partial)
    ok = [p for p in points if p["status"] == "ok"]
    print(f"[bench] {len(ok)}/{len(points)} points ok in {result['wall_s']:.0f}s; wrote {paths['json']}, "
          f"{paths['markdown']}" + (f", {len(paths['plots'])} plots" if paths["plots"] else ""), file=sys.stderr)
    return 0


def _mem_limit():
    avail = available_memory_bytes()
    return None if avail is None else 0.85 * avail


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
