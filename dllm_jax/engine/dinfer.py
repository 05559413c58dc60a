"""dInfer (inclusionAI/dInfer) policies: hierarchical acceptance and the vicinity-refresh cache.

Hierarchical decoding: split the window's masked positions into contiguous runs; each run's most confident position
is accepted if its conf > `run_threshold` (0.4); every candidate with conf > tau is accepted; the global argmax always.
Vicinity refresh: a full forward on entering a block and every `refresh_every` forwards; other forwards compute the
window widened by `prefix_look` / `after_look` positions over the cache and overwrite those rows.
Credit decoding (`CreditThreshold`): a per-position credit table C[pos, token] lives while the position is inside the
window; every forward decays it (C <- decay * C) and adds top1_prob ** boost at each masked window position's top-1
token (of the raw logits); the rule then decodes from the fused logits `logits + alpha * log(1 + C)` with the
threshold rule. dInfer keeps a dense [B, block, V] matrix per block; here C is stored sparsely, `slots` (token,
credit) pairs per position: a position gains at most one new token per forward, so with slots >= the forwards a
position spends inside the window (<= block_length under the threshold rule, which commits >= 1 per forward) the
sparse table equals the dense one. When the slots are full, a new token replaces the smallest credit (counted in
state["overflow"]).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dllm_jax.engine.acceptance import Accept, Threshold
from dllm_jax.engine.caches import Cache
from dllm_jax.engine.context import dynamic, rank_desc, segment_argmax_mask
from dllm_jax.engine.sampling import vocab_argmax


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


@dataclasses.dataclass(frozen=True)
class CreditThreshold(Threshold):
    """dInfer CreditThresholdParallelDecoder: the threshold rule (inherited) on credit-fused logits (see the module
    docstring)."""

    alpha: float = dynamic(0.7)  # credit_alpha
    boost: float = dynamic(0.2)  # boost_gamma
    decay: float = dynamic(0.8)  # decay_beta
    slots: int = 32
    wants_logits = True  # class attribute: the loop calls process_logits before the sampler

    def validate(self, ctx, window):
        super().validate(ctx, window)
        if self.slots < 1:
            raise ValueError(f"slots must be >= 1, got {self.slots}")

    def logit_state_init(self, ctx):
        shape = (ctx.batch, ctx.total_len, self.slots)
        return {"tok": jnp.full(shape, -1, jnp.int32), "val": jnp.zeros(shape, jnp.float32),
                "overflow": jnp.zeros((ctx.batch,), jnp.int32)}

    def process_logits(self, st, ctx, logits_BxTxV, update_BxT, in_win_BxT):
        logits = logits_BxTxV.astype(jnp.float32)
        B, T, V = logits.shape
        probs = jax.nn.softmax(logits, axis=-1)
        top_i = vocab_argmax(logits).astype(jnp.int32)
        top_p = jnp.max(probs, axis=-1)
        tok = st["tok"]
        val = jnp.where(in_win_BxT[..., None], st["val"] * self.decay, st["val"])
        hit = tok == top_i[..., None]
        has = jnp.any(hit, axis=-1)
        empty = tok < 0
        full = ~jnp.any(empty, axis=-1)
        # slot: the token's own, else the first empty one, else (overflow) the smallest credit
        slot = jnp.where(has, jnp.argmax(hit, axis=-1),
                         jnp.where(full, jnp.argmin(val, axis=-1), jnp.argmax(empty, axis=-1)))
        put = jax.nn.one_hot(slot, self.slots, dtype=bool) & update_BxT[..., None]
        new_tok = put & ~hit
        val = jnp.where(new_tok, 0.0, val) + jnp.where(put, (top_p ** self.boost)[..., None], 0.0)
        tok = jnp.where(put, top_i[..., None], tok)
        overflow = st["overflow"] + jnp.sum(update_BxT & ~has & full, axis=1).astype(jnp.int32)
        # fused logits inside the window: logits + alpha * log(1 + C) at the credited tokens
        bonus = jnp.where((tok >= 0) & in_win_BxT[..., None], self.alpha * jnp.log1p(val), 0.0)
        b_idx = jnp.arange(B)[:, None, None]
        t_idx = jnp.arange(T)[None, :, None]
        fused = logits.at[b_idx, t_idx, jnp.maximum(tok, 0)].add(bonus)
        return fused, {"tok": tok, "val": val, "overflow": overflow}
