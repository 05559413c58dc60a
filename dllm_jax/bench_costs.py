"""The analytic side of `dllm-jax bench`: named model shapes, vendor peaks, the FLOPs/bytes cost model of a
forward and of a run, roofline time, machine information and the memory estimate (docs/benchmarks/README.md
gives the counting rules; `dllm_jax.bench` runs the grid)."""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import re
import time
from typing import Callable

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
