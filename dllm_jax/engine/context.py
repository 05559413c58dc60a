"""Static shape context and small array helpers shared by the loop and the policies."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def dynamic(default):
    """A policy field whose value is traced inside the compiled program: schedules that differ only in such fields
    share one program (a threshold sweep compiles once). Use it only for values that shape nothing and feed only jnp
    arithmetic (no Python `if` on them, no host-side use)."""
    return dataclasses.field(default=default, metadata={"dynamic": True})


@dataclasses.dataclass(frozen=True)
class Ctx:
    """Static layout of the canvas: [B, L] with the prompt left-padded into [0, P) and generation in [P, L)."""

    batch: int
    prompt_len: int  # P: padded prompt length (generation starts here for every row)
    gen_length: int  # G
    mask_id: int
    eos_id: int
    pad_id: int

    @property
    def total_len(self) -> int:
        return self.prompt_len + self.gen_length


def iota_BxL(ctx: Ctx):
    return jnp.broadcast_to(jnp.arange(ctx.total_len, dtype=jnp.int32), (ctx.batch, ctx.total_len))


def in_range(pos_BxL, s_B, e_B):
    return (pos_BxL >= s_B[:, None]) & (pos_BxL < e_B[:, None])


def first_true(mask_BxL, default_B):
    """Index of the first True per row, or `default_B` where the row has none."""
    L = mask_BxL.shape[1]
    idx = jnp.argmax(mask_BxL, axis=1).astype(jnp.int32)
    return jnp.where(jnp.any(mask_BxL, axis=1), idx, default_B).astype(jnp.int32)


def rank_desc(conf_BxL):
    """Rank of each position when sorted by confidence, descending; ties keep the lower index first."""
    order = jnp.argsort(-conf_BxL, axis=1, stable=True)
    B, L = conf_BxL.shape
    ranks = jnp.zeros((B, L), jnp.int32)
    return jax.vmap(lambda r, o: r.at[o].set(jnp.arange(L, dtype=jnp.int32)))(ranks, order)


def row_slice(a_BxS, start_B, size):
    return jax.vmap(lambda a, s: jax.lax.dynamic_slice_in_dim(a, s, size, axis=0))(a_BxS, start_B)


def row_update(a_BxS, upd_BxW, start_B):
    return jax.vmap(lambda a, u, s: jax.lax.dynamic_update_slice_in_dim(a, u, s, axis=0))(a_BxS, upd_BxW, start_B)


def segment_argmax_mask(conf_BxL, seg_BxL, num_segments: int):
    """True at the first position holding the maximum of its segment, per row (segment ids in [0, num_segments))."""
    L = conf_BxL.shape[1]
    idx = jnp.arange(L)

    def row(conf, seg):
        seg_max = jax.ops.segment_max(conf, seg, num_segments=num_segments)
        first = jax.ops.segment_min(jnp.where(conf >= seg_max[seg], idx, L), seg, num_segments=num_segments)
        return idx == first[seg]

    return jax.vmap(row)(conf_BxL, seg_BxL)
