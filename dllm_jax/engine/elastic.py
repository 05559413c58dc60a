"""Entropy-elastic window (new in dllm-jax): the window stretches over confident stretches and shrinks where the model
is unsure.

Definition. After every forward, let s be the first masked position of the generation and, for each position j >= s,
u_j its uncertainty: u_j = 1 - p(x0_j) with the "prob" confidence (the probability that the proposal is wrong), or the
predictive entropy -conf_j with the "neg_entropy" confidence; already decoded positions have u_j = 0 and positions the
forward did not compute have u_j = inf. The window is [s, s + w) with

    w = clip( max{ n : sum_{j=s}^{s+n-1} u_j <= budget }, min_size, max_size )   (and s + w <= L).

Reasoning. A fixed block is wrong in both directions: in an easy stretch (a list being copied, boilerplate) it stops
parallel decoding at an arbitrary boundary and forces one more block (more forwards); in a hard stretch it lets the
acceptance rule commit far-ahead tokens conditioned on little context. With u_j read as the probability that position
j's proposal is wrong, sum u_j over the window is the expected number of wrong proposals it holds: the budget keeps
that number roughly constant, so the window size is about budget / (mean local uncertainty) — it grows over runs of low
entropy and shrinks to min_size where entropy is high. The window only chooses *where* tokens may be committed; the
acceptance rule (e.g. a threshold) still chooses *which*.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from dllm_jax.engine.context import first_true, iota_BxL
from dllm_jax.engine.windows import Window


@dataclasses.dataclass(frozen=True)
class EntropyElastic(Window):
    budget: float = 1.0
    min_size: int = 4
    max_size: int = 64
    uncertainty: str = "prob"  # how to read the sampler's confidence: "prob" (1 - p) or "neg_entropy" (-conf)
    # resolve() sums uncertainty from s = the first mask (= the state's s) and clips the width to max_width: reads
    # past s + max_width cannot change it (loop.head_span)
    reads_within_max_width = True
    resolve_reads_masked_only = True  # resolve reads conf only where x is masked (u = 0 elsewhere)

    def validate(self, ctx):
        if not (1 <= self.min_size <= self.max_size):
            raise ValueError(f"need 1 <= min_size ({self.min_size}) <= max_size ({self.max_size})")
        if self.budget <= 0:
            raise ValueError(f"budget must be > 0, got {self.budget}")
        if self.uncertainty not in ("prob", "neg_entropy"):
            raise ValueError(f"uncertainty must be 'prob' or 'neg_entropy', got {self.uncertainty!r}")

    def max_width(self, ctx):
        return min(self.max_size, ctx.gen_length)

    def _first_mask(self, ctx, x):
        pos = iota_BxL(ctx)
        L = ctx.total_len
        return first_true((pos >= ctx.prompt_len) & (x == ctx.mask_id), jnp.full((x.shape[0],), L, jnp.int32))

    def init(self, ctx, x):
        s = self._first_mask(ctx, x)
        return {"s": s, "e": jnp.minimum(s + self.min_size, ctx.total_len)}

    def resolve(self, st, ctx, x, x0, conf, block_first_forward_B):
        pos = iota_BxL(ctx)
        s = self._first_mask(ctx, x)
        masked = (x == ctx.mask_id) & (pos >= s[:, None])
        u = (1.0 - conf) if self.uncertainty == "prob" else -conf
        u = jnp.where(jnp.isfinite(conf), u, jnp.inf)
        u = jnp.where(masked, u, 0.0)
        cum = jnp.cumsum(jnp.where(pos >= s[:, None], u, 0.0), axis=1)
        n = jnp.sum((pos >= s[:, None]) & (cum <= self.budget), axis=1)
        w = jnp.clip(n, self.min_size, self.max_width(ctx))
        return {"s": s, "e": jnp.minimum(s + w, ctx.total_len).astype(jnp.int32)}

    def after_commit(self, st, ctx, x, n_commit_B):
        s = jnp.maximum(self._first_mask(ctx, x), st["s"])
        return {"s": s, "e": jnp.maximum(st["e"], jnp.minimum(s + self.min_size, ctx.total_len))}

    def advance(self, st, ctx, x, block_done_B):
        finished = self._first_mask(ctx, x) >= ctx.total_len
        return self.after_commit(st, ctx, x, jnp.zeros_like(st["s"])), finished
