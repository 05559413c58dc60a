"""DSB (Dynamic Sliding Block) policies: a sliding window and the DSB Cache (lizhuo-luo/DSB).

Window (`SlidingWindow`), recomputed after every forward from the canvas:
  s = first masked position in [s_prev, e_prev), or e_prev if none (the window slides over decoded tokens);
  e = min(P + block_length + n_decoded, s + max_block_length, L)   (const.: max_block_length = block_length)
  e = min(P + block_length + n_decoded, L)                          (greedy: max_block_length = -1)
The first window is [P, P + block_length). The whole generation is one "block": it is done when no mask is left.
Greedy keeps the window end at P + bl + n, so the window widens over tokens committed out of order (by design).

Cache (`DSBCache`): rounds of one full (refresh) forward, then cached window forwards of [s - prefix, e + swl) whose
K/V overwrite the cache in place (dual-cache style); prefix = min(max(jump, pwl), s) where jump = how far s slid
before this forward (every token passed over is refreshed); a new round starts once >= `refresh_tokens` tokens were
committed since the last full forward (its own commits included).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from dllm_jax.engine.caches import Cache
from dllm_jax.engine.context import Ctx, first_true, iota_BxL, in_range
from dllm_jax.engine.windows import Window


@dataclasses.dataclass(frozen=True)
class SlidingWindow(Window):
    block_length: int = 32
    max_block_length: int = -1  # -1 = DSB (greedy); block_length = DSB (const.)

    def validate(self, ctx):
        if self.block_length <= 0:
            raise ValueError(f"block_length must be > 0, got {self.block_length}")
        if self.max_block_length == 0 or self.max_block_length < -1:
            raise ValueError(f"max_block_length must be -1 (greedy) or > 0, got {self.max_block_length}")

    def max_width(self, ctx):
        if self.max_block_length == -1:
            return ctx.gen_length
        return min(self.max_block_length, ctx.gen_length)

    def init(self, ctx, x_BxL):
        B, P, L = ctx.batch, ctx.prompt_len, ctx.total_len
        s = jnp.full((B,), P, jnp.int32)
        first = min(P + self.block_length, L)
        if self.max_block_length != -1:
            first = min(first, P + self.max_block_length)
        return {"s": s, "e": jnp.full((B,), first, jnp.int32), "jump": jnp.zeros((B,), jnp.int32)}

    def _end(self, ctx, s, n_dec):
        e = ctx.prompt_len + self.block_length + n_dec
        if self.max_block_length != -1:
            e = jnp.minimum(e, s + self.max_block_length)
        return jnp.minimum(e, ctx.total_len).astype(jnp.int32)

    def after_commit(self, st, ctx, x_BxL, n_commit_B):
        pos = iota_BxL(ctx)
        is_mask = x_BxL == ctx.mask_id
        s_new = first_true(is_mask & in_range(pos, st["s"], st["e"]), st["e"])
        n_dec = jnp.sum(~is_mask & (pos >= ctx.prompt_len), axis=1).astype(jnp.int32)
        return {"s": s_new, "e": self._end(ctx, s_new, n_dec), "jump": (s_new - st["s"]).astype(jnp.int32)}

    def advance(self, st, ctx, x_BxL, block_done_B):
        # One block: the run ends when the generation holds no mask (the window always contains the first mask).
        pos = iota_BxL(ctx)
        left = jnp.any((x_BxL == ctx.mask_id) & (pos >= ctx.prompt_len), axis=1)
        return st, ~left


@dataclasses.dataclass(frozen=True)
class DSBCache(Cache):
    """DSB Cache: global refresh + sliding cached window [s - prefix, e + swl) with in-place K/V replacement.

    suffix_commit_quirk (default True, official LLaDA code): `mask_blk[:, e:] = 0` indexes the window-relative mask
    with the absolute e (past the window), so it masks nothing and masked tokens in the suffix window [e, e + swl)
    are committed like window tokens in cached forwards. False = the intended behaviour (suffix tokens are only
    refreshed). Irrelevant with swl = 0 (the published setting) and for Dream (no suffix window).
    """

    cand_within_window = False  # cand_range widens cached forwards' candidates (the suffix quirk)

    has_cache: bool = True
    prefix_window: int = 8
    suffix_window: int = 0
    refresh_tokens: int = 32
    suffix_commit_quirk: bool = True

    def needs_full(self, st, ctx, wst):
        return st["need_refresh"] | (st["since_refresh"] >= self.refresh_tokens)

    def width(self, ctx, window):
        pwl, swl = max(self.prefix_window, 0), max(self.suffix_window, 0)
        mw = window.max_width(ctx)
        # start >= min(s_prev, s - pwl) >= P - pwl; width <= max(jump, pwl) + (e - s) + swl with jump <= e - s
        return int(min(ctx.total_len, ctx.gen_length + pwl, max(mw, pwl) + mw + swl))

    def _range(self, ctx, wst):
        s = wst["s"]
        prefix = jnp.minimum(jnp.maximum(wst["jump"], max(self.prefix_window, 0)), s)
        lo = s - prefix
        # (official: swl = min(L - e, swl) persists across steps; e never decreases, so this is min(e + swl, L))
        hi = jnp.minimum(wst["e"] + max(self.suffix_window, 0), ctx.total_len)
        return lo.astype(jnp.int32), hi.astype(jnp.int32)

    def plan_window(self, st, ctx, wst, W):
        lo, hi = self._range(ctx, wst)
        w0 = jnp.clip(lo, 0, ctx.total_len - W).astype(jnp.int32)
        pos = w0[:, None] + jnp.arange(W, dtype=jnp.int32)[None]
        return w0, (pos >= lo[:, None]) & (pos < hi[:, None]), lo

    def cand_range(self, st, ctx, wst, did_full_B):
        if not (self.suffix_commit_quirk and self.suffix_window > 0):
            return wst["s"], wst["e"]
        _, hi = self._range(ctx, wst)
        return wst["s"], jnp.where(did_full_B, wst["e"], hi)

    def new_block(self, st, block_done_B):
        return st  # refreshes are driven by the token count only
