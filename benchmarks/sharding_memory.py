"""Per-device memory of LLaDA-8B and Dream-7B under the dllm-jax sharding rules, from shapes only (no weights).

    python benchmarks/sharding_memory.py [--out docs/sharding.md] [--print]

Everything comes from `jax.eval_shape` (params of `transformer.init_params`, KV cache of `engine.loop.init_cache`,
the full-forward logits of `transformer.forward`) and the shardings of `dllm_jax.sharding` (param_shardings,
kv_sharding, batch over data, vocab over model): per-device bytes = bytes of `sharding.shard_shape(shape)`.
It runs on 8 fake CPU devices, so it needs no accelerator. The markdown table replaces the part of `--out` between
the `<!-- memory-table:begin -->` / `<!-- memory-table:end -->` markers (the file is created if missing).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dllm_jax import sharding  # noqa: E402
from dllm_jax.engine.context import Ctx  # noqa: E402
from dllm_jax.engine.loop import init_cache  # noqa: E402
from dllm_jax.models.config import ModelConfig  # noqa: E402
from dllm_jax.models.transformer import init_params  # noqa: E402

GB = 1e9
PROMPT, GEN = 1024, 256
BATCHES = (1, 8, 32)
# (data, model); 1x2 is added for the 2-GPU Kaggle T4 box
MESHES = ((1, 1), (1, 2), (1, 4), (1, 8), (2, 4), (8, 1))
HEADROOM = 0.85  # a configuration "fits" when params + KV cache + logits <= 85% of a device's memory

# name, devices, GB per device
SETUPS = (
    ("v5e-1 (16 GB)", 1, 16), ("A100 40GB", 1, 40), ("A100 80GB", 1, 80), ("H100 80GB", 1, 80),
    ("Kaggle 2xT4 (2 x 16 GB)", 2, 16),
    ("4 x 16 GB (half a v5e-8 / v3-8)", 4, 16),
    ("v2-8 (8 x 8 GB)", 8, 8), ("v3-8 (8 x 16 GB)", 8, 16), ("v5e-8 (8 x 16 GB)", 8, 16),
)


def _cfg(family, V, D, L, H, K, F, bias):
    return ModelConfig(family=family, vocab_size=V, d_model=D, n_layers=L, n_heads=H, n_kv_heads=K, head_dim=D // H,
                       mlp_hidden=F, rope_theta=1e4, norm_eps=1e-5, qkv_bias=bias, mask_token_id=0, eos_token_id=1,
                       pad_token_id=1, max_seq_len=4096, logit_shift=family == "dream")


MODELS = {
    "LLaDA-8B": _cfg("llada", 126464, 4096, 32, 32, 32, 12288, False),
    "Dream-7B": _cfg("dream", 152064, 3584, 28, 28, 4, 18944, True),
}


def _bytes(shape_dtype, sh: NamedSharding) -> int:
    return math.prod(sh.shard_shape(shape_dtype.shape)) * jnp.dtype(shape_dtype.dtype).itemsize


def measure(cfg: ModelConfig, data: int, model: int, batch: int, dtype=jnp.bfloat16):
    """Per-device bytes (params, kv cache, logits) or None when the batch does not divide the data axis."""
    if batch % data:
        return None
    mesh = sharding.make_mesh(data, model, devices=jax.devices()[: data * model])
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), dtype=dtype))
    p_sh = sharding.param_shardings(cfg, mesh)
    params = sum(_bytes(s, h) for s, h in zip(jax.tree.leaves(shapes), jax.tree.leaves(p_sh)))
    ctx = Ctx(batch=batch, prompt_len=PROMPT, gen_length=GEN, mask_id=0, eos_id=1, pad_id=1)
    kv = jax.eval_shape(lambda: init_cache(cfg, ctx, dtype))
    kv_sh = sharding.kv_sharding(cfg, mesh, batch, ctx.total_len)
    kv_b = sum(_bytes(a, kv_sh) for a in jax.tree.leaves(kv))
    # the largest transient of a full forward: float32 logits [B, L, V], rows over data, vocab over model
    logits = jax.ShapeDtypeStruct((batch, ctx.total_len, cfg.vocab_size), jnp.float32)
    lg_spec = sharding.spec_for(("batch", "seq", "vocab"), logits.shape, cfg, mesh)
    lg = _bytes(logits, NamedSharding(mesh, lg_spec))
    return params, kv_b, lg, sharding.describe(cfg, mesh)


def fits(n_dev: int, total: float) -> list[str]:
    return [name for name, n, mem in SETUPS if n == n_dev and total <= HEADROOM * mem * GB]


def build() -> str:
    rows = ["| model | mesh (data x model) | batch | params / device | KV cache / device | logits f32 / device | "
            "total / device | fits |", "|---|---|---|---|---|---|---|---|"]
    best: dict[tuple[str, str], tuple[int, float, str]] = {}  # largest batch, then the smallest total
    notes = []
    for mname, cfg in MODELS.items():
        for data, model in MESHES:
            mesh_name = "1" if data * model == 1 else f"{data}x{model}"
            for batch in BATCHES:
                m = measure(cfg, data, model, batch)
                if m is None:
                    rows.append(f"| {mname} | {mesh_name} | {batch} | - | - | - | - | batch not divisible by "
                                f"data={data} |")
                    continue
                p, kv, lg, desc = m
                total = p + kv + lg
                ok = fits(data * model, total)
                for s in ok:
                    b = best.get((mname, s))
                    if b is None or (batch, -total) > (b[0], -b[1]):
                        best[(mname, s)] = (batch, total, mesh_name)
                rows.append(f"| {mname} | {mesh_name} | {batch} | {p / GB:.2f} GB | {kv / GB:.2f} GB | "
                            f"{lg / GB:.2f} GB | {total / GB:.2f} GB | {', '.join(ok) or '-'} |")
            if model > 1:
                repl = [f"{ax}: {v}" for ax, v in desc.items() if v.startswith("replicated (") and "size 1" not in v]
                if repl:
                    notes.append(f"- {mname} on model={model}: " + "; ".join(repl) + ".")
    summary = ["| set-up | " + " | ".join(MODELS) + " |", "|---|" + "---|" * len(MODELS)]
    for name, n, mem in SETUPS:
        cells = []
        for mname in MODELS:
            b = best.get((mname, name))
            cells.append(f"batch {b[0]} (mesh {b[2]}, {b[1] / GB:.1f} GB / device)" if b else "does not fit")
        summary.append(f"| {name} | " + " | ".join(cells) + " |")
    head = (f"Generated by `python benchmarks/sharding_memory.py` (bf16 weights and KV cache, {PROMPT} prompt + "
            f"{GEN} generated = {PROMPT + GEN} tokens; GB = 1e9 bytes; 'fits' = params + KV cache + logits <= "
            f"{int(HEADROOM * 100)}% of one device's memory, among the set-ups with exactly data x model devices).")
    return "\n".join([head, "", "Largest batch (of 1 / 8 / 32) that fits, per set-up:", "", *summary, "",
                      "Per configuration:", "", *rows, "", "Replication fallbacks (dims not divisible by the model "
                      "axis):", "", *(notes or ["- none"])]) + "\n"


BEGIN, END = "<!-- memory-table:begin -->", "<!-- memory-table:end -->"


def write(path: str, table: str) -> None:
    block = f"{BEGIN}\n{table}{END}"
    if os.path.exists(path):
        text = open(path).read()
        if BEGIN in text and END in text:
            text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    else:
        text = "# Sharding memory\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "sharding.md"))
    ap.add_argument("--print", action="store_true", help="print the table instead of writing --out")
    a = ap.parse_args(argv)
    table = build()
    if a.print:
        print(table)
    else:
        write(a.out, table)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
