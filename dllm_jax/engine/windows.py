"""Window policies: which masked positions may be decoded at a step.

A window policy keeps a small per-row state with at least `s` and `e` ([B] int32): the current window is the canvas
range [s, e). The loop calls, in order, for every forward:
  resolve(...)       after the forward, before candidates are formed (AdaBlock picks its block end here);
  after_commit(...)  after tokens were committed (DSB slides here);
  advance(...)       where the acceptance and cache policies say the block is done: move on, report finished rows.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from dllm_jax.engine.context import Ctx


@dataclasses.dataclass(frozen=True)
class Window:
    # True when resolve() and the candidates read x0/conf only in [s, s + max_width) of the window state a forward
    # serves: the loop then computes the LM head only there (loop.head_span). Declare it only where it holds.
    reads_within_max_width = False
    # True when resolve() reads x0/conf only at masked positions: the loop may then compute the LM head only on the
    # masked rows (loop.head_masked).
    resolve_reads_masked_only = False

    def max_width(self, ctx: Ctx) -> int:
        raise NotImplementedError

    def head_read_width(self, ctx: Ctx) -> int:
        """Width of the span [s, s + width) that holds every x0/conf read of a forward (with
        `reads_within_max_width`); a policy whose reads are narrower than its widest forward says so here."""
        return self.max_width(ctx)

    def init(self, ctx: Ctx, x_BxL) -> dict:
        raise NotImplementedError

    def resolve(self, st, ctx: Ctx, x_BxL, x0_BxL, conf_BxL, block_first_forward_B):
        return st

    def after_commit(self, st, ctx: Ctx, x_BxL, n_commit_B):
        return st

    def advance(self, st, ctx: Ctx, x_BxL, block_done_B):
        raise NotImplementedError

    # Cross-row hooks (BlockBatch). `wants_aux`: the loop computes `aux_stats(st, ctx, logits_BxTxV, pos_BxT)` (logits
    # aligned to the canvas positions pos) for every forward and scatters it into canvas-sized arrays; `coordinate`
    # runs after every commit and may rewrite the canvas and return, per row, the row whose KV cache it takes over.
    wants_aux = False

    def aux_stats(self, st, ctx: Ctx, logits_BxTxV, pos_BxT) -> dict:
        return {}

    def coordinate(self, st, ctx: Ctx, x_BxL, aux, did_full_B, n_commit_B, kv):
        return st, x_BxL, None

    def validate(self, ctx: Ctx) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class FixedBlocks(Window):
    """Semi-autoregressive fixed blocks of `block_length` (LLaDA, Fast-dLLM); block_length=None = one block."""

    block_length: int | None = None
    reads_within_max_width = True  # every read of x0/conf is in [s, s + max_width) (loop.head_span)
    resolve_reads_masked_only = True  # resolve reads nothing

    def _bl(self, ctx):
        return ctx.gen_length if self.block_length is None else self.block_length

    def validate(self, ctx):
        bl = self._bl(ctx)
        if bl <= 0 or ctx.gen_length % bl:
            raise ValueError(f"gen_length ({ctx.gen_length}) must be a positive multiple of block_length ({bl})")

    def num_blocks(self, ctx):
        return ctx.gen_length // self._bl(ctx)

    def max_width(self, ctx):
        return self._bl(ctx)

    def init(self, ctx, x_BxL):
        B, bl = ctx.batch, self._bl(ctx)
        s = jnp.full((B,), ctx.prompt_len, jnp.int32)
        return {"s": s, "e": s + bl, "blk": jnp.zeros((B,), jnp.int32)}

    def advance(self, st, ctx, x_BxL, block_done_B):
        bl = self._bl(ctx)
        blk = st["blk"] + block_done_B.astype(jnp.int32)
        finished = blk >= self.num_blocks(ctx)
        s = jnp.minimum(ctx.prompt_len + blk * bl, ctx.total_len).astype(jnp.int32)
        e = jnp.minimum(s + bl, ctx.total_len).astype(jnp.int32)
        return {"s": s, "e": e, "blk": blk}, finished
