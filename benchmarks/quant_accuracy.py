"""int8 weight-only quantization: logits error, parameter bytes, compiled memory, and task-suite accuracy / NFE.

    python benchmarks/quant_accuracy.py [--out docs/quant_results] [--n 100] [--batch-size 50]
                                        [--model DIR] [--schedules vanilla,fastdllm_dual] [--skip-tasks]

1. Logits on the golden tiny checkpoints (tests/fixtures, PyTorch float32 reference logits): fp32, bf16, int8 and
   int8-all (each with float32 and bfloat16 compute) against the golden logits and against our bf16 model:
   max |diff|, relative L2 error, top-1 agreement and mean KL(reference || variant) over all positions.
2. Parameter bytes of LLaDA-8B and Dream-7B in fp32 / bf16 / int8 / int8-all, from `jax.eval_shape` (no weights).
3. XLA compiled memory of one forward (a mid-size random config, shapes only): argument and temp bytes of the bf16
   and int8 programs, showing that no dequantized copy of the weights is built.
4. If the embedded default model (dllm_jax/assets/default_model, or --model) and dllm_jax.tasks exist: exact-match
   accuracy and mean NFE on the held-out task suite (dllm_jax.evaluate.evaluate_schedule) for fp32, bf16, int8
   (bf16 compute) and int8-all (bf16 compute), per schedule. Otherwise it says so and skips this part.

Prints markdown tables; --out also writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dllm_jax  # noqa: E402
from dllm_jax import quant  # noqa: E402
from dllm_jax.checkpoint import abstract_params  # noqa: E402
from dllm_jax.models.config import ModelConfig  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
VARIANTS = [  # (label, dtype, quantize)
    ("fp32", "float32", None),
    ("bf16", "bfloat16", None),
    ("int8 (fp32 compute)", "float32", "int8"),
    ("int8 (bf16 compute)", "bfloat16", "int8"),
    ("int8-all (fp32 compute)", "float32", "int8-all"),
    ("int8-all (bf16 compute)", "bfloat16", "int8-all"),
]
TASK_VARIANTS = [("fp32", "float32", None), ("bf16", "bfloat16", None), ("int8 (bf16)", "bfloat16", "int8"),
                 ("int8-all (bf16)", "bfloat16", "int8-all")]
SCHEDULES = {  # name -> (preset, kwargs), as in dllm_jax.evaluate.SWEEP
    "vanilla": ("vanilla", dict(block_length=32)),
    "fastdllm": ("fastdllm", dict(block_length=32, threshold=0.9)),
    "fastdllm_dual": ("fastdllm_dual", dict(block_length=32, threshold=0.9)),
}


def big_configs() -> dict:
    def cfg(family, V, D, L, H, K, F, bias):
        return ModelConfig(family=family, vocab_size=V, d_model=D, n_layers=L, n_heads=H, n_kv_heads=K,
                           head_dim=D // H, mlp_hidden=F, rope_theta=1e4, norm_eps=1e-5, qkv_bias=bias,
                           mask_token_id=0, eos_token_id=1, pad_token_id=1, max_seq_len=4096,
                           logit_shift=family == "dream")

    return {"LLaDA-8B": cfg("llada", 126464, 4096, 32, 32, 32, 12288, False),
            "Dream-7B": cfg("dream", 152064, 3584, 28, 28, 4, 18944, True)}


# ----------------------------------------------------------------------------------------------------- 1. logits

def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _compare(out, ref) -> dict:
    lp, lq = _log_softmax(ref.astype(np.float64)), _log_softmax(out.astype(np.float64))
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)))
    return {"max_abs": float(np.abs(out - ref).max()),
            "rel_l2": float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
            "top1": float((out.argmax(-1) == ref.argmax(-1)).mean()), "kl": kl}


def logits_error() -> dict:
    from safetensors.numpy import load_file

    res = {}
    for fam in ("llada", "dream"):
        g = load_file(os.path.join(FIXTURES, f"{fam}_logits.safetensors"))
        path = os.path.join(FIXTURES, f"{fam}_tiny")
        outs = {}
        for label, dtype, q in VARIANTS:
            m = dllm_jax.load(path, dtype=dtype, quantize=q)
            outs[label] = np.concatenate([np.asarray(m.logits(g[k])).reshape(-1, m.cfg.vocab_size)
                                          for k in ("input_ids", "input_ids_b2")])
        ref = np.concatenate([g[k].reshape(-1, g[k].shape[-1]) for k in ("logits", "logits_b2")])
        res[fam] = {label: {"vs_golden_fp32": _compare(o, ref), "vs_bf16": _compare(o, outs["bf16"])}
                    for label, o in outs.items()}
        res[fam]["_positions"] = int(ref.shape[0])
    return res


def logits_md(res) -> str:
    lines = ["| model | variant | max abs | rel L2 | top-1 agree | KL | rel L2 vs bf16 | top-1 vs bf16 |",
             "|---|---|---|---|---|---|---|---|"]
    for fam, rows in res.items():
        for label, r in rows.items():
            if label.startswith("_"):
                continue
            a, b = r["vs_golden_fp32"], r["vs_bf16"]
            lines.append(f"| {fam} | {label} | {a['max_abs']:.3g} | {a['rel_l2']:.4f} | {a['top1']:.3f} | "
                         f"{a['kl']:.2e} | {b['rel_l2']:.4f} | {b['top1']:.3f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ 2. bytes

def param_bytes() -> dict:
    res = {}
    for name, cfg in big_configs().items():
        rows = {}
        for label, dtype, q in (("fp32", jnp.float32, None), ("bf16", jnp.bfloat16, None),
                                ("int8 + fp32 rest", jnp.float32, "int8"), ("int8 + bf16 rest", jnp.bfloat16, "int8"),
                                ("int8-all + bf16 rest", jnp.bfloat16, "int8-all")):
            rows[label] = quant.param_bytes(abstract_params(cfg, dtype, quantization=q))
        n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract_params(cfg, jnp.float32)))
        res[name] = {"n_params": n, "rows": rows}
    return res


def bytes_md(res) -> str:
    G = 1 << 30
    lines = ["| model | storage | linear layers | embedding + LM head | norms/biases | total | vs bf16 |",
             "|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        bf = r["rows"]["bf16"]["total"]
        for label, b in r["rows"].items():
            lines.append(f"| {name} ({r['n_params'] / 1e9:.2f} B params) | {label} | {b['linear'] / G:.2f} GiB | "
                         f"{b['embed_head'] / G:.2f} GiB | {b['other'] / 2**20:.1f} MiB | **{b['total'] / G:.2f} GiB** "
                         f"({b['total'] / 1e9:.2f} GB) | {b['total'] / bf:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- 3. compiled memory

def compiled_memory() -> dict:
    from dllm_jax.models import transformer

    cfg = ModelConfig(family="llada", vocab_size=32000, d_model=1024, n_layers=8, n_heads=8, n_kv_heads=8,
                      head_dim=128, mlp_hidden=2816, rope_theta=1e4, norm_eps=1e-5, qkv_bias=False, mask_token_id=0,
                      eos_token_id=1, pad_token_id=1, max_seq_len=4096)
    ids = jax.ShapeDtypeStruct((1, 128), jnp.int32)
    res = {"config": "d_model 1024, 8 layers, mlp 2816, vocab 32000; forward of [1, 128]",
           "backend": jax.default_backend()}
    for label, dtype, q in (("fp32", jnp.float32, None), ("int8 (fp32 compute)", jnp.float32, "int8"),
                            ("bf16", jnp.bfloat16, None), ("int8 (bf16 compute)", jnp.bfloat16, "int8")):
        c = transformer.forward.lower(abstract_params(cfg, dtype, quantization=q), cfg, ids).compile()
        m = c.memory_analysis()
        res[label] = {"argument_bytes": int(m.argument_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes)}
    return res


def memory_md(res) -> str:
    M = 1 << 20
    lines = [f"{res['config']}, XLA:{res['backend']} `compiled.memory_analysis()`:", "",
             "| params | arguments (weights) | temp |", "|---|---|---|"]
    for k, v in res.items():
        if isinstance(v, dict):
            lines.append(f"| {k} | {v['argument_bytes'] / M:.1f} MiB | {v['temp_bytes'] / M:.1f} MiB |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ 4. tasks

def task_accuracy(model_path, schedules, n, batch_size) -> dict:
    try:
        from dllm_jax import evaluate, tasks  # noqa: F401
    except ImportError as e:
        return {"skipped": f"dllm_jax.tasks / dllm_jax.evaluate not importable ({e})"}
    path = model_path or evaluate.default_model_path()
    if not os.path.isdir(path):
        return {"skipped": f"no default model at {path} (train it first: dllm_jax.train)"}
    res = {"model": path, "n": n, "batch_size": batch_size, "runs": []}
    for label, dtype, q in TASK_VARIANTS:
        model = dllm_jax.load(path, dtype=dtype, quantize=q)
        for sname in schedules:
            preset, kw = SCHEDULES[sname]
            t = time.perf_counter()
            r = evaluate.evaluate_schedule(model, preset, kw, None, n, batch_size)
            row = {"variant": label, "schedule": sname, "accuracy": r["accuracy"], "mean_nfe": r["mean_nfe"],
                   "char_accuracy": r.get("char_accuracy"),
                   "tasks": {k: {"accuracy": v["accuracy"], "mean_nfe": v["mean_nfe"],
                                 "char_accuracy": v.get("char_accuracy")} for k, v in r["tasks"].items()}}
            res["runs"].append(row)
            print(f"  {label:18s} {sname:14s} acc {r['accuracy'] * 100:5.1f}%  NFE {r['mean_nfe']:6.1f} "
                  f"({time.perf_counter() - t:.0f}s)", file=sys.stderr, flush=True)
    return res


def tasks_md(res) -> str:
    if "skipped" in res:
        return f"skipped: {res['skipped']}"
    names = list(res["runs"][0]["tasks"])
    lines = ["| weights | schedule | " + " | ".join(f"{t} acc / char / NFE" for t in names)
             + " | mean acc | mean char | mean NFE |", "|---|---|" + "---|" * (len(names) + 3)]

    def pct(v):
        return "n/a" if v is None else f"{v * 100:.1f}%"

    for r in res["runs"]:
        cells = " | ".join(f"{pct(r['tasks'][t]['accuracy'])} / {pct(r['tasks'][t].get('char_accuracy'))} / "
                           f"{r['tasks'][t]['mean_nfe']:.1f}" for t in names)
        lines.append(f"| {r['variant']} | {r['schedule']} | {cells} | {pct(r['accuracy'])} | "
                     f"{pct(r.get('char_accuracy'))} | {r['mean_nfe']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    ap.add_argument("--model", default=None, help="task-suite model (default: dllm_jax/assets/default_model)")
    ap.add_argument("--schedules", default="vanilla,fastdllm_dual", help=f"comma-separated, of {sorted(SCHEDULES)}")
    ap.add_argument("--n", type=int, default=100, help="held-out examples per task")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--skip-tasks", action="store_true")
    a = ap.parse_args(argv)
    schedules = [s for s in a.schedules.split(",") if s]
    bad = [s for s in schedules if s not in SCHEDULES]
    if bad:
        ap.error(f"unknown schedule(s) {bad}; choose from {sorted(SCHEDULES)}")
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} cores ({jax.devices()[0].platform})",
            "jax": jax.__version__}
    out = {"meta": meta, "logits": logits_error(), "param_bytes": param_bytes(), "compiled_memory": compiled_memory()}
    out["tasks"] = {"skipped": "--skip-tasks"} if a.skip_tasks else task_accuracy(a.model, schedules, a.n,
                                                                                  a.batch_size)
    md = "\n\n".join([f"Machine: {meta['machine']}, jax {meta['jax']}.",
                      "### Logits on the golden tiny checkpoints", logits_md(out["logits"]),
                      "### Parameter bytes (jax.eval_shape)", bytes_md(out["param_bytes"]),
                      "### Compiled memory of one forward", memory_md(out["compiled_memory"]),
                      "### Task suite (held-out, exact match)", tasks_md(out["tasks"])]) + "\n"
    print(md)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out + ".json", "w") as f:
            json.dump(out, f, indent=1)
        with open(a.out + ".md", "w") as f:
            f.write(md)
        print("wrote", a.out + ".{json,md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
