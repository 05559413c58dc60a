"""OSDT-style one-shot threshold calibration (arXiv 2511.02077): calibrate per-block thresholds from one decoded
sample of a task, save them, reuse them for the task.

Our reading (the paper's exact profile-to-threshold map is not public code): decode one calibration prompt with the
Fast-dLLM threshold rule at `base_threshold`, recording the confidence of every committed token per block; block b
gets tau_b = clip(mean_b - beta * std_b, lo, hi). Blocks where the model was uniformly confident get a lower threshold
(more parallelism), blocks with spread-out confidence keep a high one. Blocks never reached keep `base_threshold`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from dllm_jax.engine.acceptance import Accept, Threshold
from dllm_jax.engine.context import iota_BxL, rank_desc


@dataclasses.dataclass(frozen=True)
class BlockThresholds(Accept):
    """Threshold rule with one threshold per block of `block_length` generated positions (last one repeats)."""

    thresholds: tuple = (0.9,)
    block_length: int = 32

    def validate(self, ctx, window):
        if not self.thresholds or not all(0.0 < t <= 1.0 for t in self.thresholds):
            raise ValueError(f"every threshold must lie in (0, 1], got {self.thresholds}")
        if self.block_length <= 0:
            raise ValueError(f"block_length must be > 0, got {self.block_length}")

    def select(self, st, ctx, conf_BxL, cand_BxL, i_B):
        blk = jnp.clip((iota_BxL(ctx) - ctx.prompt_len) // self.block_length, 0, len(self.thresholds) - 1)
        thr = jnp.asarray(self.thresholds, jnp.float32)[blk]
        return cand_BxL & ((rank_desc(conf_BxL) == 0) | (conf_BxL >= thr)), st


@dataclasses.dataclass(frozen=True)
class RecordingThreshold(Threshold):
    """The threshold rule, also accumulating per-block sums of committed confidences (calibration runs)."""

    block_length: int = 32
    num_blocks: int = 1

    def init(self, ctx, n_mask_B):
        z = jnp.zeros((ctx.batch, self.num_blocks), jnp.float32)
        return {"sum": z, "sq": z, "cnt": z}

    def select(self, st, ctx, conf_BxL, cand_BxL, i_B):
        commit, _ = Threshold.select(self, st, ctx, conf_BxL, cand_BxL, i_B)
        blk = jnp.clip((iota_BxL(ctx) - ctx.prompt_len) // self.block_length, 0, self.num_blocks - 1)
        onehot = jax.nn.one_hot(blk, self.num_blocks, dtype=jnp.float32) * commit[..., None]
        c = jnp.where(commit, conf_BxL, 0.0)[..., None]
        return commit, {"sum": st["sum"] + jnp.sum(onehot * c, 1), "sq": st["sq"] + jnp.sum(onehot * c * c, 1),
                        "cnt": st["cnt"] + jnp.sum(onehot, 1)}


def calibrate(model, prompt_ids, gen_length: int, block_length: int = 32, base_threshold: float = 0.9,
              beta: float = 1.0, lo: float = 0.5, hi: float = 0.95, cache: str = "dual") -> dict:
    """Decode one prompt and derive per-block thresholds. Returns a JSON-able dict (see `save`/`load`)."""
    from dllm_jax.engine import DualCache, FixedBlocks, NoCache, PrefixCache, Schedule
    from dllm_jax.engine.loop import make_loop
    from dllm_jax.generate import prepare

    nb = gen_length // block_length
    caches = {"none": NoCache(), "prefix": PrefixCache(), "dual": DualCache()}
    sched = Schedule(window=FixedBlocks(block_length), cache=caches[cache],
                     accept=RecordingThreshold(threshold=base_threshold, block_length=block_length, num_blocks=nb))
    ctx, x, valid, pos, keys = prepare(model, [list(prompt_ids)], gen_length, sched)

    @jax.jit
    def go(params, x, valid, pos, keys):
        carry, cond, body = make_loop(params, model.cfg, sched, ctx, x, valid, pos, keys)
        return jax.lax.while_loop(cond, body, carry)["a"]

    st = jax.tree.map(lambda a: np.asarray(a)[0], go(model.params, x, valid, pos, keys))
    cnt = np.maximum(st["cnt"], 1)
    mean = st["sum"] / cnt
    std = np.sqrt(np.maximum(st["sq"] / cnt - mean ** 2, 0.0))
    thr = np.where(st["cnt"] > 0, np.clip(mean - beta * std, lo, hi), base_threshold)
    return {"block_length": block_length, "gen_length": gen_length, "thresholds": [float(t) for t in thr],
            "base_threshold": base_threshold, "beta": beta, "lo": lo, "hi": hi, "cache": cache,
            "committed_per_block": [int(c) for c in st["cnt"]]}


def save(calib: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(calib, f, indent=1)
    os.replace(tmp, path)


def load(path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
        return {**d, "block_length": int(d["block_length"]), "thresholds": [float(t) for t in d["thresholds"]]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not an OSDT calibration file: {e}") from None
