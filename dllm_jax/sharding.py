"""Multi-device execution: a ("data", "model") device mesh, the sharding rules, and placement for generation.

Everything here is JAX's own machinery: `jax.make_mesh`, `NamedSharding`/`PartitionSpec`, jit in/out shardings and
`jax.lax.with_sharding_constraint`; the XLA partitioner (Shardy) propagates shardings through the model code, which
is unchanged.

Axis types: the mesh axes are `AxisType.Auto`. With `Explicit` axes ("sharding in types") every op whose output
sharding is ambiguous must be annotated by hand: on jax 0.10 the embedding gather over a vocab-sharded table
already fails with `ShardingTypeError: Use .at[...].get(out_sharding=)`, and contractions over a sharded dim (the
attention output projection and `w_down` under tensor parallelism) need `out_sharding=` too. Auto axes let us give
shardings only at the boundary (jit in_shardings/out_shardings, the params, the KV-cache constraint) and leave the
rest to the partitioner, so the pure-functional model code stays identical for one device and for many.

Sharding rules (the ONE place): each params leaf has logical axes (`PARAM_AXES`), each logical axis maps to a mesh
axis or to None (`RULES`):
  batch -> data; heads, kv_heads, mlp, vocab -> model (Megatron-style tensor parallelism: column-parallel
  wq/wk/wv/w_gate/w_up, row-parallel wo/w_down, vocab-parallel embed/lm_head); embed, layers, seq -> replicated.
Fallback: a logical axis whose size (number of heads, KV heads, MLP width, vocab) is not divisible by the mesh
axis size is replicated instead (e.g. the tiny Dream's 2 KV heads on model=4, or Dream-7B's 28 heads / 4 KV heads
on model=8). The result is still correct, it only costs memory; `describe(cfg, mesh)` lists what was replicated.
Fused head dims ([D, H*hd]) are checked on the head count, so a head is never split across devices.

Batches: `place_for_generate` shards the batch over "data"; a batch not divisible by the data axis size raises
`ShardingError` (pad the prompt list yourself, e.g. repeat a prompt, and drop the extra rows).
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dllm_jax.models.config import ModelConfig

AXES = ("data", "model")
# Mixture-of-Experts models (LLaDA 2.x) may add an "expert" axis: ("data", "expert", "model") = expert parallelism
# (each device group holds E / expert of the stacked experts) x tensor parallelism inside every expert and in the
# attention. A mesh without it (the 2-axis meshes above) simply replicates the expert dim.
MOE_AXES = ("data", "expert", "model")

# logical axis -> mesh axis (None = replicated)
RULES: dict[str, str | None] = {
    "batch": "data",
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "vocab": "model",
    "embed": None,
    "layers": None,
    "seq": None,
    "head_dim": None,
    "expert": "expert",
}

# params leaf name -> logical axes (layer leaves carry the stacked "layers" axis first)
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "final_norm": ("embed",),
    "lm_head": ("embed", "vocab"),
    "attn_norm": ("layers", "embed"),
    "wq": ("layers", "embed", "heads"),
    "wk": ("layers", "embed", "kv_heads"),
    "wv": ("layers", "embed", "kv_heads"),
    "bq": ("layers", "heads"),
    "bk": ("layers", "kv_heads"),
    "bv": ("layers", "kv_heads"),
    "wo": ("layers", "heads", "embed"),
    "mlp_norm": ("layers", "embed"),
    "w_gate": ("layers", "embed", "mlp"),
    "w_up": ("layers", "embed", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
}

# leaves of the LLaDA 2.x groups ("group/leaf": the same leaf name has another rank there)
PARAM_AXES.update({
    "layers/q_norm": ("layers", "head_dim"), "layers/k_norm": ("layers", "head_dim"),
    "dense/w_gate": ("layers", "embed", "mlp"), "dense/w_up": ("layers", "embed", "mlp"),
    "dense/w_down": ("layers", "mlp", "embed"),
    "moe/w_gate": ("layers", "expert", "embed", "moe_mlp"), "moe/w_up": ("layers", "expert", "embed", "moe_mlp"),
    "moe/w_down": ("layers", "expert", "moe_mlp", "embed"),
    "moe/s_gate": ("layers", "embed", "mlp"), "moe/s_up": ("layers", "embed", "mlp"),
    "moe/s_down": ("layers", "mlp", "embed"),
    "moe/router": ("layers", "embed", None), "moe/expert_bias": ("layers", None),  # small, routing: replicated
})
RULES["moe_mlp"] = "model"

# KV cache {"k","v"}: [L, B, S, K, hd]
KV_AXES = ("layers", "batch", "seq", "kv_heads", "head_dim")


class ShardingError(ValueError):
    """A bad mesh spec, or arrays that cannot be laid out on the mesh."""


# ----------------------------------------------------------------------------------------------------------- mesh

def make_mesh(data: int = 1, model: int = 1, devices=None) -> Mesh:
    """A ("data", "model") mesh with Auto axes over `devices` (default: all devices; the product must match)."""
    devices = list(jax.devices() if devices is None else devices)
    for name, n in (("data", data), ("model", model)):
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ShardingError(f"mesh axis {name!r} must be a positive integer, got {n!r}")
    if data * model != len(devices):
        raise ShardingError(f"mesh data={data} x model={model} = {data * model} devices, but {len(devices)} "
                            f"device(s) are available ({_device_kind(devices)}); the product must equal the "
                            "device count")
    return jax.make_mesh((int(data), int(model)), AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def make_moe_mesh(data: int = 1, expert: int = 1, model: int = 1, devices=None) -> Mesh:
    """A ("data", "expert", "model") mesh with Auto axes: rows over data, the stacked experts of every MoE layer over
    expert, heads / MLP widths (also inside each expert) over model. Dense leaves are replicated over expert."""
    devices = list(jax.devices() if devices is None else devices)
    for name, n in (("data", data), ("expert", expert), ("model", model)):
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ShardingError(f"mesh axis {name!r} must be a positive integer, got {n!r}")
    if data * expert * model != len(devices):
        raise ShardingError(f"mesh data={data} x expert={expert} x model={model} = {data * expert * model} devices, "
                            f"but {len(devices)} device(s) are available ({_device_kind(devices)}); the product must "
                            "equal the device count")
    return jax.make_mesh((int(data), int(expert), int(model)), MOE_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def _device_kind(devices) -> str:
    kinds = sorted({getattr(d, "device_kind", d.platform) for d in devices})
    return ", ".join(kinds)


_SPEC_ITEM = re.compile(r"^\s*([A-Za-z_]\w*)\s*=\s*(-?\d+)\s*$")


def mesh_from_spec(spec: str, devices=None, allow_subset: bool = False) -> Mesh:
    """Parse "data=2,model=4" into a mesh (an axis left out has size 1; one axis may be -1: the remaining devices).

    The product must equal the number of devices (default: all of `jax.devices()`); with allow_subset=True a smaller
    product takes the first data*model devices (the CLI does this, so `--mesh data=1,model=2` runs on 2 of 8).
    """
    devices = list(jax.devices() if devices is None else devices)
    if not isinstance(spec, str) or not spec.strip():
        raise ShardingError(f"mesh spec must be a non-empty string like 'data=2,model=4', got {spec!r}")
    sizes: dict[str, int] = {}
    for item in spec.split(","):
        m = _SPEC_ITEM.match(item)
        if not m:
            raise ShardingError(f"bad mesh spec {spec!r}: expected comma-separated AXIS=SIZE items like "
                                f"'data=2,model=4', got {item.strip()!r}")
        name, n = m.group(1), int(m.group(2))
        if name not in MOE_AXES:
            raise ShardingError(f"unknown mesh axis {name!r} in {spec!r}; the axes are {', '.join(AXES)} (and "
                                "expert for Mixture-of-Experts models)")
        if name in sizes:
            raise ShardingError(f"mesh axis {name!r} given twice in {spec!r}")
        if n == 0 or n < -1:
            raise ShardingError(f"mesh axis {name!r} must be a positive size (or -1 for the rest), got {n}")
        sizes[name] = n
    if list(sizes.values()).count(-1) > 1:
        raise ShardingError(f"at most one mesh axis may be -1 in {spec!r}")
    for name, n in sizes.items():
        if n == -1:
            rest = math.prod(v for k, v in sizes.items() if k != name)
            if len(devices) % rest:
                raise ShardingError(f"cannot infer {name}=-1 in {spec!r}: {len(devices)} devices are not divisible "
                                    f"by {rest}")
            sizes[name] = len(devices) // rest
    data, model = sizes.get("data", 1), sizes.get("model", 1)
    if "expert" in sizes:
        expert = sizes["expert"]
        if allow_subset and data * expert * model < len(devices):
            devices = devices[: data * expert * model]
        return make_moe_mesh(data, expert, model, devices=devices)
    if allow_subset and data * model < len(devices):
        devices = devices[: data * model]
    return make_mesh(data, model, devices=devices)


# ------------------------------------------------------------------------------------------------- sharding rules

def _logical_sizes(cfg: ModelConfig) -> dict[str, int]:
    return {"heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads, "mlp": cfg.mlp_hidden, "vocab": cfg.vocab_size,
            "embed": cfg.d_model, "layers": cfg.n_layers, "head_dim": cfg.head_dim,
            **({"expert": cfg.n_experts, "moe_mlp": cfg.moe_hidden} if cfg.n_experts else {})}


def spec_for(logical: tuple, shape: tuple, cfg: ModelConfig | None, mesh: Mesh) -> P:
    """PartitionSpec for an array with these logical axes: RULES, replicating any dim that does not divide."""
    sizes = _logical_sizes(cfg) if cfg is not None else {}
    out = []
    for ax, dim in zip(logical, shape):
        mesh_ax = RULES.get(ax) if ax is not None else None
        if mesh_ax is not None and mesh_ax not in mesh.shape:  # e.g. "expert" on a ("data", "model") mesh
            mesh_ax = None
        if mesh_ax is not None:
            n = mesh.shape[mesh_ax]
            if n == 1:
                mesh_ax = None
            elif dim % n or sizes.get(ax, dim) % n:  # the dim AND the logical count (e.g. heads in H*hd)
                mesh_ax = None
        out.append(mesh_ax)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _leaf_name(path) -> str:
    # The nearest dict key: arrays nested inside a params entry (the int8 values and scales of a
    # dllm_jax.quant.QArray, same rank as the float weight) take that entry's rule.
    for k in reversed(path):
        if isinstance(k, jax.tree_util.DictKey):
            return str(k.key)
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def axes_for(path) -> tuple | None:
    """Logical axes of the params leaf at `path` (tree path or tuple of names): "group/leaf" first (the MoE
    groups), then the leaf name."""
    names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)] if path and not isinstance(
        path[0], str) else list(path)
    if len(names) >= 2 and f"{names[-2]}/{names[-1]}" in PARAM_AXES:
        return PARAM_AXES[f"{names[-2]}/{names[-1]}"]
    return PARAM_AXES.get(names[-1] if names else _leaf_name(path))


def _tree_shardings(tree, cfg: ModelConfig, mesh: Mesh):
    """NamedSharding per leaf of a params(-like) tree; leaves without a rule (or of another rank) are replicated."""
    def one(path, leaf):
        axes = axes_for(path)
        shape = tuple(np.shape(leaf))
        if axes is None or len(axes) != len(shape):
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, spec_for(axes, shape, cfg, mesh))

    return jax.tree_util.tree_map_with_path(one, tree)


def param_shardings(cfg: ModelConfig, mesh: Mesh):
    """NamedSharding pytree matching `transformer.init_params(cfg)` (computed from shapes only, no weights)."""
    from dllm_jax.models.transformer import init_params

    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return _tree_shardings(shapes, cfg, mesh)


def shard_params(params, cfg: ModelConfig, mesh: Mesh):
    """Place a params pytree on the mesh by the rules (a no-op for leaves already placed that way)."""
    return jax.device_put(params, _tree_shardings(params, cfg, mesh))


def kv_sharding(cfg: ModelConfig, mesh: Mesh, batch: int, total_len: int) -> NamedSharding:
    """Sharding of each KV-cache array [L, B, S, K, hd]: batch over data, KV heads over model (as wk/wv)."""
    shape = (cfg.n_layers, batch, total_len, cfg.n_kv_heads, cfg.head_dim)
    return NamedSharding(mesh, spec_for(KV_AXES, shape, cfg, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 1, axis: int = 0) -> NamedSharding:
    """Shard dim `axis` of an ndim-array over "data" (every other dim replicated)."""
    spec = [None] * ndim
    spec[axis] = "data" if mesh.shape["data"] > 1 else None
    while spec and spec[-1] is None:
        spec.pop()
    return NamedSharding(mesh, P(*spec))


def describe(cfg: ModelConfig, mesh: Mesh) -> dict[str, str]:
    """Where each logical axis of this model goes on this mesh ("model", "data" or "replicated (why)")."""
    sizes = _logical_sizes(cfg)
    out = {}
    for ax, mesh_ax in RULES.items():
        if mesh_ax is None:
            out[ax] = "replicated"
        elif mesh_ax not in mesh.shape:
            out[ax] = f"replicated (no {mesh_ax} axis in the mesh)"
        elif mesh.shape[mesh_ax] == 1:
            out[ax] = f"replicated ({mesh_ax} axis has size 1)"
        elif ax in sizes and sizes[ax] % mesh.shape[mesh_ax]:
            out[ax] = f"replicated ({sizes[ax]} not divisible by {mesh_ax}={mesh.shape[mesh_ax]})"
        else:
            out[ax] = mesh_ax
    return out


# ----------------------------------------------------------------------------------------------------- generation

def check_batch(mesh: Mesh, batch: int) -> None:
    n = mesh.shape["data"]
    if batch % n:
        raise ShardingError(f"batch size {batch} is not divisible by the mesh's data axis ({n}); pass a multiple of "
                            f"{n} prompts (e.g. repeat a prompt and drop the extra rows) or use a smaller data axis")


def generate_shardings(model, mesh: Mesh, batch: int, trace_len: int = 0):
    """(in_shardings, out_shardings) of the generation program: params by the rules, rows over data."""
    row = batch_sharding(mesh, 1)
    row2 = batch_sharding(mesh, 2)
    params = _tree_shardings(model.params, model.cfg, mesh)
    in_sh = (params, row2, row2, row2, row)
    out_sh = {"x": row2, "nfe": row, "steps": NamedSharding(mesh, P()), "unfinished": row}
    if trace_len:
        col = batch_sharding(mesh, 2, axis=1)
        out_sh["trace"] = {"full": col, "s": col, "e": col, "n": col, "step_of": row2}
    return in_sh, out_sh


def place_for_generate(model, mesh: Mesh, arrays):
    """Put params (tensor-parallel by the rules) and the per-row arrays (batch over data) on the mesh.

    arrays: (x [B, L], key_valid [B, L], positions [B, L], keys [B]). Returns (params, arrays) placed exactly as the
    in_shardings of `generate_shardings`.
    """
    check_batch(mesh, int(arrays[0].shape[0]))
    params = shard_params(model.params, model.cfg, mesh)
    placed = tuple(jax.device_put(a, batch_sharding(mesh, np.ndim(a))) for a in arrays)
    return params, placed
