"""Read an LLaDA 2.x MoE Hugging Face checkpoint into the llada2_moe params pytree (experts stacked [E, ...]).

The same streaming contract as dllm_jax.hf_weights (which dispatches here for the family): every shard header is
validated first (`plan_checkpoint`: names, shapes, dtypes, expert indices, the router bias, nothing missing or left
over), so a bad checkpoint fails with one message before any weight is read; then each tensor is read once,
transposed to [in, out] and written (or quantized to int8) into its slot of preallocated stacked buffers. The fused
`attention.query_key_value` is split into wq / wk / wv (q heads, then k heads, then v heads) on the way.
"""

from __future__ import annotations

import os
import re
from typing import Callable

import numpy as np

from dllm_jax import quant
from dllm_jax.hf_weights import (CheckpointError, CheckpointPlan, _aligned_empty, _index_weight_map, _iter_shard,
                                 read_header, shard_files)
from dllm_jax.models import llada2_moe
from dllm_jax.models.config import ModelConfig

_FLOAT_TAGS = frozenset({"BF16", "F16", "F32", "F64"})
LINEAR = quant.LINEAR + quant.MOE_LINEAR


def _table():
    return [(re.compile(rx + r"\Z"), dst, tr) for rx, dst, tr in llada2_moe.WEIGHT_TABLE]


def _hf_name(path, idx, Ld) -> str:
    """The checkpoint name of params slot path[idx] (for error messages)."""
    g, leaf = path[0], path[-1]
    if g != "layers" and g != "dense" and g != "moe":
        return {"embed": "model.word_embeddings.weight", "final_norm": "model.norm.weight",
                "lm_head": "lm_head.weight"}[g]
    layer = idx[0] + (Ld if g == "moe" else 0)
    names = {"attn_norm": "input_layernorm.weight", "wqkv": "attention.query_key_value.weight",
             "bqkv": "attention.query_key_value.bias", "q_norm": "attention.query_layernorm.weight",
             "k_norm": "attention.key_layernorm.weight", "wo": "attention.dense.weight",
             "mlp_norm": "post_attention_layernorm.weight", "router": "mlp.gate.weight",
             "expert_bias": "mlp.gate.expert_bias", "s_gate": "mlp.shared_experts.gate_proj.weight",
             "s_up": "mlp.shared_experts.up_proj.weight", "s_down": "mlp.shared_experts.down_proj.weight"}
    if g == "dense":
        return f"model.layers.{layer}.mlp.{leaf.replace('w_', '')}_proj.weight"
    if g == "moe" and leaf in ("w_gate", "w_up", "w_down"):
        return f"model.layers.{layer}.mlp.experts.{idx[1]}.{leaf.replace('w_', '')}_proj.weight"
    return f"model.layers.{layer}.{names[leaf]}"


def _expected(cfg: ModelConfig) -> dict:
    """(path, idx) -> per-slot shape in the params ([in, out]) layout, for every tensor the checkpoint must hold.
    The fused q/k/v projection is one slot ("layers", "wqkv") of shape [D, (H + 2K) hd]."""
    shapes = llada2_moe.param_shapes(cfg)
    L, Ld, E = cfg.n_layers, cfg.first_dense_layers, cfg.n_experts
    H, K, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    out = {}
    for k in ("embed", "final_norm", "lm_head"):
        out[((k,), ())] = tuple(shapes[k])
    for k, s in shapes["layers"].items():
        if k in ("wq", "wk", "wv", "bq", "bk", "bv"):
            continue
        for li in range(L):
            out[(("layers", k), (li,))] = tuple(s[1:])
    for li in range(L):
        out[(("layers", "wqkv"), (li,))] = (cfg.d_model, (H + 2 * K) * hd)
        if cfg.qkv_bias:
            out[(("layers", "bqkv"), (li,))] = ((H + 2 * K) * hd,)
    for g in ("dense", "moe"):
        for k, s in shapes.get(g, {}).items():
            n = s[0]
            if g == "moe" and k in ("w_gate", "w_up", "w_down"):
                for li in range(n):
                    for e in range(E):
                        out[((g, k), (li, e))] = tuple(s[2:])
            else:
                for li in range(n):
                    out[((g, k), (li,))] = tuple(s[1:])
    del Ld
    return out


