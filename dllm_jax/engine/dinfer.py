"""dInfer (inclusionAI/dInfer) policies: hierarchical acceptance and the vicinity-refresh cache.

Hierarchical decoding: split the window's masked positions into contiguous runs; each run's most confident position
is accepted if its conf > `run_threshold` (0.4); every candidate with conf > tau is accepted; the global argmax always.
Vicinity refresh: a full forward on entering a block and every `refresh_every` forwards; other forwards compute the
window widened by `prefix_look` / `after_look` positions over the cache and overwrite those rows.
(Credit decoding needs a per-position, per-token credit table updated from the logits; it is not implemented.)
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from dllm_jax.engine.acceptance import Accept
from dllm_jax.engine.caches import Cache
from dllm_jax.engine.context import dynamic, rank_desc, segment_argmax_mask


def run_ids(cand_BxL):
    """Id of the contiguous run of True each position belongs to (runs numbered from 1; 0 outside runs)."""
    start = cand_BxL & ~jnp.pad(cand_BxL[:, :-1], ((0, 0), (1, 0)))
    return jnp.where(cand_BxL, jnp.cumsum(start, axis=1), 0).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Hierarchical(Accept):
    threshold: float = dynamic(0.9)
    run_threshold: float = dynamic(0.4)

    def validate(self, ctx, window):
        if not (0.0 < self.threshold <= 1.0) or not (0.0 <= self.run_threshold <= 1.0):
            raise ValueError("hierarchical thresholds must lie in [0, 1] (tau in (0, 1])")

    def select(self, st, ctx, conf_BxL, cand_BxL, i_B):
        L = conf_BxL.shape[1]
        ids = run_ids(cand_BxL)
        run_best = segment_argmax_mask(conf_BxL, ids, L + 1) & (ids > 0)
        ok = (run_best & (conf_BxL > self.run_threshold)) | (conf_BxL > self.threshold) | (rank_desc(conf_BxL) == 0)
        return cand_BxL & ok, st


@dataclasses.dataclass(frozen=True)
class VicinityCache(Cache):
    has_cache: bool = True
    prefix_look: int = 16
    after_look: int = 16
    refresh_every: int = 0  # 0 = only on entering a block

    def width(self, ctx, window):
        return min(window.max_width(ctx) + self.prefix_look + self.after_look, ctx.total_len)

    def needs_full(self, st, ctx, wst):
        periodic = (st["win_fwds"] >= self.refresh_every) if self.refresh_every > 0 else False
        return st["need_refresh"] | periodic

    def plan_window(self, st, ctx, wst, W):
        lo = jnp.maximum(wst["s"] - self.prefix_look, 0)
        hi = jnp.minimum(wst["e"] + self.after_look, ctx.total_len)
        w0 = jnp.clip(lo, 0, ctx.total_len - W).astype(jnp.int32)
        pos = w0[:, None] + jnp.arange(W, dtype=jnp.int32)[None]
        return w0, (pos >= lo[:, None]) & (pos < hi[:, None]), w0
