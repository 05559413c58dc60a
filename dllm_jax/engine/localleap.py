"""LocalLeap acceptance: confident anchors let their neighbours through at a relaxed threshold.

anchors = candidates with conf >= tau; a candidate within `radius` positions of an anchor is accepted when its
conf >= tau_relaxed; the most confident candidate is always accepted (>= 1 token per forward). (No official code;
defaults of the public third-party version: tau 0.9, radius 4, tau_relaxed 0.75 (0.8 for Dream).)
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from dllm_jax.engine.acceptance import Accept
from dllm_jax.engine.context import dynamic, rank_desc


def dilate(mask_BxL, radius: int):
    """True where some True of `mask_BxL` lies within `radius` positions (static radius)."""
    out = mask_BxL
    L = mask_BxL.shape[1]
    for d in range(1, radius + 1):
        out = out | jnp.pad(mask_BxL[:, d:], ((0, 0), (0, d))) | jnp.pad(mask_BxL[:, : L - d], ((0, 0), (d, 0)))
    return out


@dataclasses.dataclass(frozen=True)
class LocalLeap(Accept):
    threshold: float = dynamic(0.9)
    relaxed: float = dynamic(0.75)
    radius: int = 4

    def validate(self, ctx, window):
        if not (0.0 < self.relaxed <= self.threshold <= 1.0):
            raise ValueError(f"LocalLeap needs 0 < relaxed ({self.relaxed}) <= threshold ({self.threshold}) <= 1")
        if self.radius < 0:
            raise ValueError(f"radius must be >= 0, got {self.radius}")

    def select(self, st, ctx, conf_BxL, cand_BxL, i_B):
        anchors = cand_BxL & (conf_BxL >= self.threshold)
        near = dilate(anchors, self.radius)
        ok = anchors | (near & (conf_BxL >= self.relaxed)) | (rank_desc(conf_BxL) == 0)
        return cand_BxL & ok, st
