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
import os
import re
import sys
import time
from typing import Any, Callable

import numpy as np

# the cost model and the reports live beside this module; their names stay importable from here
from dllm_jax.bench_costs import (PEAKS, SHAPES, SMALL, Cost, available_memory_bytes, device_peak,  # noqa: F401
                                  forward_cost, is_oom, iteration_kinds, machine_info, mean_window_width,
                                  measure_peaks, memory_estimate, param_count, roofline_time, run_costs, shape_config)
from dllm_jax.bench_report import _json_default, markdown, plots, write_outputs  # noqa: F401


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
