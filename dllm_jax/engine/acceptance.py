"""Acceptance rules: which candidate positions are committed after a forward.

Each rule sees the candidates of the step (masked positions inside the window of active rows), their confidences
(-inf elsewhere) and `i`, the number of forwards this row already made in the current block. It returns the commit
mask and says when a block is done. Rules keep a small per-row state (e.g. a quota fixed at block start).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from dllm_jax.engine.context import Ctx, dynamic, rank_desc


@dataclasses.dataclass(frozen=True)
class Accept:
    def init(self, ctx: Ctx, n_mask_B) -> dict:
        return {}

    def new_block(self, st, ctx: Ctx, n_mask_B, new_B) -> dict:
        return st

    def select(self, st, ctx: Ctx, conf_BxL, cand_BxL, i_B):
        raise NotImplementedError

    def block_done(self, st, ctx: Ctx, i_B, no_mask_B):
        return no_mask_B

    def validate(self, ctx: Ctx, window) -> None:
        pass


def num_transfer_tokens(n_B, steps, i_B):
    """ML-GSAI get_num_transfer_tokens: n // steps per step, the first n % steps steps get one more."""
    base = n_B // steps
    rem = n_B % steps
    return base + (i_B < rem).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopKQuota(Accept):
    """Fixed step schedule: `steps_per_block` forwards per block, quota from get_num_transfer_tokens (ML-GSAI
    `generate`; Fast-dLLM with threshold=None). The quota is fixed from the mask count at block start."""

    steps_per_block: int = dynamic(1)

    def init(self, ctx, n_mask_B):
        return {"n0": n_mask_B.astype(jnp.int32)}

    def new_block(self, st, ctx, n_mask_B, new_B):
        return {"n0": jnp.where(new_B, n_mask_B, st["n0"]).astype(jnp.int32)}

    def select(self, st, ctx, conf_BxL, cand_BxL, i_B):
        k = num_transfer_tokens(st["n0"], self.steps_per_block, i_B)
        return cand_BxL & (rank_desc(conf_BxL) < k[:, None]), st

    def block_done(self, st, ctx, i_B, no_mask_B):
        return no_mask_B & (i_B >= self.steps_per_block)


@dataclasses.dataclass(frozen=True)
class Threshold(Accept):
    """Fast-dLLM threshold rule: the most confident candidate always, every other one needs conf >= threshold."""

    threshold: float = dynamic(0.9)

    def validate(self, ctx, window):
        if not (0.0 < self.threshold <= 1.0):
            raise ValueError(f"threshold must lie in (0, 1], got {self.threshold}")

    def select(self, st, ctx, conf_BxL, cand_BxL, i_B):
        r = rank_desc(conf_BxL)
        return cand_BxL & ((r == 0) | (conf_BxL >= self.threshold)), st


@dataclasses.dataclass(frozen=True)
class Factor(Accept):
    """Fast-dLLM factor rule (get_transfer_index_dynamic): sorted confidences c_0 >= c_1 >= ...; position i needs
    c_i >= 1 - factor / (i + 2); stop at the first failure. Quirk kept: a failure at the last candidate is accepted."""

    factor: float = dynamic(1.0)

    def validate(self, ctx, window):
        if self.factor <= 0:
            raise ValueError(f"factor must be > 0, got {self.factor}")

    def select(self, st, ctx, conf_BxL, cand_BxL, i_B):
        r = rank_desc(conf_BxL)
        n = jnp.sum(cand_BxL, axis=1)
        need = 1.0 - self.factor / (r.astype(jnp.float32) + 2.0)
        ok = (conf_BxL >= need) | (r == 0) | (r == n[:, None] - 1)
        # first failing rank per row (among candidates); accept ranks before it
        fail_rank = jnp.min(jnp.where(cand_BxL & ~ok, r, ctx.total_len), axis=1)
        return cand_BxL & (r < fail_rank[:, None]), st


def dream_timesteps(steps: int, eps: float) -> np.ndarray:
    """torch.linspace(1, eps, steps + 1) in float32 exactly as torch's CPU kernel computes it (fused multiply-add,
    the second half counted back from the end)."""
    n = steps + 1
    s32, e32 = np.float32(1.0), np.float32(eps)
    if n == 1:
        return np.array([s32], np.float32)
    step = np.float32((e32 - s32) / np.float32(n - 1))
    half = n // 2
    out = [np.float32(np.float64(s32) + np.float64(step) * i) if i < half
           else np.float32(np.float64(e32) - np.float64(step) * (n - i - 1)) for i in range(n)]
    return np.array(out, np.float32)


