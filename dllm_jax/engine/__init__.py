"""The denoising engine: one loop (loop.py) and three kinds of small policies (windows, acceptance, caches)."""

from dllm_jax.engine.acceptance import (  # noqa: F401
    Accept, DreamCarryThreshold, DreamOrigin, DreamQuota, Factor, Threshold, TopKQuota)
from dllm_jax.engine.caches import Cache, DualCache, NoCache, PrefixCache  # noqa: F401
from dllm_jax.engine.context import Ctx  # noqa: F401
from dllm_jax.engine.loop import Schedule, run  # noqa: F401
from dllm_jax.engine.sampling import TokenSampler  # noqa: F401
from dllm_jax.engine.windows import FixedBlocks, Window  # noqa: F401
