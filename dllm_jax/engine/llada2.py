"""LLaDA 2.x `generate` as block-diffusion policies: a BlockWindow (engine/block_diffusion.py) with the two things the
official loops add, and nothing else of their own.

* No prefill (`prefill=False`): LLaDA 2.x recomputes x[:, :block_end] at every step (NoBlockCache), so the prompt's
  whole blocks get no forward of their own; decoding starts at the block holding the first masked position.
* LLaDA2.0 `eos_early_stop` (`early_eos=True`): after a step whose committed tokens include eos_id, if no mask lies
  between the prompt end and the FIRST eos of the whole sequence (searched from position 0, prompt included), the
  official function returns x[:, :eos_pos + 1] at once (prompt included). The row is finished there and the window
  records `early` and `eos_pos` (canvas index) for the runner.
* LLaDA2.1 token editing (`editing=True`, its `generate`): per forward, M2T (the acceptance rule: the masks with
  p > threshold if at least num_to_transfer of them, else the num_to_transfer most confident) and T2T: every position
  of the block that was neither a mask before this forward nor a prompt position, with p > editing_threshold and
  argmax != its token, takes the argmax (done here, in `coordinate`, from the forward's per-position argmax and
  probability: `wants_aux`). The block is left after a forward that started without masks and made no edit, or once
  it has no mask and `max_post_steps` mask-free forwards were made (the official loop breaks before the next one).
Both 2.x stop rules after a block (2.0 always, 2.1 with eos_early_stop) are BlockWindow's `stop_after_block`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from dllm_jax.engine.block_diffusion import DONE, BlockWindow
from dllm_jax.engine.context import dynamic, first_true, iota_BxL
from dllm_jax.engine.sampling import _softmax_f32, vocab_argmax


@dataclasses.dataclass(frozen=True)
class LLaDA2Window(BlockWindow):
    complete: str = "none"
    end_rule: str = "ceil"
    lockstep: bool = False  # the official functions are batch-1: every row decides alone
    early_eos: bool = False  # LLaDA2.0 eos_early_stop (mid-block return)
    eos_id: int = -1
    editing: bool = False  # LLaDA2.1 token-to-token editing and post steps
    editing_threshold: float = dynamic(0.9)
    max_post_steps: int = dynamic(16)
    prefill: bool = False  # no prefill forward (the official code recomputes the prompt); True with cache="block"
    # its candidates and the editing reads span the whole block: the LM head stays on every computed row
    reads_within_max_width = False

    # the attention of the official forwards: "soft01" = LLaDA2.1's 0/1 block pattern added as a bias (its keys
    # limited to the window end by NoBlockCache), "hard" = block-causal (the keys of every query end at its block end)
    attention: str = "hard"

    def adapt_model(self, model):
        """The model with this sampler's attention (called by engine/block_runner.py before the run)."""
        cfg = model.cfg.replace(block_causal=self.block_size, block_causal_prompt=False,
                                block_mask_mode=self.attention)
        return dataclasses.replace(model, cfg=cfg)

    @property
    def wants_aux(self):
        return self.editing

    def aux_stats(self, st, ctx, logits_BxTxV, pos_BxT):
        # the greedy x0 and its probability at every position (what the official T2T test reads)
        x0 = vocab_argmax(logits_BxTxV).astype(jnp.int32)
        p = jnp.take_along_axis(_softmax_f32(logits_BxTxV), x0[..., None], axis=-1)[..., 0]
        return {"x0": x0, "p": p}

    def init_layout(self, ctx, x, key_valid, positions):
        st = super().init_layout(ctx, x, key_valid, positions)  # prefill=False: no prefill forward
        B = ctx.batch
        return {**st, "ps": jnp.zeros((B,), jnp.int32), "early": jnp.zeros((B,), bool),
                "eos_pos": jnp.full((B,), ctx.total_len, jnp.int32)}

    def coordinate(self, st, ctx, x, aux, did_full_B, n_commit_B, kv):
        if self.editing:
            return self._coordinate_editing(st, ctx, x, aux)
        live = st["alive"] & (st["kind"] != DONE)
        early = jnp.zeros_like(live)
        if self.early_eos:
            pos = iota_BxL(ctx)
            newly = st["premask"] & (x != ctx.mask_id)
            committed_eos = jnp.any(newly & (x == self.eos_id), axis=1)
            eos_pos = first_true((x == self.eos_id) & (pos >= st["origin"][:, None]),
                                 jnp.full((ctx.batch,), ctx.total_len, jnp.int32))
            masks_before = jnp.any((x == ctx.mask_id) & (pos >= st["gen0"][:, None]) & (pos < eos_pos[:, None]),
                                   axis=1)
            early = live & committed_eos & ~masks_before
        st, x, src = super().coordinate(st, ctx, x, aux, did_full_B, n_commit_B, kv)
        if self.early_eos:
            st = {**st, "kind": jnp.where(early, DONE, st["kind"]).astype(jnp.int32),
                  "early": st["early"] | early, "eos_pos": jnp.where(early, eos_pos, st["eos_pos"]),
                  "new_block": st["new_block"] | early}
        return st, x, src

    def _coordinate_editing(self, st, ctx, x, aux):
        B = ctx.batch
        pos = iota_BxL(ctx)
        live = st["alive"] & (st["kind"] != DONE)
        a, be = self._block_range(st)
        in_blk = (pos >= a[:, None]) & (pos < be[:, None])
        zone = in_blk & (pos >= st["gen0"][:, None]) & ~st["premask"]  # committed earlier in this block
        edit = live[:, None] & zone & (aux["p"] > self.editing_threshold) & (aux["x0"] != x)
        x = jnp.where(edit, aux["x0"], x)
        started_clean = ~jnp.any(st["premask"] & in_blk, axis=1)
        ps = st["ps"] + (live & started_clean).astype(jnp.int32)
        clean_now = ~jnp.any((x == ctx.mask_id) & in_blk, axis=1)
        leave = live & ((started_clean & ~jnp.any(edit, axis=1)) | (clean_now & (ps + 1 > self.max_post_steps)))
        st = {**st, "ps": jnp.where(leave, 0, ps).astype(jnp.int32), "new_block": jnp.zeros((B,), bool)}
        st = self._next_block(st, ctx, x, leave)
        st = {**st, "new_block": st["new_block"] | (live & (st["kind"] == DONE))}
        return st, x, None
