"""Pallas Mosaic GPU (Hopper) flash-attention kernel for block attention.

Same contract as `reference.block_attention` (read its docstring): a window of T queries at absolute buffer indices
`q_index` attends over all S keys of the KV buffer, masked by `key_valid` and optionally by the block-causal rule
`q_index // block_size >= k_index // block_size`; GQA with H = K * G; float32 softmax; fully-masked rows give zeros.

Why a second GPU kernel: Pallas' Triton backend (`pallas_gpu.py`) is deprecated from JAX 0.11 on; Mosaic GPU is the
GPU backend that stays. Design (see docs/kernels.md):
  * `plgpu.kernel` (Mosaic GPU, Lane lowering semantics: array-level jnp ops on register fragments with explicit
    WGMMA layouts), grid (H, T/bt, B), one warpgroup per program. Every operand stays in GMEM; the kernel moves
    tiles itself with TMA copies (`copy_gmem_to_smem`, completion tracked by SMEM barriers), like the official
    FlashAttention-3 example `jax.experimental.pallas.ops.gpu.attention_mgpu`, minus its warp specialisation.
  * one program owns a [bt, D] query tile of one head (bt = 64: the M of one Hopper wgmma) and loops over the key
    tiles [lo, hi) with `lax.fori_loop`; K/V tiles are double-buffered (the copy of tile j + 1 is in flight while
    tile j is computed). Online-softmax state (running max m, sum l, fp32 accumulator) lives in registers.
  * S = Q Kᵀ is a wgmma from SMEM (K transposed by the SMEM view); P is written to SMEM in bf16 and P V is a second
    wgmma. (Hopper's wgmma could read P from registers; the Mosaic GPU interpreter that proves this kernel on CPU
    cannot, so both run the same SMEM path.)
  * masks in-kernel: the key-padding row of each key tile arrives by TMA beside K/V; block-causal is
    `k_index < qlim` with the per-query limit `(q_index // block_size + 1) * block_size` precomputed by the wrapper.
  * tile skipping: `tiling.tile_ranges` gives per (batch row, query tile) the range [lo, hi) of key tiles that can
    hold an unmasked key; the loop bounds are read from GMEM, so skipped tiles are neither copied nor computed.
  * tile shapes: bt = 64, bk in {64, 128}; T and S are padded to tile multiples in the wrapper (padded keys
    invalid, padded query rows sliced off); D is padded to a multiple of 64 (the 128-byte swizzle of a bf16 row;
    LLaDA/Dream's 128 needs no padding, a copy of q/k/v otherwise).
  * dtypes: wgmma multiplies 16-bit floats (fp32 operands would run as TF32, and only K-major, which V is not).
    bf16 / fp16 inputs are used as they are. float32 inputs are split in the wrapper into three bf16 parts
    x = x0 + x1 + x2 (24 significant bits) and both matmuls are six bf16 wgmmas, the terms x_a·y_c with a + c <= 2
    (the "bf16x6" scheme of XLA's Precision.HIGHEST on TPU): fp32-level results (the reference within 1e-5; the
    cheaper bf16x3 gave ~16 bits, errors of 3e-5 at O(1) outputs). Three parts do not fit SMEM twice, so float32
    runs with single-buffered K/V tiles: meant for tests and conformance, not speed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.block_attention.tiling import check_args, padded_masks, round_up, tile_ranges

BLOCK_Q = 64            # rows of one warpgroup wgmma: the query tile is fixed
DEFAULT_BLOCK_K = 64
SWIZZLE = 128           # bytes; a 128-byte swizzled row is 64 bf16 elements


def interpret_params(interpret):
    """Map `interpret` to what Mosaic GPU's `pallas_call`/`kernel` accepts: False -> None (compile for the GPU);
    True -> the Mosaic GPU interpreter's params (simulated SMEM, TMA copies, barriers and wgmma on CPU); an
    instance passes through. Raises `NotImplementedError` when this jax has no Mosaic GPU interpreter."""
    if interpret is False or interpret is None:
        return None
    if interpret is not True:
        return interpret
    cls = getattr(plgpu, "InterpretParams", None)
    if cls is None:
        try:   # jax 0.10: not yet public
            from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as cls
        except ImportError as e:
            raise NotImplementedError(f"this jax ({jax.__version__}) has no Mosaic GPU interpreter: {e}") from e
    return cls()


def choose_tiles(T: int, S: int, block_k: int = DEFAULT_BLOCK_K, dtype=jnp.bfloat16):
    """Return (bt, Tp, bk, Sp): query tile (64), padded T, key tile, padded S. float32 inputs (three bf16 parts per
    operand) fit the 227 KiB of SMEM only with 64-key tiles."""
    if block_k not in (64, 128):
        raise ValueError(f"block_k={block_k} must be 64 or 128")
    if block_k == 128 and jnp.dtype(dtype) == jnp.float32:
        raise ValueError("block_k=128 exceeds shared memory for float32 inputs; use 64")
    bk = block_k if S > 64 else 64
    return BLOCK_Q, round_up(T, BLOCK_Q), bk, round_up(S, bk)


def _split_bf16(x, parts=3):
    """float32 x -> [parts, ...] bf16 with x0 + x1 + x2 = x to 24 significant bits (x0 the leading part)."""
    out = []
    for _ in range(parts):
        out.append(x.astype(jnp.bfloat16))
        x = x - out[-1].astype(jnp.float32)
    return jnp.stack(out)


def _kernel(q_ref, k_ref, v_ref, kvalid_ref, qlim_ref, range_ref, o_ref, scoped, *, scale, bk, group, causal,
            interpret):
    """One program: query tile `i` of head `h` in batch row `b`. Operand refs are in GMEM with a leading part axis
    P (1: the 16-bit inputs; 3: the bf16 parts of float32 inputs); `scoped` holds the SMEM buffers and barriers.
    K/V tiles are double-buffered (the copy of tile j + 1 overlaps the compute of tile j) when SMEM has two
    slots, else each tile is copied and then computed."""
    (q_smem, k_smem, v_smem, p_smem, kv_smem, ql_smem, o_smem), (q_bar, ql_bar, k_bar, v_bar, m_bar) = scoped
    h, i, b = jax.lax.axis_index("heads"), jax.lax.axis_index("q_tile"), jax.lax.axis_index("batch")
    kvh = jax.lax.div(h, jnp.int32(group))
    parts, bt, d = q_smem.shape
    slots = k_smem.shape[0]

    def layout(x, lay):   # a register-placement hint; the interpreter has no rule for it and needs none
        return x if interpret else plgpu.layout_cast(x, lay)

    row_layout, col_layout = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
    lo = range_ref[b, i, 0]
    hi = range_ref[b, i, 1]
    rows = pl.ds(i * bt, bt)

    # one TMA copy per part (a [P, rows, D] box would exceed TMA's 5 strided dims once tiled); the q/k/v barriers
    # expect P arrivals
    for a in range(parts):
        plgpu.copy_gmem_to_smem(q_ref.at[a, b, rows, h], q_smem.at[a], q_bar.at[0])
    if causal:
        plgpu.copy_gmem_to_smem(qlim_ref.at[b, rows], ql_smem, ql_bar.at[0])

    def fetch(j, slot):
        keys = pl.ds(j * bk, bk)
        for a in range(parts):
            plgpu.copy_gmem_to_smem(k_ref.at[a, b, keys, kvh], k_smem.at[slot, a], k_bar.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[a, b, keys, kvh], v_smem.at[slot, a], v_bar.at[slot])
        plgpu.copy_gmem_to_smem(kvalid_ref.at[b, keys], kv_smem.at[slot], m_bar.at[slot])

    if slots == 2:
        @pl.when(lo < hi)
        def _():
            fetch(lo, 0)

    plgpu.barrier_wait(q_bar.at[0])
    qlim = None
    if causal:
        plgpu.barrier_wait(ql_bar.at[0])
        qlim = jax.lax.broadcast_in_dim(layout(ql_smem[...], row_layout), (bt, bk), [0])  # [bt, bk]

    # bf16x6 for float32 inputs: x·y ≈ sum of x_a·y_c over a + c <= 2 (the dropped terms are below 2^-24 of x·y)
    terms = tuple((a, c) for a in range(parts) for c in range(parts) if a + c < parts)

    def body(j, carry):
        acc, m_prev, l_prev = carry
        if slots == 2:
            slot = jax.lax.rem(j - lo, 2)

            @pl.when(j + 1 < hi)
            def _():   # the next tile's copies run while this one is computed (its slot was freed last iteration)
                fetch(j + 1, 1 - slot)
        else:
            slot = 0
            fetch(j, slot)   # the previous tile's wgmmas were awaited: the slot is free

        plgpu.barrier_wait(k_bar.at[slot])

        def qk(acc_ref):
            for a, c in terms:
                plgpu.wgmma(acc_ref, q_smem.at[a], plgpu.transpose_ref(k_smem.at[slot, c], (1, 0)))
            return acc_ref[...]

        if interpret:   # the interpreter's wgmma cannot read a transposed SMEM view: the same product, in jnp
            s = sum(jax.lax.dot_general(q_smem.at[a][...], k_smem.at[slot, c][...], (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32) for a, c in terms)
        else:
            s = pl.run_scoped(qk, plgpu.ACC((bt, bk), jnp.float32))
        s = s * scale                                                                    # [bt, bk] fp32
        plgpu.barrier_wait(m_bar.at[slot])
        mask = jax.lax.broadcast_in_dim(layout(kv_smem.at[slot][...], col_layout) != 0, (bt, bk), [1])
        if causal:
            k_idx = j * bk + layout(jax.lax.broadcasted_iota(jnp.int32, (bt, bk), 1), plgpu.Layout.WGMMA)
            mask = mask & (k_idx < qlim)                                                 # block-causal
        s = jnp.where(mask, s, -jnp.inf)
        m_next = jnp.maximum(m_prev, s.max(axis=1))
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)                              # row all-masked so far
        p = jnp.exp(s - jax.lax.broadcast_in_dim(m_safe, (bt, bk), [0]))                 # masked -> exp(-inf) = 0
        alpha = jnp.exp(m_prev - m_safe)
        l_next = l_prev * alpha + p.sum(axis=1)
        for a in range(parts):
            p_part = p.astype(p_smem.dtype)
            p_smem.at[a][...] = p_part
            if a + 1 < parts:
                p = p - p_part.astype(jnp.float32)
        plgpu.commit_smem()                                                              # make P visible to wgmma
        plgpu.barrier_wait(v_bar.at[slot])

        def pv(acc_ref):
            for a, c in terms:
                plgpu.wgmma(acc_ref, p_smem.at[a], v_smem.at[slot, c])
            return acc_ref[...]

        pv_acc = pl.run_scoped(pv, plgpu.ACC((bt, d), jnp.float32))
        return acc * jax.lax.broadcast_in_dim(alpha, (bt, d), [0]) + pv_acc, m_next, l_next

    init = (layout(jnp.zeros((bt, d), jnp.float32), plgpu.Layout.WGMMA),
            layout(jnp.full((bt,), -jnp.inf, jnp.float32), row_layout),
            layout(jnp.zeros((bt,), jnp.float32), row_layout))
    acc, _, l = jax.lax.fori_loop(lo, hi, body, init)
    inv = jnp.where(l == 0.0, 0.0, 1.0 / jnp.where(l == 0.0, 1.0, l))                    # fully-masked row -> 0
    o_smem[...] = (acc * jax.lax.broadcast_in_dim(inv, (bt, d), [0])).astype(o_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, rows, h])
    plgpu.wait_smem_to_gmem(0)


def _smem(shape, dtype):
    """An SMEM buffer in the layout wgmma and TMA want: (8, 128 bytes) tiles of the last two dims, 128-byte swizzle."""
    dtype = jnp.dtype(dtype)
    tiling = plgpu.TilingTransform((8, SWIZZLE // dtype.itemsize))
    return plgpu.SMEM(shape, dtype, transforms=(tiling, plgpu.SwizzleTransform(SWIZZLE)))


def block_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, key_valid_BxS, q_index_BxT=None, *, block_size=0,
                    scale=None, interpret=False, block_k=DEFAULT_BLOCK_K):
    B, T, H, D = q_BxTxHxD.shape
    _, S, K, Dk = k_BxSxKxD.shape
    causal = check_args(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, key_valid_BxS, q_index_BxT, block_size)
    dtype = jnp.dtype(q_BxTxHxD.dtype)
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        raise ValueError(f"pallas_mgpu supports bfloat16, float16 and float32 inputs, got {dtype}")
    G = H // K
    scale = D ** -0.5 if scale is None else float(scale)
    bt, Tp, bk, Sp = choose_tiles(T, S, block_k, dtype)
    n_t = Tp // bt

    key_valid, qlim = padded_masks(key_valid_BxS, q_index_BxT, block_size, Tp, Sp)  # k_index < qlim
    lo, hi = tile_ranges(key_valid, qlim, T, bt, bk)
    # [lo, hi) per program, padded to 4 int32 (16 bytes); read as scalars from GMEM
    ranges = jnp.stack([lo, hi, lo, hi], axis=-1)

    Dp = round_up(D, 64)      # zero columns change neither q·k nor the first D output columns
    q = jnp.pad(q_BxTxHxD, ((0, 0), (0, Tp - T), (0, 0), (0, Dp - D)))
    k = jnp.pad(k_BxSxKxD.astype(dtype), ((0, 0), (0, Sp - S), (0, 0), (0, Dp - D)))
    v = jnp.pad(v_BxSxKxD.astype(dtype), ((0, 0), (0, Sp - S), (0, 0), (0, Dp - D)))
    if dtype == jnp.float32:
        q, k, v = _split_bf16(q), _split_bf16(k), _split_bf16(v)      # [3, ...] bf16
        op_dtype = jnp.dtype(jnp.bfloat16)
    else:
        q, k, v = q[None], k[None], v[None]
        op_dtype = dtype
    parts = q.shape[0]
    slots = 2 if parts == 1 else 1

    scratch = (
        (_smem((parts, bt, Dp), op_dtype),                # q tile
         _smem((slots, parts, bk, Dp), op_dtype),         # k tiles
         _smem((slots, parts, bk, Dp), op_dtype),         # v tiles
         _smem((parts, bt, bk), op_dtype),                # P (its bf16 parts for float32)
         plgpu.SMEM((slots, bk), jnp.int32),              # key_valid tiles
         plgpu.SMEM((bt,), jnp.int32),                    # per-query causal limit
         _smem((bt, Dp), dtype)),                         # output staging
        (plgpu.Barrier(num_arrivals=parts), plgpu.Barrier(),                        # q, causal limit
         plgpu.Barrier(num_arrivals=parts, num_barriers=slots),                      # k, per slot
         plgpu.Barrier(num_arrivals=parts, num_barriers=slots),                      # v
         plgpu.Barrier(num_barriers=slots)),                                         # key_valid
    )
    kernel = functools.partial(_kernel, scale=scale, bk=bk, group=G, causal=causal,
                               interpret=interpret_params(interpret) is not None)

    def entry(*refs):
        pl.run_scoped(lambda *scoped: kernel(*refs, (scoped[:7], scoped[7:])), *scratch[0], *scratch[1])

    call = plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((B, Tp, H, Dp), dtype),
        grid=(H, n_t, B),
        grid_names=("heads", "q_tile", "batch"),
        compiler_params=plgpu.CompilerParams(),
        interpret=interpret_params(interpret),
    )
    out = call(q, k, v, key_valid.astype(jnp.int32), qlim, ranges)
    return out[:, :T, :, :D]


def make(interpret=False, **tile_kwargs):
    """Return a callable with the reference signature (`interpret=True`: the Mosaic GPU interpreter on any backend)."""
    return functools.partial(block_attention, interpret=interpret, **tile_kwargs)
