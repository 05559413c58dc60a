"""Weight-only int8 quantization: per-output-channel symmetric int8 weights, dequantized inside the jitted matmul.

Modes (`quantize=` of `dllm_jax.load`, `--quantize` of the converter):
  "int8"      every linear weight of every layer (wq, wk, wv, wo, w_gate, w_up, w_down) is int8; the embedding and
              the LM head stay in the model dtype (they are read once per forward and hold most of the outliers).
  "int8-all"  the same plus the embedding table (one scale per token row) and the LM head (one scale per vocab
              column). From Python, `QuantConfig(embed=..., lm_head=...)` picks either of the two separately.
Norm weights and the q/k/v biases are never quantized (tiny, and sensitive).

A quantized leaf is a `QArray` pytree node in place of the float array:
  q      int8, exactly the float weight's shape (Flax [in, out] layout, stacked layers first);
  scale  float32, the weight's shape with the reduced (input) axis kept as size 1: [L, 1, out] for a layer
         matrix, [1, V] for the LM head, [V, 1] for the embedding (one scale per row = per token);
  dtype  (static) the float dtype the model computes in (the dtype the weight would have had).
w ~= q * scale with scale = max|w| / 127 over each output channel and q = round(w / scale) in [-127, 127]
(symmetric; -128 unused), so the per-element error is at most scale / 2 = max|w_channel| / 254.

Matmul: y = einsum(x, q.astype(x.dtype)) * scale, the scale applied to the [.., out] result after the
contraction. Because each output channel has one scale, this equals x @ (q * scale) exactly (up to rounding),
but it never builds the dequantized weight: the only weight-sized value is the int8 -> x.dtype convert, an
elementwise producer of the dot that XLA fuses into the matmul operand on TPU (and into the Triton GEMM on GPU),
and that, even where a backend does not fuse it (XLA:CPU), exists for one layer's matrix at a time inside the
layer scan -- never a full bf16 copy of the model. Multiplying the scale before the contraction would instead
need q * scale materialized at weight size. The int8 -> bf16/f32 convert is exact (|q| <= 127 < 2^8), the
contraction accumulates in float32 (preferred_element_type) and the scaled result is cast back to x.dtype, so an
int8 layer rounds once, like the float layer does. Activations stay in the model dtype (weight-only: no W8A8).

Checkpoints: a converted checkpoint stores the QArray as {"q", "scale"} under the leaf's name and records
`"quantization": {"method": "int8", "embed": ..., "lm_head": ...}` in dllm_jax_config.json; `abstract_params`
below builds the matching restore target. Sharding: `q` shards exactly like the float leaf and `scale` along the
output axis (its size-1 input axis is replicated by `dllm_jax.sharding.spec_for`'s divisibility fallback).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

LINEAR = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")  # leaves of params["layers"]
# MoE (LLaDA 2.x): the stacked experts [L, E, in, out] reuse w_gate/w_up/w_down under params["moe"], the shared
# expert is s_gate/s_up/s_down; every group of layer leaves ("layers", "dense", "moe") is quantized by these names.
# The router and its bias stay float32 (routing decisions are discrete).
MOE_LINEAR = ("s_gate", "s_up", "s_down")
QMAX = 127
_INV_QMAX = np.float32(1.0 / QMAX)


class QuantError(ValueError):
    """A bad `quantize` value, or a quantization that does not fit the checkpoint."""


# -------------------------------------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Which leaves are int8: all linear layer weights, plus optionally the embedding and the LM head."""

    method: str = "int8"
    embed: bool = False
    lm_head: bool = False

    def __post_init__(self):
        if self.method != "int8":
            raise QuantError(f"unknown quantization method {self.method!r}; supported: 'int8'")

    @property
    def name(self) -> str:
        for k, v in MODES.items():
            if v == self:
                return k
        return f"int8{'+embed' if self.embed else ''}{'+lm_head' if self.lm_head else ''}"

    def top_leaves(self) -> tuple[str, ...]:
        return tuple(k for k, on in (("embed", self.embed), ("lm_head", self.lm_head)) if on)

    def covers(self, other: "QuantConfig") -> bool:
        return (self.embed or not other.embed) and (self.lm_head or not other.lm_head)

    def union(self, other: "QuantConfig") -> "QuantConfig":
        return QuantConfig(self.method, self.embed or other.embed, self.lm_head or other.lm_head)

    def to_meta(self) -> dict:
        """The `quantization` record of dllm_jax_config.json."""
        return {"method": self.method, "mode": self.name, "embed": self.embed, "lm_head": self.lm_head,
                "linear": list(LINEAR), "granularity": "per-output-channel symmetric", "scale_dtype": "float32"}

    @staticmethod
    def from_meta(meta) -> "QuantConfig | None":
        if meta is None:
            return None
        try:
            return QuantConfig(meta["method"], bool(meta.get("embed", False)), bool(meta.get("lm_head", False)))
        except (KeyError, TypeError) as e:
            raise QuantError(f"bad quantization record {meta!r}: {e}") from None


