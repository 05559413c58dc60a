"""D2F pipeline (Discrete Diffusion Forcing, arXiv 2508.09192), training-free variant on bidirectional models.

Several blocks of `block_length` are decoded at once. The window spans from the first unfinished block to the last
*added* block. A new block is added when the last added block's decoded ratio reaches tau_add (and no EOS has been
decoded yet). A block is *fully activated* when its predecessor's decoded ratio reaches tau_act (the first unfinished
block always is); otherwise it is *semi-activated*. Per block, positions with confidence > tau_conf are committed; a
fully activated block with none commits its single most confident position; a semi-activated block may commit
nothing.

Two attention modes (preset argument `attention`):
* "bidirectional" (training-free, any LLaDA/Dream checkpoint): the canvas holds the whole masked suffix (as LLaDA
  always sees it), so "adding" a block only makes its positions decodable; every position attends to everything.
* "block_causal" (D2F-trained checkpoints, e.g. a D2F-LoRA merged into LLaDA, or other block-causal models): the model
  must run with block-causal attention over blocks of `block_length` canvas positions
  (`model.with_block_causal(block_length)`, i.e. `q_block >= k_block`). A block then sees the prompt, the earlier
  blocks and itself, never a later one, so the masked blocks that are not added yet cannot influence anything: the
  run decodes exactly what the official growing-sequence pipeline decodes (tested: a generation's first blocks do not
  depend on how many blocks follow). The prompt must fill whole blocks (its bucketed length a multiple of
  block_length; with the default 32-token buckets any block_length dividing 32 works).
  With `model.with_block_causal(bl)` the prompt is one block (D2F's mask: the prompt sees only itself, every generated
  block sees the whole prompt).

KV cache (`PipelineCache`, preset argument cache="pipeline"): the official pipeline keeps the K/V of the finished
prefix — the blocks that were complete, with every block before them, in the input of an earlier forward — and each
forward runs only from that boundary c to the end of the added blocks, appending the newly finished blocks' K/V. Here
a cached forward computes a static window of W = span + 1 queries from c - 1 (the extra row gives Dream's shifted
logits for position c), writes the K/V of rows >= c, and attends over the cached K/V before c; the boundary then
moves to the window start s that forward served. Rows whose [c, e) does not fit in the window take a full forward
instead (same result, more compute), so `span` trades compute per forward against how often that happens.
Under block-causal attention the cache is exact: a finished block's K/V depend only on the prompt and finished
blocks, and the masked blocks past e are invisible to every added block, so cached and uncached runs decode the same
tokens. Under bidirectional attention it is an approximation (finished blocks keep the K/V they had when they
finished, like Fast-dLLM's prefix cache).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dllm_jax.engine.acceptance import Accept
from dllm_jax.engine.caches import Cache
from dllm_jax.engine.context import dynamic, first_true, iota_BxL, segment_argmax_mask
from dllm_jax.engine.windows import Window


def _block_stats(ctx, x, bl):
    """Per generated block: decoded ratio [B, nb] and the block id of every position [B, L] (-1 in the prompt)."""
    nb = ctx.gen_length // bl
    pos = iota_BxL(ctx)
    blk = jnp.where(pos >= ctx.prompt_len, (pos - ctx.prompt_len) // bl, -1)
    decoded = (x != ctx.mask_id) & (blk >= 0)
    onehot = jax.nn.one_hot(blk, nb, dtype=jnp.float32)
    ratio = jnp.sum(onehot * decoded[..., None], axis=1) / bl
    return ratio, blk


@dataclasses.dataclass(frozen=True)
class D2FPipeline(Window):
    block_length: int = 32
    tau_add: float = 0.1
    stop_at_eos: bool = True
    block_causal: bool = False  # the model runs block-causal attention over blocks of block_length (see above)

    def validate(self, ctx):
        if self.block_length <= 0 or ctx.gen_length % self.block_length:
            raise ValueError(f"gen_length ({ctx.gen_length}) must be a multiple of block_length ({self.block_length})")
        if self.block_causal and ctx.prompt_len % self.block_length:
            raise ValueError(f"d2f with block-causal attention needs the (bucketed) prompt length ({ctx.prompt_len}) "
                             f"to be a multiple of block_length ({self.block_length}) so generated blocks line up "
                             "with the attention blocks; use a block_length that divides 32")
        if not (0.0 <= self.tau_add <= 1.0):
            raise ValueError(f"tau_add must lie in [0, 1], got {self.tau_add}")

    def max_width(self, ctx):
        return ctx.gen_length

    def init(self, ctx, x):
        s = jnp.full((x.shape[0],), ctx.prompt_len, jnp.int32)
        return {"s": s, "e": s + self.block_length}

    def _update(self, st, ctx, x):
        bl, L = self.block_length, ctx.total_len
        ratio, _ = _block_stats(ctx, x, bl)
        pos = iota_BxL(ctx)
        gen = pos >= ctx.prompt_len
        s = first_true(gen & (x == ctx.mask_id), jnp.full((x.shape[0],), L, jnp.int32))
        s = ctx.prompt_len + ((s - ctx.prompt_len) // bl) * bl  # start of the first unfinished block
        last = jnp.clip((st["e"] - ctx.prompt_len) // bl - 1, 0, ratio.shape[1] - 1)
        last_ratio = jnp.take_along_axis(ratio, last[:, None], axis=1)[:, 0]
        eos_seen = jnp.any(gen & (x == ctx.eos_id), axis=1) if self.stop_at_eos else jnp.zeros_like(last_ratio, bool)
        add = (last_ratio >= self.tau_add) & ~eos_seen
        e = jnp.minimum(st["e"] + jnp.where(add, bl, 0), L)
        # never an empty window while masks remain, except after an EOS: then only the added blocks are finished
        e = jnp.where(eos_seen, e, jnp.maximum(e, jnp.minimum(s + bl, L)))
        return {"s": s.astype(jnp.int32), "e": e.astype(jnp.int32)}

    def coordinate(self, st, ctx, x, aux, did_full_B, n_commit_B, kv):
        """The official pipeline ends once an EOS was decoded and the blocks added so far are complete: the positions
        never added are filled with EOS here (so the row holds no mask and finishes at this forward)."""
        if not self.stop_at_eos:
            return st, x, None
        pos = iota_BxL(ctx)
        gen = pos >= ctx.prompt_len
        is_mask = gen & (x == ctx.mask_id)
        eos_seen = jnp.any(gen & (x == ctx.eos_id), axis=1)
        added_done = ~jnp.any(is_mask & (pos < st["e"][:, None]), axis=1)
        return st, jnp.where((eos_seen & added_done)[:, None] & is_mask, ctx.eos_id, x), None

    def after_commit(self, st, ctx, x, n_commit_B):
        return self._update(st, ctx, x)

    def advance(self, st, ctx, x, block_done_B):
        # the window was updated once after this step's commits (after_commit): at most one block is added per
        # forward, as in the official pipeline
        gen = iota_BxL(ctx) >= ctx.prompt_len
        return st, ~jnp.any(gen & (x == ctx.mask_id), axis=1)


@dataclasses.dataclass(frozen=True)
class D2FAccept(Accept):
    block_length: int = 32
    tau_conf: float = dynamic(0.9)
    tau_act: float = dynamic(0.95)

    def validate(self, ctx, window):
        if not (0.0 < self.tau_conf <= 1.0) or not (0.0 <= self.tau_act <= 1.0):
            raise ValueError("D2F needs tau_conf in (0, 1] and tau_act in [0, 1]")

    def select(self, st, ctx, conf_BxL, cand_BxL, i_B):
        bl = self.block_length
        nb = ctx.gen_length // bl
        # decoded ratio of each block, from the candidates' complement inside the generation
        x_decoded = ~cand_BxL & (iota_BxL(ctx) >= ctx.prompt_len)
        pos = iota_BxL(ctx)
        blk = jnp.where(pos >= ctx.prompt_len, (pos - ctx.prompt_len) // bl, -1)
        onehot = jax.nn.one_hot(blk, nb, dtype=jnp.float32)
        has_cand = jnp.sum(onehot * cand_BxL[..., None], axis=1) > 0  # [B, nb]
        first_blk = jnp.argmax(has_cand, axis=1)
        ratio = jnp.sum(onehot * x_decoded[..., None], axis=1) / bl
        prev_ratio = jnp.concatenate([jnp.ones_like(ratio[:, :1]), ratio[:, :-1]], axis=1)
        full = (prev_ratio >= self.tau_act) | (jnp.arange(nb)[None] == first_blk[:, None])
        commit = cand_BxL & (conf_BxL > self.tau_conf)
        # fully activated blocks that commit nothing take their most confident candidate
        none = jnp.sum(onehot * commit[..., None], axis=1) == 0  # [B, nb]
        need = full & none & has_cand
        blk_c = jnp.where(cand_BxL, blk, nb)

        best = segment_argmax_mask(jnp.where(cand_BxL, conf_BxL, -jnp.inf), blk_c, nb + 1) & cand_BxL
        need_pos = jnp.take_along_axis(need, jnp.clip(blk, 0, nb - 1), axis=1) & (blk >= 0)
        return commit | (best & need_pos), st


@dataclasses.dataclass(frozen=True)
class PipelineCache(Cache):
    """D2F KV cache of the finished prefix (see the module docstring). `span`: static number of canvas positions a
    cached forward covers from the cache boundary (a multiple of the block length is natural). Composes with any
    window whose start `s` only moves forward (fixed, delimiter and sliding blocks: `compose(cache="pipeline")`);
    exact under block-causal attention when `align` is the model's attention block size."""

    has_cache: bool = True
    span: int = 96
    # attention block size of a block-causal model: the boundary is rounded down to a multiple of it, so a cached row
    # never shares an attention block with a row that may still change (0: no rounding; D2F windows start on block
    # boundaries anyway)
    align: int = 0

    def init(self, ctx):
        return {**super().init(ctx), "c0": jnp.full((ctx.batch,), ctx.prompt_len, jnp.int32)}

    def width(self, ctx, window):
        return int(min(ctx.total_len, self.span + 1))

    def _w0(self, st, ctx, W):
        return jnp.clip(st["c0"] - 1, 0, ctx.total_len - W).astype(jnp.int32)

    def needs_full(self, st, ctx, wst):
        W = self.width(ctx, None)
        return st["need_refresh"] | (wst["e"] > self._w0(st, ctx, W) + W)

    def plan_window(self, st, ctx, wst, W):
        w0 = self._w0(st, ctx, W)
        pos = w0[:, None] + jnp.arange(W, dtype=jnp.int32)[None]
        return w0, pos >= st["c0"][:, None], w0

    def after_forward(self, st, did_full_B, active_B, wst=None):
        st2 = super().after_forward(st, did_full_B, active_B, wst)
        # rows before the served window's start were finished (with all earlier rows) in this forward's input, and
        # this forward computed them (a full forward, or a window from c0 - 1): their K/V are final
        s = wst["s"] if not self.align else (wst["s"] // self.align) * self.align
        return {**st2, "c0": jnp.where(active_B, jnp.maximum(st["c0"], s), st["c0"]).astype(jnp.int32)}

    def new_block(self, st, block_done_B):
        return st  # the boundary moves with the pipeline; no refresh forwards
