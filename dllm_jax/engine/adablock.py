"""AdaBlock-dLLM window policy: the block end is chosen from the first forward of each block (lgxi24/AdaBlock-dLLM).

Blocks are contiguous and never slide: block k starts where block k-1 ended. At the first forward of a block
(`resolve`, with the forward's own argmax tokens and confidences) the policy looks at the predictions in
[s, s + min(int(0.25 * G), G - generated)): among positions predicted as a delimiter it takes the most confident one
(first on ties, `torch.max`); if that confidence >= delimiter_threshold the block is [s, that position] (so length
1 is possible and it may exceed the initial block length up to the look-ahead size); otherwise, or without a
delimiter in the look-ahead, the block is [s, s + min(init_block_length, remaining)).

Quirk kept (official): only the best delimiter is tested; a less confident delimiter is never used when the best one
fails the threshold. The choice costs no forward: the same logits then commit with the acceptance rule.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from dllm_jax.engine.context import iota_BxL, in_range
from dllm_jax.engine.windows import Window

# Dream's hard-coded delimiter list (newline-bearing Qwen2 token ids) in generation_utils_adablock.py.
DREAM_DELIMITERS = (198, 271, 280, 319, 340, 382, 401, 532, 624, 630, 692, 698, 921, 1248, 1837, 1939, 2219, 2533,
                    3276, 3876, 4894, 5267, 14750, 68327)


@dataclasses.dataclass(frozen=True)
class DelimiterBlocks(Window):
    init_block_length: int = 32
    delimiter_ids: tuple = (198,)
    delimiter_threshold: float = math.inf  # inf = fixed blocks of init_block_length
    lookahead_frac: float = 0.25
    reads_within_max_width = True  # resolve reads [s, s + lookahead), the block ends within max_width

    def validate(self, ctx):
        if self.init_block_length <= 0:
            raise ValueError(f"init_block_length must be > 0, got {self.init_block_length}")

    def _lookahead(self, ctx):
        return int(self.lookahead_frac * ctx.gen_length)

    def max_width(self, ctx):
        return max(1, min(ctx.gen_length, max(self.init_block_length, self._lookahead(ctx))))

    def init(self, ctx, x_BxL):
        s = jnp.full((ctx.batch,), ctx.prompt_len, jnp.int32)
        return {"s": s, "e": jnp.minimum(s + self.init_block_length, ctx.total_len).astype(jnp.int32)}

    def resolve(self, st, ctx, x_BxL, x0_BxL, conf_BxL, block_first_forward_B):
        s = st["s"]
        remaining = ctx.total_len - s
        default_e = s + jnp.minimum(self.init_block_length, remaining)
        look = jnp.minimum(self._lookahead(ctx), remaining)
        pos = iota_BxL(ctx)
        is_delim = jnp.zeros(x0_BxL.shape, bool)
        for d in self.delimiter_ids:
            is_delim = is_delim | (x0_BxL == d)
        cand = is_delim & in_range(pos, s, s + look)
        c = jnp.where(cand, conf_BxL, -jnp.inf)
        best = jnp.argmax(c, axis=1).astype(jnp.int32)  # first maximum
        best_conf = jnp.max(c, axis=1)
        use = jnp.any(cand, axis=1) & (best_conf >= self.delimiter_threshold)
        e = jnp.where(use, best + 1, default_e).astype(jnp.int32)
        return {**st, "e": jnp.where(block_first_forward_B, e, st["e"])}

    def advance(self, st, ctx, x_BxL, block_done_B):
        s = jnp.where(block_done_B, st["e"], st["s"]).astype(jnp.int32)
        e = jnp.where(block_done_B, jnp.minimum(s + self.init_block_length, ctx.total_len), st["e"]).astype(jnp.int32)
        return {"s": s, "e": e}, s >= ctx.total_len
