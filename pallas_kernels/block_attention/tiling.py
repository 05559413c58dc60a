"""Tile bookkeeping shared by the Pallas block-attention kernels (computed in the wrapper, outside the kernel)."""

from __future__ import annotations

import jax.numpy as jnp


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
