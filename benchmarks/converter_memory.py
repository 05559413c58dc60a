"""Peak host memory of the HF -> dllm-jax converter on a synthetic multi-shard LLaDA-architecture checkpoint.

    python benchmarks/converter_memory.py [--workdir /tmp/dllm_conv_mem] [--d-model 1024] [--layers 8]
                                          [--vocab 32000] [--mlp 2816] [--shards 6] [--dtype float32] [--keep]
                                          [--quantize int8]

Writes random float32 weights (HF names and [out, in] layout, split greedily into ~N shards + an index) to the
work dir, runs `python -m convert.hf_to_flax` under `/usr/bin/time -v` (Debian package `time`), and prints its
maximum RSS next to the checkpoint size, the largest shard, the largest tensor and the RSS of a bare interpreter
that imports the same libraries (jax, orbax, numpy). Streaming works when the peak is about
baseline + converted model + largest tensor, i.e. far below twice the model.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1024 * 1024


def llada_tensors(d, layers, vocab, mlp):
    yield "model.transformer.wte.weight", (vocab, d)
    for i in range(layers):
        b = f"model.transformer.blocks.{i}."
        yield b + "attn_norm.weight", (d,)
        for n in ("q_proj", "k_proj", "v_proj", "attn_out"):
            yield b + f"{n}.weight", (d, d)
        yield b + "ff_norm.weight", (d,)
        yield b + "ff_proj.weight", (mlp, d)
        yield b + "up_proj.weight", (mlp, d)
        yield b + "ff_out.weight", (d, mlp)
    yield "model.transformer.ln_f.weight", (d,)
    yield "model.transformer.ff_out.weight", (vocab, d)


def build_checkpoint(path, d, layers, vocab, mlp, n_shards, seed=0):
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    tensors = list(llada_tensors(d, layers, vocab, mlp))
    total = sum(4 * int(np.prod(s)) for _, s in tensors)
    cap = total / n_shards
    groups, cur, cur_b = [], [], 0
    for name, shape in tensors:  # greedy split like transformers' max_shard_size
        nb = 4 * int(np.prod(shape))
        if cur and cur_b + nb > cap * 1.001:
            groups.append(cur)
            cur, cur_b = [], 0
        cur.append((name, shape))
        cur_b += nb
    groups.append(cur)
    rng = np.random.default_rng(seed)
    weight_map = {}
    for i, g in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {n: (rng.standard_normal(s, dtype=np.float32) * 0.02) for n, s in g}
        save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
        del shard
        weight_map.update({n: fname for n, _ in g})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    cfg = {"model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": d, "n_heads": max(1, d // 128),
           "n_kv_heads": max(1, d // 128), "n_layers": layers, "mlp_hidden_size": mlp, "vocab_size": vocab,
           "embedding_size": vocab, "block_type": "llama", "weight_tying": False, "include_bias": False,
           "include_qkv_bias": False, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_sequence_length": 4096,
           "mask_token_id": vocab - 4, "eos_token_id": vocab - 10, "pad_token_id": vocab - 10,
           "torch_dtype": "float32"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return max(4 * int(np.prod(s)) for _, s in tensors)


def largest_leaf(a):
    per_layer = max(a.d_model * a.d_model, a.d_model * a.mlp) * a.layers
    return 4 * max(per_layer, a.vocab * a.d_model)


def time_v(cmd, env):
    if not os.path.exists("/usr/bin/time"):
        sys.exit("needs GNU time: apt-get update && apt-get install -y time")
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout}\n{r.stderr[-4000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) * 1024
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", r.stderr).group(1)
    return rss, wall


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/dllm_conv_mem")
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--mlp", type=int, default=2816)
    ap.add_argument("--shards", type=int, default=6)
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--repeat", type=int, default=3, help="conversions per dtype (the peak varies a little run to run)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and outputs")
    ap.add_argument("--quantize", choices=("int8", "int8-all"), default=None, help="convert with --quantize")
    a = ap.parse_args()

    src = os.path.join(a.workdir, "hf")
    shutil.rmtree(a.workdir, ignore_errors=True)
    largest_tensor = build_checkpoint(src, a.d_model, a.layers, a.vocab, a.mlp, a.shards)
    shards = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    sizes = [os.path.getsize(os.path.join(src, f)) for f in shards]
    total = sum(sizes)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    base_rss, _ = time_v([sys.executable, "-c", "import numpy, jax, orbax.checkpoint, safetensors, tqdm, ml_dtypes; "
                                                "jax.devices(); import convert.hf_to_flax"], env)
    print(f"checkpoint: LLaDA d_model={a.d_model} layers={a.layers} vocab={a.vocab} mlp={a.mlp}, float32, "
          f"{len(shards)} shards")
    print(f"  total size      {total / MiB:8.1f} MiB")
    print(f"  largest shard   {max(sizes) / MiB:8.1f} MiB")
    print(f"  largest tensor  {largest_tensor / MiB:8.1f} MiB")
    print(f"  baseline RSS    {base_rss / MiB:8.1f} MiB  (python + numpy/jax/orbax imports, no conversion)")
    print(f"  largest leaf    {largest_leaf(a) / MiB:8.1f} MiB  (float32 params leaf, orbax writes one per request)")
    for dt in a.dtype:
        dst = os.path.join(a.workdir, f"out_{dt}")
        runs = []
        for _ in range(a.repeat):
            shutil.rmtree(dst, ignore_errors=True)
            q = ["--quantize", a.quantize] if a.quantize else []
            runs.append(time_v([sys.executable, "-m", "convert.hf_to_flax", src, dst, "--dtype", dt, "--no-progress",
                                *q], env))
        rss = [r for r, _ in runs]
        out_bytes = total // 2 if dt == "bfloat16" else total
        if a.quantize:  # int8 linear weights + float32 scales + the rest in dt (dllm_jax.quant)
            import jax.numpy as jnp

            from dllm_jax import checkpoint, quant
            from dllm_jax.models.config import config_from_hf, read_hf_config

            cfg = config_from_hf(read_hf_config(src))
            out_bytes = quant.param_bytes(checkpoint.abstract_params(cfg, jnp.dtype(dt), quantization=a.quantize))[
                "total"]
            dt = f"{dt} --quantize {a.quantize}"
        lo, hi = min(rss) - base_rss, max(rss) - base_rss
        print(f"convert --dtype {dt} ({a.repeat} runs, wall {', '.join(w for _, w in runs)}):")
        print(f"  max RSS         {min(rss) / MiB:8.1f} .. {max(rss) / MiB:.1f} MiB")
        print(f"  above baseline  {lo / MiB:8.1f} .. {hi / MiB:.1f} MiB = {lo / total:.2f} .. {hi / total:.2f} x checkpoint"
              f"; converted output {out_bytes / MiB:.1f} MiB + {(lo - out_bytes) / MiB:.1f} .. "
              f"{(hi - out_bytes) / MiB:.1f} MiB = output + {(lo - out_bytes) / max(sizes):.1f} .. "
              f"{(hi - out_bytes) / max(sizes):.1f} x largest shard")
    if not a.keep:
        shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
