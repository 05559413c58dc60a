"""Baselines on the same engine and network shape, as policy compositions (no loop of their own):

* **AR** (`ar_schedule`, run on `ar_config(cfg)`: causal attention, next-token logits): one token per forward with a
  standard KV cache. The first forward is the prefill (a full causal forward over the canvas; row P-1 predicts the
  first token). Every later forward feeds only the last committed token (a window of W = 1 at s - 1), writes its
  K/V into the cache and predicts position s (`KVCacheAR.out_offset = 1`). NFE = gen_length.
* **Block diffusion** (`block_diffusion_schedule`, run on `block_config(cfg, bl)`: block-causal attention,
  q // bl >= k // bl): fixed blocks of `bl` decoded with any acceptance rule over a block KV cache. The first forward
  is the prefill; every later forward computes only the current block (W = bl) over the cached K/V of the prompt and
  the finished blocks. When a block has no mask left, one more forward of that block writes its clean K/V (the
  block-diffusion "commit" forward; skipped after the last block), so NFE = tokens-per-block steps + blocks - 1.

Both caches are exact: with (block-)causal attention the cached K/V of earlier positions never depend on later ones,
so the cached run decodes the same tokens as a full recompute every step (`NoCache`), which `tests/test_bench.py`
checks.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from dllm_jax.engine.acceptance import Threshold, TopKQuota
from dllm_jax.engine.caches import Cache, DualCache, NoCache
from dllm_jax.engine.loop import Schedule
from dllm_jax.engine.sampling import TokenSampler
from dllm_jax.engine.windows import FixedBlocks
from dllm_jax.models.config import ModelConfig


def ar_config(cfg: ModelConfig) -> ModelConfig:
    """The same network run as a causal next-token predictor (row i predicts token i + 1)."""
    return cfg.replace(block_causal=1, logit_shift=True)


def block_config(cfg: ModelConfig, block_length: int) -> ModelConfig:
    """The same network with block-causal attention over blocks of `block_length` canvas positions."""
    if block_length <= 0:
        raise ValueError(f"block_length must be > 0, got {block_length}")
    return cfg.replace(block_causal=int(block_length))


@dataclasses.dataclass(frozen=True)
class KVCacheAR(Cache):
    """Autoregressive KV cache: prefill once, then a one-token window at s - 1 (the last committed token) whose
    output lands at s (`out_offset`). Never refreshes."""

    has_cache: bool = True
    out_offset: int = 1  # read by the loop: window row j predicts canvas position w0 + j + out_offset

    def width(self, ctx, window):
        return 1

    def plan_window(self, st, ctx, wst, W):
        w0 = jnp.maximum(wst["s"] - 1, 0).astype(jnp.int32)
        return w0, jnp.ones((ctx.batch, W), bool), w0

    def new_block(self, st, block_done_B):
        return st  # a block is one token: no refresh


@dataclasses.dataclass(frozen=True)
class BlockKVCache(DualCache):
    """Block-diffusion KV cache: prefill once; forwards compute the current block only (W = block_length, written
    into the cache); a block is done only after a forward that saw it without masks (its clean K/V are then cached),
    except the last block whose K/V nobody reads."""

    block_length: int = 32
    min_window_forwards: int = 0

    def width(self, ctx, window):
        return self.block_length

    def init(self, ctx):
        st = super().init(ctx)
        B = ctx.batch
        return {**st, "filled": jnp.zeros((B,), jnp.int32), "clean": jnp.zeros((B,), bool),
                "left": jnp.full((B,), ctx.gen_length // self.block_length, jnp.int32)}

    def after_forward(self, st, did_full_B, active_B, wst=None):
        st2 = super().after_forward(st, did_full_B, active_B, wst)
        return {**st2, "clean": st["clean"] | (active_B & (st["filled"] >= self.block_length))}

    def after_commit(self, st, ctx, n_commit_B, did_full_B):
        st2 = super().after_commit(st, ctx, n_commit_B, did_full_B)
        return {**st2, "filled": st["filled"] + n_commit_B}

    def block_ready(self, st):
        return st["clean"] | (st["left"] <= 1)

    def new_block(self, st, block_done_B):
        return {**st, "filled": jnp.where(block_done_B, 0, st["filled"]),
                "clean": st["clean"] & ~block_done_B, "left": st["left"] - block_done_B.astype(jnp.int32)}


def ar_schedule(gen_length: int, *, cache: bool = True, sampler: TokenSampler = TokenSampler()) -> Schedule:
    """Greedy AR decoding, one token per forward (run it on `ar_config(cfg)`). cache=False recomputes the whole
    causal canvas every step (the reference the cached run must equal)."""
    return Schedule(window=FixedBlocks(1), accept=TopKQuota(steps_per_block=1),
                    cache=KVCacheAR() if cache else NoCache(), sampler=sampler, name="ar",
                    max_nfe=gen_length + 8, gen_length=gen_length)


def block_diffusion_schedule(gen_length: int, block_length: int = 32, *, threshold: float | None = None,
                             cache: bool = True, sampler: TokenSampler = TokenSampler()) -> Schedule:
    """Block diffusion (run it on `block_config(cfg, block_length)`): one token per forward inside each block
    (threshold=None) or the Fast-dLLM threshold rule; block KV cache unless cache=False."""
    if block_length <= 0 or gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a positive multiple of block_length ({block_length})")
    acc = TopKQuota(steps_per_block=block_length) if threshold is None else Threshold(threshold=float(threshold))
    return Schedule(window=FixedBlocks(block_length), accept=acc,
                    cache=BlockKVCache(block_length=block_length) if cache else NoCache(), sampler=sampler,
                    name="block_diffusion" if threshold is None else "block_diffusion_threshold",
                    gen_length=gen_length)