MODES = {"int8": QuantConfig(), "int8-all": QuantConfig(embed=True, lm_head=True)}


def resolve(quantize) -> QuantConfig | None:
    """None/""/"none" -> None; "int8" / "int8-all" (also "int8_all") -> QuantConfig; a QuantConfig passes through.
    Anything else raises QuantError naming the accepted values."""
    if quantize is None or quantize is False or (isinstance(quantize, str) and quantize.lower() in ("", "none")):
        return None
    if isinstance(quantize, QuantConfig):
        return quantize
    if isinstance(quantize, str) and quantize.lower().replace("_", "-") in MODES:
        return MODES[quantize.lower().replace("_", "-")]
    raise QuantError(f"unknown quantize={quantize!r}; expected None, one of {sorted(MODES)} (int8: linear layer "
                     f"weights; int8-all: also the embedding and LM head) or a dllm_jax.quant.QuantConfig")


# -------------------------------------------------------------------------------------------------------- QArray

@dataclasses.dataclass(frozen=True)
class QArray:
    """An int8 weight with float32 per-output-channel scales (a pytree node: `q` and `scale` are its leaves)."""

    q: jax.Array
    scale: jax.Array
    dtype: np.dtype = dataclasses.field(default=np.dtype(np.float32))  # static: the compute dtype

    def __post_init__(self):  # one spelling of the dtype, so equal trees have equal (hashable) treedefs
        object.__setattr__(self, "dtype", np.dtype(self.dtype))

    @property
    def shape(self):
        return tuple(self.q.shape)

    @property
    def ndim(self):
        return len(self.q.shape)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.q) + _nbytes(self.scale)

    def dequantize(self):
        return (self.q.astype(jnp.float32) * self.scale).astype(self.dtype)


jax.tree_util.register_dataclass(QArray, data_fields=["q", "scale"], meta_fields=["dtype"])


def _nbytes(a) -> int:
    return int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize


def is_qarray(x) -> bool:
    return isinstance(x, QArray)


def reduce_axis(name: str) -> int:
    """The axis a leaf's scale is reduced over: the input axis (-2) of a [.., in, out] matrix; the embedding
    [V, D] is quantized per row (-1: one scale per token)."""
    return -1 if name == "embed" else -2


# ------------------------------------------------------------------------------------------------- quantization

@partial(jax.jit, static_argnames=("axis",))
def _quantize_jax(w, axis):
    # Written as multiplications by explicit float32 constants/reciprocals (XLA rewrites divisions by constants and
    # broadcasts into such multiplications anyway), so the numpy version below is bit-identical.
    w32 = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w32), axis=axis, keepdims=True) * _INV_QMAX
    inv = 1.0 / jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(w32 * inv), -QMAX, QMAX).astype(jnp.int8)
    return q, scale


def quantize_array(w, axis: int = -2, dtype=None) -> QArray:
    """Quantize one float array (jax or numpy) with one scale per slice along `axis` (kept as size 1)."""
    dtype = np.dtype(dtype if dtype is not None else w.dtype)
    q, scale = _quantize_jax(jnp.asarray(w), axis % w.ndim)
    return QArray(q, scale, dtype)


