"""Tile bookkeeping shared by the Pallas block-attention kernels (computed in the wrapper, outside the kernel)."""

from __future__ import annotations

import jax.numpy as jnp


def check_args(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, key_valid_BxS, q_index_BxT, block_size) -> bool:
    """Validate the block-attention arguments (the reference's contract); return whether the call is block-causal."""
    B, T, H, D = q_BxTxHxD.shape
    _, S, K, Dk = k_BxSxKxD.shape
    if k_BxSxKxD.shape != v_BxSxKxD.shape or Dk != D or k_BxSxKxD.shape[0] != B:
        raise ValueError(f"shape mismatch: q {q_BxTxHxD.shape}, k {k_BxSxKxD.shape}, v {v_BxSxKxD.shape}")
    if H % K:
        raise ValueError(f"query heads {H} must be a multiple of kv heads {K}")
    if key_valid_BxS.shape != (B, S):
        raise ValueError(f"key_valid shape {key_valid_BxS.shape} != {(B, S)}")
    causal = bool(block_size)
    if causal and q_index_BxT is None:
        raise ValueError("block-causal attention needs query indices")
    return causal


def padded_masks(key_valid_BxS, q_index_BxT, block_size: int, Tp: int, Sp: int):
    """The key mask padded to Sp (padded keys invalid) and each query's key limit [B, Tp] int32 (k_index < qlim:
    the block-causal rule; Sp, no limit, when `block_size` is 0)."""
    B, S = key_valid_BxS.shape
    key_valid = jnp.pad(key_valid_BxS.astype(bool), ((0, 0), (0, Sp - S)))
    if block_size:
        qi = jnp.pad(q_index_BxT.astype(jnp.int32), ((0, 0), (0, Tp - q_index_BxT.shape[1])))
        qlim = (qi // block_size + 1) * block_size
    else:
        qlim = jnp.full((B, Tp), Sp, jnp.int32)
    return key_valid, qlim


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def tile_ranges(key_valid_BxSp, qlim_BxTp, T: int, bt: int, bk: int):
    """Per (batch row, query tile): the range [lo, hi) of key tiles that may hold an unmasked key; each [B, nT] int32.

    `lo` comes from the row's first valid key (left padding), `hi` from its last valid key (unused buffer tail) and
    the largest block-causal limit `qlim` of the tile's real (unpadded) queries. A row or tile with no reachable key
    gets the empty range (0, 0)."""
    B, Sp = key_valid_BxSp.shape
    Tp = qlim_BxTp.shape[1]
    n_t, n_s = Tp // bt, Sp // bk
    any_valid = jnp.any(key_valid_BxSp, axis=1)
    first = jnp.argmax(key_valid_BxSp, axis=1).astype(jnp.int32)
    last1 = Sp - jnp.argmax(key_valid_BxSp[:, ::-1], axis=1).astype(jnp.int32)
    real_row = jnp.arange(Tp, dtype=jnp.int32) < T
    lim = jnp.where(real_row[None], qlim_BxTp, 0).reshape(B, n_t, bt).max(axis=2)
    end = jnp.minimum(lim, last1[:, None])
    lo = jnp.broadcast_to((first // bk)[:, None], (B, n_t))
    hi = jnp.minimum((end + bk - 1) // bk, n_s)
    empty = (~any_valid[:, None]) | (end <= first[:, None])
    return jnp.where(empty, 0, lo).astype(jnp.int32), jnp.where(empty, 0, hi).astype(jnp.int32)
