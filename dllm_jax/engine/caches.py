"""Cache policies: when a forward is a full (refresh) forward and, otherwise, which window of queries a cached
forward computes and which cache rows it overwrites.

Static shapes: a cached forward always computes a window of W = `width(ctx, window)` queries starting at `w0`
(clamped so w0 + W <= L); only positions where `write` is true overwrite the cached K/V. `slice_start` is where the
reference code's sliced input starts (Dream's logit shift uses the slice's own first row there).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from dllm_jax.engine.context import Ctx


@dataclasses.dataclass(frozen=True)
class Cache:
    has_cache: bool = False
    # What a refresh (full) forward commits: "rule" = the acceptance rule (Fast-dLLM LLaDA), "first" = only the
    # first masked position of the window, greedily (Fast-dLLM Dream block sampler, DSB Dream).
    refresh_commit: str = "rule"
    # Fast-dLLM quirk: after the block's refresh forward at least this many cached forwards run, even if the
    # refresh already completed the block.
    min_window_forwards: int = 0
    # the candidates (cand_range) lie inside the window [s, e) (loop.head_span); False where a policy widens them
    cand_within_window = True

    def init(self, ctx: Ctx) -> dict:
        B = ctx.batch
        return {"need_refresh": jnp.ones((B,), bool), "win_fwds": jnp.zeros((B,), jnp.int32),
                "since_refresh": jnp.zeros((B,), jnp.int32)}

    def needs_full(self, st, ctx: Ctx, wst):
        return st["need_refresh"] if self.has_cache else jnp.ones((ctx.batch,), bool)

    def cand_range(self, st, ctx: Ctx, wst, did_full_B):
        """Canvas range [lo, hi) whose masked positions are candidates this forward (default: the window [s, e);
        DSB Cache's suffix-window quirk widens it for cached forwards)."""
        return wst["s"], wst["e"]

    def width(self, ctx: Ctx, window) -> int:
        return ctx.total_len

    def widths(self, ctx: Ctx, window) -> tuple:
        """The static widths a cached forward may take, ascending, the last = `width` (one compiled window forward
        per width, chosen per forward by `width_index`)."""
        return (self.width(ctx, window),)

    def width_index(self, st, ctx: Ctx, wst, active_B, widths):
        return jnp.zeros((), jnp.int32)

    def plan_window(self, st, ctx: Ctx, wst, W):
        """Return (w0_B, write_BxW, slice_start_B) for a cached forward, optionally with a 4th element key_end_BxW
        (per-query visible keys [0, key_end), replacing the model's own mask)."""
        raise NotImplementedError

    def full_key_end(self, st, ctx: Ctx, wst):
        """Per-query visible key ends [B, L] for a full forward, or None (the model's own mask)."""
        return None

    def after_forward(self, st, did_full_B, active_B, wst=None):
        """State update after a forward; `wst` is the window state that forward served."""
        won = active_B & ~did_full_B
        return {**st, "need_refresh": st["need_refresh"] & ~(did_full_B & active_B),
                "win_fwds": jnp.where(did_full_B & active_B, 0, st["win_fwds"] + won.astype(jnp.int32))}

    def after_commit(self, st, ctx: Ctx, n_commit_B, did_full_B):
        return {**st, "since_refresh": jnp.where(did_full_B, 0, st["since_refresh"]) + n_commit_B}

    def block_ready(self, st):
        return st["win_fwds"] >= self.min_window_forwards

    def new_block(self, st, block_done_B):
        if not self.has_cache:
            return st
        return {**st, "need_refresh": st["need_refresh"] | block_done_B}


@dataclasses.dataclass(frozen=True)
class NoCache(Cache):
    """Every forward is a full forward over the whole canvas."""


@dataclasses.dataclass(frozen=True)
class PrefixCache(Cache):
    """Fast-dLLM prefix cache: a full forward at block start keeps K/V of [0, s); cached forwards recompute the whole
    suffix [s, L). Static windows [L - W, L), writing only positions >= s, of `suffix_widths` widths W (G * j / n,
    j = 1..n, n = min(suffix_widths, G / block): the block-aligned suffix lengths when there are few blocks); each
    forward takes the narrowest that holds every active row's suffix (the official code's work: rows before s are
    neither computed by it nor written here). suffix_widths=1: always the whole generation (G wide)."""

    has_cache: bool = True
    min_window_forwards: int = 1
    suffix_widths: int = 4

    def width(self, ctx, window):
        return ctx.gen_length

    def widths(self, ctx, window):
        G = ctx.gen_length
        n = max(1, min(self.suffix_widths, G // max(1, window.max_width(ctx))))
        return tuple(sorted({-(-G * j // n) for j in range(1, n + 1)}))

    def width_index(self, st, ctx, wst, active_B, widths):
        need = jnp.max(jnp.where(active_B, ctx.total_len - wst["s"], 0))
        return jnp.sum(jnp.asarray(widths, jnp.int32) < need).astype(jnp.int32)

    def plan_window(self, st, ctx, wst, W):
        w0 = jnp.full((ctx.batch,), ctx.total_len - W, jnp.int32)
        pos = w0[:, None] + jnp.arange(W, dtype=jnp.int32)[None]
        return w0, pos >= wst["s"][:, None], wst["s"]


@dataclasses.dataclass(frozen=True)
class DualCache(Cache):
    """Fast-dLLM dual cache: a full forward at block start keeps all K/V; cached forwards compute only the window
    [s, e) and overwrite its cache rows (`replace_position`); the suffix K/V stay as of the refresh."""

    has_cache: bool = True
    min_window_forwards: int = 1

    def width(self, ctx, window):
        return window.max_width(ctx)

    def plan_window(self, st, ctx, wst, W):
        s = wst["s"]
        w0 = jnp.clip(s, 0, ctx.total_len - W).astype(jnp.int32)
        pos = w0[:, None] + jnp.arange(W, dtype=jnp.int32)[None]
        return w0, (pos >= s[:, None]) & (pos < wst["e"][:, None]), s