def plan_checkpoint(path: str, cfg: ModelConfig) -> CheckpointPlan:
    """Validate an LLaDA2 MoE checkpoint against `cfg` from its headers alone. Raises CheckpointError naming the
    problem: expert tensors missing, more experts than num_experts, a router bias of the wrong shape, any other
    missing / unexpected / misshapen / duplicated tensor."""
    table = _table()
    expected = _expected(cfg)
    L, Ld, E = cfg.n_layers, cfg.first_dense_layers, cfg.n_experts
    files = shard_files(path)
    index = os.path.join(path, "model.safetensors.index.json")
    wm = _index_weight_map(index) if os.path.isfile(index) else None
    shards, dest, where, extra, src_dtypes = [], {}, {}, [], set()
    too_many: dict[int, int] = {}  # layer -> highest expert index seen beyond E
    dense_in_moe, moe_in_dense, router_errors = [], [], []
    for fname in files:
        header = read_header(fname)
        shards.append((fname, header))
        base = os.path.basename(fname)
        for name, info in header.items():
            if name in where:
                raise CheckpointError(f"tensor {name} appears twice in the checkpoint ({where[name]} and {base})")
            where[name] = base
            for rx, dst, tr in table:
                m = rx.match(name)
                if m:
                    break
            else:
                extra.append(name)
                continue
            if len(dst) == 1:
                idx = ()
            else:
                li = int(m.group(1))
                if li >= L:
                    extra.append(name)
                    continue
                g = dst[0]
                if g == "dense" and li >= Ld:
                    dense_in_moe.append(name)
                    continue
                if g == "moe" and li < Ld:
                    moe_in_dense.append(name)
                    continue
                idx = (li - Ld,) if g == "moe" else (li,)
                if g == "moe" and dst[1] in ("w_gate", "w_up", "w_down"):
                    e = int(m.group(2))
                    if e >= E:
                        too_many[li] = max(too_many.get(li, 0), e)
                        continue
                    idx = idx + (e,)
            if info.dtype not in _FLOAT_TAGS:
                raise CheckpointError(f"tensor {name} in {base} is stored as {info.dtype}; a weight must be a float "
                                      f"tensor ({'/'.join(sorted(_FLOAT_TAGS))})")
            want = expected[(dst, idx)]
            hf_want = tuple(reversed(want)) if tr else tuple(want)
            if tuple(info.shape) != hf_want:
                if dst == ("moe", "expert_bias"):
                    router_errors.append(f"router bias {name} in {base} has shape {tuple(info.shape)}, expected "
                                         f"({E},) = (num_experts,) as config.json says num_experts={E}")
                    continue
                if dst == ("moe", "router"):
                    router_errors.append(f"router {name} in {base} has shape {tuple(info.shape)}, expected "
                                         f"{hf_want} = (num_experts, hidden_size) as config.json says "
                                         f"num_experts={E}")
                    continue
                raise CheckpointError(f"tensor {name} in {base} has shape {tuple(info.shape)}, expected {hf_want} "
                                      f"for this config")
            dest[name] = (dst, idx, tr)
            src_dtypes.add(info.dtype)
    if too_many:
        li, e = next(iter(sorted(too_many.items())))
        raise CheckpointError(f"checkpoint {path!r} has {e + 1} experts in layer {li} "
                              f"(model.layers.{li}.mlp.experts.{e}...), but config.json says num_experts={E}: the "
                              "config does not describe this checkpoint")
    if router_errors:  # (after the expert count: more experts than the config also gives a bigger router)
        raise CheckpointError(router_errors[0])
    if dense_in_moe or moe_in_dense:
        bad = (dense_in_moe or moe_in_dense)[:4]
        raise CheckpointError(f"checkpoint {path!r} does not match first_k_dense_replace={Ld} of config.json: "
                              f"{'dense MLP tensors in MoE layers' if dense_in_moe else 'MoE tensors in dense layers'}"
                              f", e.g. {bad}")
    if wm is not None:
        wrong = [n for n, fn in wm.items() if where.get(n) != os.path.basename(fn)]
        if wrong:
            raise CheckpointError(f"{index} does not match its shards: {len(wrong)} tensor(s) are not where the index "
                                  f"says, e.g. {wrong[:4]}")
    filled = {(d, i) for d, i, _ in dest.values()}
    missing = [k for k in expected if k not in filled]
    if missing:
        miss_exp = [k for k in missing if k[0][0] == "moe" and k[0][1] in ("w_gate", "w_up", "w_down")]
        names = [_hf_name(p, i, Ld) for p, i in missing]
        if miss_exp:
            per_layer = {}
            for (p, (li, e)) in miss_exp:
                per_layer.setdefault(li + Ld, set()).add(e)
            li, es = next(iter(sorted(per_layer.items())))
            have = E - len(es)
            raise CheckpointError(
                f"checkpoint {path!r} is missing {len(miss_exp)} expert tensor(s): config.json says num_experts={E} "
                f"in each of layers {Ld}..{L - 1}, but layer {li} has {have} of them (e.g. "
                f"{_hf_name(*miss_exp[0], Ld)} is absent); is this a dense checkpoint or a different config?")
        raise CheckpointError(f"checkpoint {path!r} is missing {len(missing)} tensor(s) the config needs: "
                              f"{names[:8]}{' ...' if len(names) > 8 else ''}")
    if extra:
        raise CheckpointError(f"checkpoint {path!r} has {len(extra)} unexpected tensor(s) for an LLaDA2 MoE model: "
                              f"{extra[:8]}{' ...' if len(extra) > 8 else ''}")
    return CheckpointPlan(shards, dest, src_dtypes)


