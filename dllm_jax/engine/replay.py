"""Trace replay: an acceptance rule that commits exactly the counts recorded by `generate(..., trace=True)`.

Benchmarks on random weights cannot run data-dependent rules (thresholds) meaningfully: random logits are flat, so
a threshold commits one token per forward. `ReplayCounts` instead commits, at a row's k-th forward, exactly the number
of tokens the recorded row committed at its k-th forward (the most confident candidates, as any rule would), and ends
a block exactly where the recorded row's window moved on. With the recorded window and cache policies (fixed blocks;
data-independent cache refreshes) the replayed run makes the same forwards of the same kinds (full/cached), so its NFE
and its compute pattern equal the recorded ones: the cost of a real decode on a network of another size.

Row b of the batch replays recorded row b % R. Windows that depend on the model's predictions (AdaBlock, DSB) are
not replayable this way (`replayable` says so).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from dllm_jax.engine.acceptance import Accept
from dllm_jax.engine.context import rank_desc
from dllm_jax.engine.loop import Schedule
from dllm_jax.engine.windows import FixedBlocks


@dataclasses.dataclass(frozen=True)
class ReplayCounts(Accept):
    """counts[r][k]: tokens recorded row r committed at its k-th (select-visible) forward; block_end[r][k]: its block
    ended after that forward; length[r]: number of recorded forwards. Past the record, commit everything."""

    counts: tuple = ()
    block_end: tuple = ()
    length: tuple = ()

    def _tables(self):
        return (jnp.asarray(np.asarray(self.counts, np.int32)), jnp.asarray(np.asarray(self.block_end, bool)),
                jnp.asarray(np.asarray(self.length, np.int32)))

    def init(self, ctx, n_mask_B):
        return {"t": jnp.zeros(n_mask_B.shape, jnp.int32)}

    def _row(self, B):
        return jnp.arange(B, dtype=jnp.int32) % len(self.length)

    def select(self, st, ctx, conf_BxL, cand_BxL, i_B):
        counts, _, length = self._tables()
        B = cand_BxL.shape[0]
        r, t = self._row(B), st["t"]
        k = jnp.where(t < length[r], counts[r, jnp.minimum(t, counts.shape[1] - 1)], ctx.total_len)
        return cand_BxL & (rank_desc(conf_BxL) < k[:, None]), {"t": t + 1}

    def block_done(self, st, ctx, i_B, no_mask_B):
        _, ends, length = self._tables()
        B = no_mask_B.shape[0]
        r, t = self._row(B), st["t"]
        recorded = ends[r, jnp.clip(t - 1, 0, ends.shape[1] - 1)] & (t >= 1)
        return jnp.where(t < length[r], recorded, no_mask_B | recorded)


def replayable(sched: Schedule) -> bool:
    """Whether `replay_schedule` reproduces this schedule's forwards exactly (fixed blocks; the cache decisions then
    depend only on commit counts and block ends)."""
    return isinstance(sched.window, FixedBlocks)


def replay_tables(trace: dict, nfe, refresh_commit_first: bool = False):
    """Per-row (counts, block_end, length) from a `generate(..., trace=True)` trace and its NFE.

    refresh_commit_first: the schedule's refresh forwards commit the first mask without consulting the acceptance
    rule (Fast-dLLM Dream's block sampler), so they are left out of the replayed counts."""
    n, s, full = (np.asarray(trace[k]) for k in ("n", "s", "full"))
    nfe = np.asarray(nfe)
    rows_c, rows_e = [], []
    for b in range(n.shape[1]):
        m = int(nfe[b])
        sb = s[:m, b]
        end = np.ones(m, bool)
        end[:-1] = sb[1:] != sb[:-1]
        keep = ~full[:m, b] if refresh_commit_first else np.ones(m, bool)
        rows_c.append(n[:m, b][keep].astype(int).tolist())
        rows_e.append(end[keep].tolist())
    T = max(1, max(len(c) for c in rows_c))
    counts = tuple(tuple(c + [0] * (T - len(c))) for c in rows_c)
    ends = tuple(tuple(e + [True] * (T - len(e))) for e in rows_e)
    return counts, ends, tuple(len(c) for c in rows_c)


def replay_schedule(sched: Schedule, trace: dict, nfe) -> Schedule:
    """`sched` with its acceptance rule replaced by the recorded commit counts (see module doc)."""
    if not replayable(sched):
        raise ValueError(f"schedule {sched.name!r} has a data-dependent window ({type(sched.window).__name__}); "
                         "its forwards cannot be replayed from commit counts")
    counts, ends, length = replay_tables(trace, nfe, sched.cache.refresh_commit == "first")
    acc = ReplayCounts(counts=counts, block_end=ends, length=length)
    return sched.replace(accept=acc, name=f"{sched.name}[replay]")
