"""Plain-jnp block attention: the semantics every kernel must reproduce.

A window of T queries (at arbitrary absolute positions of a static-size buffer) attends over S keys (the full KV
buffer). Keys are masked by `key_valid_BxS` (left padding, unused buffer tail) and, when `block_size > 0`, by a
block-causal rule `q_index // block_size >= k_index // block_size`. GQA: H query heads share K = H / G key heads.
Softmax is computed in float32; a query row with every key masked returns zeros (never NaN).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def block_attention(
    q_BxTxHxD: jax.Array,
    k_BxSxKxD: jax.Array,
    v_BxSxKxD: jax.Array,
    key_valid_BxS: jax.Array,
    q_index_BxT: jax.Array | None = None,
    *,
    block_size: int = 0,
    scale: float | None = None,
) -> jax.Array:
    B, T, H, D = q_BxTxHxD.shape
    S, K = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
    G = H // K
    scale = D ** -0.5 if scale is None else scale
    q_BxTxKxGxD = q_BxTxHxD.reshape(B, T, K, G, D)
    s_BxKxGxTxS = jnp.einsum(
        "btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD, preferred_element_type=jnp.float32
    ) * scale
    mask_BxTxS = jnp.broadcast_to(key_valid_BxS[:, None, :], (B, T, S))
    if block_size:
        assert q_index_BxT is not None, "block-causal attention needs query indices"
        k_idx = jnp.arange(S, dtype=jnp.int32)
        mask_BxTxS = mask_BxTxS & ((q_index_BxT[:, :, None] // block_size) >= (k_idx[None, None, :] // block_size))
    m = mask_BxTxS[:, None, None]
    s_BxKxGxTxS = jnp.where(m, s_BxKxGxTxS, -jnp.inf)
    mx = jnp.max(s_BxKxGxTxS, axis=-1, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    p = jnp.where(m, jnp.exp(s_BxKxGxTxS - mx), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    o_BxTxKxGxD = jnp.einsum("bkgts,bskd->btkgd", p.astype(v_BxSxKxD.dtype), v_BxSxKxD,
                             preferred_element_type=jnp.float32)
    return o_BxTxKxGxD.reshape(B, T, H, D).astype(q_BxTxHxD.dtype)