def quantize_np(w: np.ndarray, axis: int, out=None, chunk_elems: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """The same quantization on the host in numpy (bit-identical to `quantize_array`), chunked along the channel
    axes so the float32 temporaries stay ~64 MiB whatever the tensor size. `w` may be a strided view (e.g. the
    transpose of an HF [out, in] tensor). Returns (q int8 [w.shape], scale float32 [w.shape, axis kept as 1]),
    written into `out=(q, scale)` when given (the streaming loader passes its preallocated slots)."""
    axis = axis % w.ndim
    sshape = tuple(1 if i == axis else s for i, s in enumerate(w.shape))
    if out is None:
        out = np.empty(w.shape, np.int8), np.empty(sshape, np.float32)
    q, scale = out
    if q.shape != w.shape or q.dtype != np.int8 or scale.shape != sshape or scale.dtype != np.float32:
        raise QuantError(f"quantize_np: out buffers {q.dtype}{q.shape} / {scale.dtype}{scale.shape} do not match "
                         f"int8{w.shape} / float32{sshape}")
    c_ax = w.ndim - 1 if axis != w.ndim - 1 else 0  # chunk along a channel axis
    step = max(1, chunk_elems // max(1, w.size // max(1, w.shape[c_ax])))
    for c0 in range(0, w.shape[c_ax], step):
        sl = [slice(None)] * w.ndim
        sl[c_ax] = slice(c0, c0 + step)
        sl = tuple(sl)
        w32 = np.asarray(w[sl], np.float32)
        s = np.max(np.abs(w32), axis=axis, keepdims=True) * _INV_QMAX
        np.multiply(w32, np.float32(1) / np.where(s > 0, s, np.float32(1)), out=w32)
        np.rint(w32, out=w32)
        np.clip(w32, -QMAX, QMAX, out=w32)
        q[sl] = w32
        scale[sl] = s
    return q, scale


def dequantize(w):
    """A float array back from a QArray (plain arrays pass through); for tests and error measurements."""
    return w.dequantize() if isinstance(w, QArray) else w


def einsum(spec: str, x, w: QArray, out_dtype=None):
    """x (activations) times an int8 weight: the contraction on the exactly converted int8 values, accumulated in
    float32, then the per-output-channel scale on the result (broadcast over its last axis)."""
    y = jnp.einsum(spec, x, w.q.astype(x.dtype), preferred_element_type=jnp.float32)
    return (y * w.scale).astype(out_dtype or x.dtype)


def take(w: QArray, tokens):
    """Embedding lookup from an int8 table with per-row scales: gather int8 rows and their scales, then scale."""
    rows = jnp.take(w.q, tokens, axis=0).astype(jnp.float32) * jnp.take(w.scale, tokens, axis=0)
    return rows.astype(w.dtype)


def _leaf_names(cfg: QuantConfig, tree=None):
    # a tied head has no lm_head leaf (the head is embed.T): only the top leaves the tree has
    top = [(k,) for k in cfg.top_leaves() if tree is None or k in tree]
    if tree is None or set(tree) <= {"layers", "embed", "lm_head", "final_norm"}:
        return [("layers", k) for k in LINEAR] + top
    groups = [(g, k) for g, sub in tree.items() if isinstance(sub, dict) for k in LINEAR + MOE_LINEAR if k in sub]
    return groups + top


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _replaced(tree, path, value):
    if len(path) == 1:
        return {**tree, path[0]: value}
    return {**tree, path[0]: _replaced(tree[path[0]], path[1:], value)}


def quantize_params(params: dict, quantize="int8") -> dict:
    """A params pytree with the chosen float leaves replaced by QArrays (leaves already quantized are kept).
    Runs where the arrays live; the float tree is not modified."""
    cfg = resolve(quantize)
    if cfg is None:
        return params
    out = params
    for path in _leaf_names(cfg, params):
        w = _get(params, path)
        if not isinstance(w, QArray):
            out = _replaced(out, path, quantize_array(w, reduce_axis(path[-1])))
    return out


def quantization_of(params: dict) -> QuantConfig | None:
    """The QuantConfig a params tree is quantized with (None when its layer matrices are float)."""
    if not any(isinstance(params["layers"].get(k), QArray) for k in LINEAR):
        return None
    return QuantConfig(embed=isinstance(params.get("embed"), QArray), lm_head=isinstance(params.get("lm_head"), QArray))


def quantize_model(model, quantize="int8"):
    """`model` with int8 weights (see `quantize_params`); a model already quantized that way is returned as is."""
    cfg = resolve(quantize)
    if cfg is None:
        return model
    have = quantization_of(model.params)
    if have is not None and have.covers(cfg):
        return model
    return dataclasses.replace(model, params=quantize_params(model.params, cfg))


def cast_params(params: dict, dtype) -> dict:
    """Every float leaf -> jax array of `dtype`; a QArray keeps int8 values and float32 scales (as jax arrays) and
    takes `dtype` as its compute dtype."""
    def one(a):
        if isinstance(a, QArray):
            return QArray(jnp.asarray(a.q), jnp.asarray(a.scale), np.dtype(dtype))
        return jnp.asarray(a, dtype)

    return jax.tree.map(one, params, is_leaf=is_qarray)


# ------------------------------------------------------------------------------------------ shapes and shardings

def abstract_params(shapes: dict, quantize, dtype) -> dict:
    """ShapeDtypeStruct tree of the quantized params from the float one (`jax.eval_shape` of init_params)."""
    cfg = resolve(quantize)
    if cfg is None:
        return shapes
    out = shapes
    for path in _leaf_names(cfg, shapes):
        s = _get(shapes, path)
        ax = reduce_axis(path[-1]) % len(s.shape)
        sshape = tuple(1 if i == ax else d for i, d in enumerate(s.shape))
        out = _replaced(out, path, QArray(jax.ShapeDtypeStruct(s.shape, jnp.int8),
                                          jax.ShapeDtypeStruct(sshape, jnp.float32), np.dtype(dtype)))
    return out


def param_shardings(model_cfg, mesh, quantize):
    """NamedShardings matching `abstract_params(..., quantize)`: q like the float leaf, scale by the same logical
    axes (the size-1 reduced axis falls back to replicated). Uses only dllm_jax.sharding's public rules."""
    from jax.sharding import NamedSharding

    from dllm_jax import sharding
    from dllm_jax.models.transformer import init_params

    float_sh = sharding.param_shardings(model_cfg, mesh)
    cfg = resolve(quantize)
    if cfg is None:
        return float_sh
    shapes = jax.eval_shape(lambda: init_params(model_cfg, jax.random.key(0)))
    qshapes = abstract_params(shapes, cfg, jnp.float32)
    out = float_sh
    for path in _leaf_names(cfg, qshapes):
        qs = _get(qshapes, path)
        spec = sharding.spec_for(sharding.axes_for(path), qs.scale.shape, model_cfg, mesh)
        out = _replaced(out, path, QArray(_get(float_sh, path), NamedSharding(mesh, spec), qs.dtype))
    return out


def param_bytes(tree) -> dict:
    """Bytes of a params (or ShapeDtypeStruct) tree: {"linear": layer matrices, "embed_head": embedding + LM head,
    "other": norms and biases, "total": all}. QArrays count their int8 values plus their scales."""
    out = {"linear": 0, "embed_head": 0, "other": 0}

    def size(a):
        return a.nbytes if isinstance(a, QArray) else _nbytes(a)

    for k, v in tree.items():
        if isinstance(v, dict):  # "layers" (and the MoE families' "dense" / "moe" groups)
            for n, a in v.items():
                out["linear" if n in LINEAR + MOE_LINEAR else "other"] += size(a)
        else:
            out["embed_head" if k in ("embed", "lm_head") else "other"] += size(v)
    out["total"] = sum(out.values())
    return out