@dataclasses.dataclass(frozen=True)
class DreamQuota(Accept):
    """Dream `_sample` (maskgit_plus / topk_margin / entropy): at step i of `steps`, commit
    int(n_mask * (1 - t[i+1]/t[i])) tokens in float32 (all remaining at the last step), t = linspace(1, eps).
    Reference quirk kept by default: n_mask is the batch-mean mask count (`batch_mean=False` uses each row's own)."""

    steps: int = 1
    eps: float = 1e-3
    batch_mean: bool = True

    def validate(self, ctx, window):
        if self.steps <= 0:
            raise ValueError(f"steps must be > 0, got {self.steps}")

    def select(self, st, ctx, conf_BxL, cand_BxL, i_B):
        ts = jnp.asarray(dream_timesteps(self.steps, self.eps))
        n_row = jnp.sum(cand_BxL, axis=1).astype(jnp.float32)
        n = jnp.broadcast_to(jnp.sum(n_row) / np.float32(ctx.batch), n_row.shape) if self.batch_mean else n_row
        i = jnp.clip(i_B, 0, self.steps - 1)
        t, s = ts[i], ts[i + 1]
        k = jnp.where(i_B < self.steps - 1, (n * (np.float32(1.0) - s / t)).astype(jnp.int32), n.astype(jnp.int32))
        return cand_BxL & (rank_desc(conf_BxL) < k[:, None]), st

    def block_done(self, st, ctx, i_B, no_mask_B):
        return i_B >= self.steps


@dataclasses.dataclass(frozen=True)
class DreamCarryThreshold(Accept):
    """Fast-dLLM Dream `confidence_threshold` without cache: quota = #masks/steps + rejections carried over; the top
    candidate always, others need conf >= threshold; rejections at the last scheduled step extend `steps` by one
    (the reference increments `steps` inside its rejection loop, after which the test `i < steps - 1` holds again,
    so one extension per step) and zero the base quota: NFE can exceed `steps`. Requires #masks % steps == 0."""

    steps: int = dynamic(1)
    threshold: float = dynamic(0.9)

    def validate(self, ctx, window):
        if not (0.0 < self.threshold <= 1.0):
            raise ValueError(f"threshold must lie in (0, 1], got {self.threshold}")
        if ctx.gen_length % self.steps:
            raise ValueError(f"confidence_threshold needs gen_length ({ctx.gen_length}) divisible by steps "
                             f"({self.steps}) (the reference asserts #masks % steps == 0)")

    def init(self, ctx, n_mask_B):
        B = n_mask_B.shape[0]
        return {"base": (n_mask_B // self.steps).astype(jnp.int32), "carry": jnp.zeros((B,), jnp.int32),
                "total": jnp.full((B,), self.steps, jnp.int32)}

    def select(self, st, ctx, conf_BxL, cand_BxL, i_B):
        k = st["base"] + st["carry"]
        r = rank_desc(conf_BxL)
        picked = cand_BxL & (r < k[:, None])
        commit = picked & ((r == 0) | (conf_BxL >= self.threshold))
        rej = jnp.sum(picked & ~commit, axis=1).astype(jnp.int32)
        last = i_B >= st["total"] - 1
        st = {"base": jnp.where(last & (rej > 0), 0, st["base"]), "carry": rej,
              "total": jnp.where(last & (rej > 0), st["total"] + 1, st["total"])}
        return commit, st

    def block_done(self, st, ctx, i_B, no_mask_B):
        return i_B >= st["total"]


@dataclasses.dataclass(frozen=True)
class DreamOrigin(Accept):
    """Dream `origin`: every masked position is unmasked independently with probability 1 - t[i+1]/t[i] (1 at the
    last step). Pair it with the sampler's confidence="random" (uniform draws used as the coin flips)."""

    steps: int = 1
    eps: float = 1e-3

    def select(self, st, ctx, conf_BxL, cand_BxL, i_B):
        ts = jnp.asarray(dream_timesteps(self.steps, self.eps))
        i = jnp.clip(i_B, 0, self.steps - 1)
        p = jnp.where(i_B < self.steps - 1, np.float32(1.0) - ts[i + 1] / ts[i], np.float32(1.0))
        return cand_BxL & (conf_BxL < p[:, None]), st

    def block_done(self, st, ctx, i_B, no_mask_B):
        return i_B >= self.steps
