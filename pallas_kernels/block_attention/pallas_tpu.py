"""Pallas TPU (Mosaic) flash-attention kernel for block attention.

Same contract as `reference.block_attention` (read its docstring): a window of T queries at absolute buffer indices
`q_index` attends over all S keys of the KV buffer, masked by `key_valid` and optionally by the block-causal rule
`q_index // block_size >= k_index // block_size`; GQA with H = K * G; float32 softmax; fully-masked rows give zeros.

Design (see docs/kernels.md):
  * grid (B, H, T/bt, S/bk); the last axis walks the key tiles ("arbitrary"), the others are "parallel".
  * online (flash) softmax: running max m, running sum l and the unnormalised fp32 accumulator live in VMEM scratch
    across the key axis; the output tile is written once, on the last key step.
  * GQA: query head h reads kv head h // G -- done purely in the K/V index_map, nothing is repeated in HBM.
  * masks are built in-kernel: key index = tile start + iota; key padding from the `key_valid` tile; block-causal as
    `k_index < (q_index // block_size + 1) * block_size` where the per-query limit is precomputed by the wrapper
    (so the kernel needs no integer division).
  * tile skipping: per (batch row, query tile) the wrapper computes the range [lo, hi) of key tiles that hold at
    least one unmasked key (left padding, unused buffer tail, block-causal horizon) and passes it by scalar
    prefetch. Outside the range the compute is skipped (`pl.when`) and the K/V index_map is clamped into the range
    so the pipeline does not DMA a new tile.
  * layout: for head_dim % 128 == 0 the [B, T, H, D] / [B, S, K, D] arrays are viewed as [B, T, H*D] / [B, S, K*D]
    (free reshapes) and a head is a D-wide lane block, so no transposes are needed; otherwise (e.g. D = 64) the
    wrapper transposes to head-major [B, H, T, D] / [B, K, S, D].
  * padding: T is padded to a multiple of the query tile, S to a multiple of the key tile (a multiple of 128);
    padded keys are marked invalid, padded query rows are sliced off.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_attention.tiling import check_args, padded_masks, round_up, tile_ranges

LANES = 128
DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 512


def _sublanes(dtype) -> int:
    # Minimum second-minor tile for a dtype on TPU: 8 rows of 32-bit, 16 of 16-bit, 32 of 8-bit.
    return max(8, 32 // jnp.dtype(dtype).itemsize)


def choose_tiles(T: int, S: int, dtype, block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K):
    """Return (bt, Tp, bk, Sp): query tile, padded T, key tile, padded S."""
    sub = _sublanes(dtype)
    bt = min(round_up(block_q, sub), round_up(T, sub))
    Tp = round_up(T, bt)
    cap = max(LANES, block_k // LANES * LANES)
    if S % LANES == 0:
        # Largest multiple of 128 <= cap dividing S: a 128-aligned cache is used in place (no padding copy).
        bk = next(c for c in range(min(cap, S), 0, -LANES) if S % c == 0)
    else:
        # The cache has to be padded (copied) anyway: pad it to a multiple of the full tile.
        bk = min(cap, round_up(S, LANES))
    return bt, Tp, bk, round_up(S, bk)


def _lanes(x, n: int):
    """(rows, 128) lane-replicated column -> (rows, n)."""
    if n == LANES:
        return x
    if n % LANES == 0:
        return jnp.tile(x, (1, n // LANES))
    if n < LANES:
        return x[:, :n]
    raise NotImplementedError(f"width {n} must be < 128 or a multiple of 128")


def _kernel(lo_ref, hi_ref, *refs, scale: float, n_t: int, bk: int, causal: bool, precision):
    if causal:
        qlim_ref, kvalid_ref, q_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc_sc = refs
    else:
        kvalid_ref, q_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc_sc = refs
        qlim_ref = None
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    lo = lo_ref[b * n_t + i]
    hi = hi_ref[b * n_t + i]
    bt, d = acc_sc.shape

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when((j >= lo) & (j < hi))
    def _step():
        q = q_ref[...]
        k = k_ref[...]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                preferred_element_type=jnp.float32) * scale          # [bt, bk]
        mask = jnp.broadcast_to(kvalid_ref[...] != 0, (bt, bk))                    # key padding
        if causal:
            k_idx = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bt, bk), 1)
            mask = mask & (k_idx < _lanes(qlim_ref[...], bk))                      # block-causal
        s = jnp.where(mask, s, -jnp.inf)
        m_prev = m_sc[...]                                                          # [bt, 128]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)                         # all-masked so far
        p = jnp.exp(s - _lanes(m_safe, bk))                                          # masked -> exp(-inf) = 0
        alpha = jnp.exp(m_prev - m_safe)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        m_sc[...] = m_next
        v = v_ref[...]
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)               # [bt, d]
        acc_sc[...] = acc_sc[...] * _lanes(alpha, d) + pv

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l = l_sc[...]
        inv = jnp.where(l == 0.0, 0.0, 1.0 / jnp.where(l == 0.0, 1.0, l))       # fully-masked row -> 0
        o_ref[...] = (acc_sc[...] * _lanes(inv, d)).astype(o_ref.dtype)


def block_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, key_valid_BxS, q_index_BxT=None, *, block_size=0,
                    scale=None, interpret=False, block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K):
    B, T, H, D = q_BxTxHxD.shape
    _, S, K, Dk = k_BxSxKxD.shape
    causal = check_args(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, key_valid_BxS, q_index_BxT, block_size)
    G = H // K
    dtype = q_BxTxHxD.dtype
    scale = D ** -0.5 if scale is None else float(scale)
    k_BxSxKxD = k_BxSxKxD.astype(dtype)
    v_BxSxKxD = v_BxSxKxD.astype(dtype)
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None

    bt, Tp, bk, Sp = choose_tiles(T, S, dtype, block_q, block_k)
    n_t, n_s = Tp // bt, Sp // bk

    key_valid, qlim = padded_masks(key_valid_BxS, q_index_BxT, block_size, Tp, Sp)  # k_index < qlim
    lo, hi = (x.reshape(-1) for x in tile_ranges(key_valid, qlim, T, bt, bk))          # flat [B * nT]

    flat = D % LANES == 0
    if flat:   # [B, T, H*D]: head h is lane block h, no transposes
        q = jnp.pad(q_BxTxHxD.reshape(B, T, H * D), ((0, 0), (0, Tp - T), (0, 0)))
        k = jnp.pad(k_BxSxKxD.reshape(B, S, K * D), ((0, 0), (0, Sp - S), (0, 0)))
        v = jnp.pad(v_BxSxKxD.reshape(B, S, K * D), ((0, 0), (0, Sp - S), (0, 0)))
        q_spec = pl.BlockSpec((None, bt, D), lambda b, h, i, j, lo_r, hi_r: (b, i, h))

        def kv_map(b, h, i, j, lo_r, hi_r):
            return (b, _clamp(j, lo_r, hi_r, b * n_t + i), jax.lax.div(h, G))
        kv_spec = pl.BlockSpec((None, bk, D), kv_map)
        out_shape = jax.ShapeDtypeStruct((B, Tp, H * D), dtype)
    else:      # head-major [B, H, T, D]
        q = jnp.pad(q_BxTxHxD.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Tp - T), (0, 0)))
        k = jnp.pad(k_BxSxKxD.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
        v = jnp.pad(v_BxSxKxD.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
        q_spec = pl.BlockSpec((None, None, bt, D), lambda b, h, i, j, lo_r, hi_r: (b, h, i, 0))

        def kv_map(b, h, i, j, lo_r, hi_r):
            return (b, jax.lax.div(h, G), _clamp(j, lo_r, hi_r, b * n_t + i), 0)
        kv_spec = pl.BlockSpec((None, None, bk, D), kv_map)
        out_shape = jax.ShapeDtypeStruct((B, H, Tp, D), dtype)

    def kvalid_map(b, h, i, j, lo_r, hi_r):
        return (b, 0, _clamp(j, lo_r, hi_r, b * n_t + i))
    kvalid_spec = pl.BlockSpec((None, 1, bk), kvalid_map)
    in_specs = [kvalid_spec, q_spec, kv_spec, kv_spec]
    args = [key_valid.astype(jnp.int32)[:, None, :], q, k, v]
    if causal:
        # Per-query key limit, replicated over the 128 lanes (a [bt, 128] tile is a native layout).
        in_specs.insert(0, pl.BlockSpec((None, bt, LANES), lambda b, h, i, j, lo_r, hi_r: (b, i, 0)))
        args.insert(0, jnp.broadcast_to(qlim[:, :, None], (B, Tp, LANES)))

    kernel = functools.partial(_kernel, scale=scale, n_t=n_t, bk=bk, causal=causal, precision=precision)
    itemsize = jnp.dtype(dtype).itemsize
    cost = pl.CostEstimate(
        flops=4 * B * H * Tp * Sp * D,
        transcendentals=B * H * Tp * Sp,
        bytes_accessed=(2 * B * Tp * H * D + 2 * B * H * n_t * Sp * D) * itemsize)
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, H, n_t, n_s),
            in_specs=in_specs,
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bt, LANES), jnp.float32),    # running max m
                            pltpu.VMEM((bt, LANES), jnp.float32),    # running sum l
                            pltpu.VMEM((bt, D), jnp.float32)]),      # accumulator
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY)),
        cost_estimate=cost,
        interpret=interpret,
        name="block_attention_tpu",
    )(lo, hi, *args)
    if flat:
        return out[:, :T].reshape(B, T, H, D)
    return out[:, :, :T].transpose(0, 2, 1, 3)


def _clamp(j, lo_r, hi_r, idx):
    """Key tile actually fetched at grid step j: j clamped into [lo, hi - 1] (no new DMA outside the range)."""
    lo = lo_r[idx]
    hi = hi_r[idx]
    return jnp.minimum(jnp.maximum(j, lo), jnp.maximum(hi - 1, lo))


def make(interpret=False, **tile_kwargs):
    """Return a callable with the reference signature. `interpret`: False, True or a `pltpu.InterpretParams`."""
    return functools.partial(block_attention, interpret=interpret, **tile_kwargs)

