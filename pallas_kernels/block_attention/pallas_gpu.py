"""Pallas Triton (GPU) flash-attention kernel for block attention.

Same contract as `reference.block_attention` (read its docstring): a window of T queries at absolute buffer indices
`q_index` attends over all S keys of the KV buffer, masked by `key_valid` and optionally by the block-causal rule
`q_index // block_size >= k_index // block_size`; GQA with H = K * G; float32 softmax; fully-masked rows give zeros.

Design (see docs/kernels.md):
  * `pl.pallas_call` on the Triton backend (selected by `jax.experimental.pallas.triton.CompilerParams`), grid
    (B, H, T/bt): one program owns a [bt, D] query tile of one head and loops over key tiles with `lax.fori_loop`,
    keeping the online-softmax state (running max m, running sum l, fp32 accumulator) in registers.
  * the [B, T, H, D] / [B, S, K, D] arrays are used in place (strided BlockSpecs, no transposes); GQA maps query
    head h to kv head h // G in the K/V index_map.
  * masks are built in-kernel from iota: key padding from the `key_valid` row, block-causal as
    `k_index < (q_index // block_size + 1) * block_size` with the per-query limit precomputed by the wrapper.
  * tile skipping: the wrapper computes per (batch row, query tile) the range [lo, hi) of key tiles that can hold an
    unmasked key (left padding, unused buffer tail, block-causal horizon); the loop runs only over that range.
  * Triton needs power-of-two tile shapes: bt, bk and D are powers of two (bt, bk >= 16); T and S are padded to
    tile multiples in the wrapper, padded keys are marked invalid, padded query rows are sliced off.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.block_attention.tiling import check_args, padded_masks, round_up, tile_ranges

DEFAULT_BLOCK_Q = 64
DEFAULT_BLOCK_K = 64
MIN_TILE = 16  # smallest tl.dot operand dimension


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def choose_tiles(T: int, S: int, block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K):
    """Return (bt, Tp, bk, Sp): query tile, padded T, key tile, padded S (tiles are powers of two >= 16)."""
    if not (_is_pow2(block_q) and _is_pow2(block_k)) or min(block_q, block_k) < MIN_TILE:
        raise ValueError(f"block_q={block_q}, block_k={block_k} must be powers of two >= {MIN_TILE}")
    bt = min(block_q, max(MIN_TILE, pl.next_power_of_2(T)))
    bk = min(block_k, max(MIN_TILE, pl.next_power_of_2(S)))
    return bt, round_up(T, bt), bk, round_up(S, bk)


def _kernel(lo_ref, hi_ref, *refs, scale: float, bk: int, causal: bool, precision):
    if causal:
        qlim_ref, kvalid_ref, q_ref, k_ref, v_ref, o_ref = refs
    else:
        kvalid_ref, q_ref, k_ref, v_ref, o_ref = refs
        qlim_ref = None
    bt, d = q_ref.shape
    q = q_ref[...]                                                             # [bt, d], stays in registers
    qlim = qlim_ref[...] if causal else None                                   # [bt]

    def body(j, carry):
        acc, m_prev, l_prev = carry
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]                                         # [bk, d]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                preferred_element_type=jnp.float32) * scale   # [bt, bk]
        mask = (kvalid_ref[pl.ds(start, bk)] != 0)[None, :]                    # key padding
        if causal:
            k_idx = start + jax.lax.broadcasted_iota(jnp.int32, (bt, bk), 1)
            mask = mask & (k_idx < qlim[:, None])                              # block-causal
        s = jnp.where(mask, s, -jnp.inf)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)                     # row all-masked so far
        p = jnp.exp(s - m_safe[:, None])                                       # masked -> exp(-inf) = 0
        alpha = jnp.exp(m_prev - m_safe)
        l_next = alpha * l_prev + jnp.sum(p, axis=1)
        v = v_ref[pl.ds(start, bk), :]
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)           # [bt, d]
        return acc * alpha[:, None] + pv, m_next, l_next

    init = (jnp.zeros((bt, d), jnp.float32), jnp.full((bt,), -jnp.inf, jnp.float32), jnp.zeros((bt,), jnp.float32))
    acc, _, l = jax.lax.fori_loop(lo_ref[()], hi_ref[()], body, init)
    inv = jnp.where(l == 0.0, 0.0, 1.0 / jnp.where(l == 0.0, 1.0, l))          # fully-masked row -> 0
    o_ref[...] = (acc * inv[:, None]).astype(o_ref.dtype)


def block_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, key_valid_BxS, q_index_BxT=None, *, block_size=0,
                    scale=None, interpret=False, block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K,
                    num_warps=None, num_stages=2):
    B, T, H, D = q_BxTxHxD.shape
    _, S, K, Dk = k_BxSxKxD.shape
    causal = check_args(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, key_valid_BxS, q_index_BxT, block_size)
    if not _is_pow2(D) or D < MIN_TILE:
        raise ValueError(f"pallas_gpu needs a power-of-two head_dim >= {MIN_TILE}, got {D}")
    G = H // K
    dtype = q_BxTxHxD.dtype
    scale = D ** -0.5 if scale is None else float(scale)
    k_BxSxKxD = k_BxSxKxD.astype(dtype)
    v_BxSxKxD = v_BxSxKxD.astype(dtype)
    # fp32 inputs: IEEE fp32 dots (Triton's default for fp32 would be TF32).
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None

    bt, Tp, bk, Sp = choose_tiles(T, S, block_q, block_k)
    n_t = Tp // bt

    key_valid, qlim = padded_masks(key_valid_BxS, q_index_BxT, block_size, Tp, Sp)  # k_index < qlim
    lo, hi = tile_ranges(key_valid, qlim, T, bt, bk)

    q = jnp.pad(q_BxTxHxD, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
    k = jnp.pad(k_BxSxKxD, ((0, 0), (0, Sp - S), (0, 0), (0, 0)))
    v = jnp.pad(v_BxSxKxD, ((0, 0), (0, Sp - S), (0, 0), (0, 0)))

    q_spec = pl.BlockSpec((None, bt, None, D), lambda b, h, i: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, Sp, None, D), lambda b, h, i: (b, 0, jax.lax.div(h, G), 0))
    range_spec = pl.BlockSpec((None, None), lambda b, h, i: (b, i))
    in_specs = [range_spec, range_spec, pl.BlockSpec((None, Sp), lambda b, h, i: (b, 0)), q_spec, kv_spec, kv_spec]
    args = [lo, hi, key_valid.astype(jnp.int32), q, k, v]
    if causal:
        in_specs.insert(2, pl.BlockSpec((None, bt), lambda b, h, i: (b, i)))
        args.insert(2, qlim)

    if num_warps is None:
        num_warps = 4 if D <= 64 else 8
    kernel = functools.partial(_kernel, scale=scale, bk=bk, causal=causal, precision=precision)
    itemsize = jnp.dtype(dtype).itemsize
    cost = pl.CostEstimate(
        flops=4 * B * H * Tp * Sp * D,
        transcendentals=B * H * Tp * Sp,
        bytes_accessed=(2 * B * Tp * H * D + 2 * B * H * n_t * Sp * D) * itemsize)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, Tp, H, D), dtype),
        grid=(B, H, n_t),
        in_specs=in_specs,
        out_specs=q_spec,
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        cost_estimate=cost,
        interpret=interpret,
        name="block_attention_gpu",
    )(*args)
    return out[:, :T]


def make(interpret=False, **tile_kwargs):
    """Return a callable with the reference signature (runs in the Pallas interpreter when `interpret`)."""
    return functools.partial(block_attention, interpret=interpret, **tile_kwargs)