def load_hf_params(path: str, cfg: ModelConfig, dtype=np.float32, on_shard: Callable[[str], None] | None = None,
                   on_tensor: Callable[[str, str], None] | None = None, plan: CheckpointPlan | None = None,
                   quantize=None, lora=None) -> dict:
    """The params pytree of numpy arrays (router and expert bias always float32); with `quantize`, every linear
    leaf including the stacked expert matrices is int8 (a QArray slot quantized tensor by tensor)."""
    if lora is not None:
        raise CheckpointError("LoRA adapters are not supported for LLaDA2 MoE checkpoints")
    qcfg = quant.resolve(quantize)
    if plan is None:
        plan = plan_checkpoint(path, cfg)
    shapes = llada2_moe.param_shapes(cfg)
    qtop = qcfg.top_leaves() if qcfg is not None else ()

    def alloc(name, s, quantized, dt):
        if not quantized:
            return _aligned_empty(s, dt)
        ax = quant.reduce_axis(name) % len(s)
        return quant.QArray(_aligned_empty(s, np.int8),
                            _aligned_empty(tuple(1 if i == ax else d for i, d in enumerate(s)), np.float32),
                            np.dtype(dtype))

    out: dict = {}
    for k, s in shapes.items():
        if isinstance(s, dict):
            out[k] = {n: alloc(n, ss, qcfg is not None and n in LINEAR,
                               np.float32 if n in llada2_moe.FLOAT32_LEAVES else dtype) for n, ss in s.items()}
        else:
            out[k] = alloc(k, s, k in qtop, dtype)
    H, K, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    splits = (("q", 0, H * hd), ("k", H * hd, (H + K) * hd), ("v", (H + K) * hd, (H + 2 * K) * hd))

    def put(path, idx, arr):
        slot = out[path[0]] if len(path) == 1 else out[path[0]][path[1]]
        if isinstance(slot, quant.QArray):
            quant.quantize_np(arr, quant.reduce_axis(path[-1]), out=(slot.q[idx], slot.scale[idx]))
        elif idx:
            slot[idx] = arr
        else:
            slot[...] = arr

    for fname, header in plan.shards:
        for name, arr in _iter_shard(fname, header):
            path, idx, tr = plan.dest[name]
            if path == ("layers", "wqkv"):
                for c, a, b in splits:
                    put(("layers", f"w{c}"), idx, arr[a:b].T)
            elif path == ("layers", "bqkv"):
                for c, a, b in splits:
                    put(("layers", f"b{c}"), idx, arr[a:b])
            else:
                put(path, idx, arr.T if tr else arr)
            del arr
            if on_tensor:
                on_tensor(fname, name)
        if on_shard:
            on_shard(fname)
    return out
