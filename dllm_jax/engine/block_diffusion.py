"""Block diffusion on the one loop: blocks aligned to model positions, sub-blocks, the finished-block KV cache,
batch-coupled ("lockstep") or per-row decisions, stop rules. Used by Fast-dLLM v2, SDAR (dllm_jax/presets_block.py)
and meant to be reused by any block-diffusion sampler (LLaDA 2.x).

How to use (a preset = these three policies + a runner):

    win = BlockWindow(block_size=bl, new_tokens=G, sub_block=sbs, complete="ar" | "store" | "none", ...)
    sched = Schedule(window=win, accept=<rule>, cache=BlockCache() or NoBlockCache(), ...)
    dllm_jax.engine.block_runner.generate_blocks(model, prompts, schedule=sched, layout="left" | "right_masked")

* `BlockWindow` is a state machine run once per forward (in `coordinate`, which may rewrite the canvas). Blocks are
  [origin + k*bl, origin + (k+1)*bl) in canvas coordinates, `origin` = the canvas index of model position 0 (left
  padding moves it; so blocks follow the model's positions, as the official code's absolute blocks do). Decoding
  starts at the block holding the first masked position (the prompt tail belongs to that block). The kind of the NEXT
  forward is in state["kind"]:
    PREFILL   one full forward of the prompt's whole blocks [0, k0*bl) (when k0 >= 1); with complete="ar" its
              (shifted) last row commits the first generated token when the prompt ends on a block boundary
              (Fast-dLLM v2's autoregressive first token);
    DENOISE   a forward of the current block (all of it recomputed and written to the cache), candidates = the masks
              of the current sub-block (the first one still holding a mask; sub_block=None: the whole block);
    SUB       Fast-dLLM v2's sub-block cache (`sub_cache=True`): only the sub-block's K/V are recomputed, the rest of
              the block keeps the K/V of the last DENOISE forward (stale, as in the official code); chosen when the
              block already has that cache and no row has a mask at the sub-block's first position;
    COMPLETE  once the block has no mask: "ar" = Fast-dLLM v2's cache-append forward (its last row predicts the
              next block's first token, committed there), "store" = SDAR's store forward (K/V of the finished block
              written, nothing committed); "none" = no forward (no-cache samplers: the next block starts at once);
    DONE      the row is finished (the loop freezes it).
  lockstep=True takes every decision over the whole batch, as the official batched code does (a block/sub-block
  ends when NO row has a mask left, a stop in one row ends all); lockstep=False decides per row (a row's output is
  its batch-of-one output).
* Stop rules: `stop_in_block` (Fast-dLLM v2 `generate`: before every forward, the first stop token after the
  block's start with no mask before it ends the block without completion), `stop_after_block` (after a block, a
  stop id anywhere after the prompt ends generation: SDAR, Fast-dLLM's per-block check), `row_finish`
  (`batch_sample`: a row that commits the stop token is finished at the end of that block, its text after the stop
  set to `pad_after_stop`, its completion token = pad, then it leaves the batch).
* `BlockCache` (has_cache) / `NoBlockCache` read the window state: which forward is full, the window [w0, w0 + W)
  (the current block, W = bl + 1 with complete="ar" so the last row's prediction lands on the next block's first
  position), which K/V it writes, and the visible keys of every query (`key_end`): keys [0, min(input_end,
  blockend(q, g))) with g = the mask block size of that forward kind (`complete_mask`, `denoise_mask`: Fast-dLLM v2's
  denoising forwards use 32 whatever the block size; 0 = no mask), in model positions. Cached K/V of finished blocks
  are exact for block-causal models: they never depend on later positions.
* The loop's per-block forward counter `i` (what quota rules read) restarts at every block: the window reports
  block changes in state["new_block"].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dllm_jax.engine.acceptance import Accept
from dllm_jax.engine.caches import Cache
from dllm_jax.engine.context import Ctx, dynamic, first_true, iota_BxL, rank_desc, row_slice
from dllm_jax.engine.windows import Window

PREFILL, DENOISE, SUB, COMPLETE, DONE = 0, 1, 2, 3, 4
COMPLETE_MODES = ("ar", "store", "none")
END_RULES = ("new_tokens", "new_tokens_after_max_prompt", "ceil")


def block_end(m, g):
    """End (exclusive) of the g-block holding model position m (floor division, so negative m works)."""
    return (jnp.floor_divide(m, g) + 1) * g


@dataclasses.dataclass(frozen=True)
class BlockWindow(Window):
    block_size: int = 32
    new_tokens: int = 0  # the official max_new_tokens / gen_length (decides how many blocks are decoded)
    sub_block: int | None = None  # Fast-dLLM v2 small_block_size (must divide block_size); None = the whole block
    complete: str = "store"  # "ar" | "store" | "none" (see module docstring)
    # how many blocks: "new_tokens" = new_tokens // bl blocks from the first generated block (Fast-dLLM generate);
    # "new_tokens_after_max_prompt" = blocks up to new_tokens // bl + max prompt // bl (batch_sample); "ceil" = blocks
    # up to ceil((prompt + new_tokens) / bl) (SDAR, LLaDA 2.x)
    end_rule: str = "ceil"
    complete_mask: int = 0  # mask block size of PREFILL / COMPLETE forwards (0 = block_size)
    denoise_mask: int = 0  # mask block size of DENOISE forwards (0 = block_size; Fast-dLLM v2: 32)
    sub_cache: bool = False  # Fast-dLLM v2 use_block_cache
    lockstep: bool = True
    stop_ids: tuple = ()
    stop_in_block: bool = False
    stop_after_block: bool = False
    row_finish: bool = False
    pad_after_stop: int = -1
    # Fast-dLLM v2 batch_sample quirk: the completion token goes only to rows whose prompt ended before the block end
    # (or exactly at it when no prompt is longer); False gives it to every row whose position there is a mask
    ar_token_quirk: bool = False
    # mdm_sample_with_visualization: the first (autoregressive) token is not part of the generated text, so the
    # per-block stop check starts after it
    stop_skips_prefill_token: bool = False
    # Fast-dLLM v2: a prompt of exactly one block gets no prefill forward (the official test is `>`) and the model never
    # sees it: every forward covers the current block only, positions restart at 0 (the runner hides that block)
    skip_prompt_block: bool = False
    # what the official function returns (engine/block_runner.py): "canvas" (SDAR: the whole canvas), "truncate_stop"
    # (Fast-dLLM generate: cut after the first stop token, row-major), "rows" (batch_sample: one sequence per row, a
    # finished row up to its block end + 1), "generated" (the demo: generated ids after the prompt and first token)
    output: str = "canvas"
    # a prefill forward of the prompt's whole blocks (samplers without a KV cache recompute the prompt in every
    # forward and make none: prefill=False)
    prefill: bool = True

    # Every read of x0/conf is a candidate in [s, e) of the forward it serves: the current sub-block (DENOISE / SUB),
    # the next block's first position (COMPLETE "ar", the prompt-aligned PREFILL), nothing otherwise; e - s <= the
    # sub-block. resolve() reads only the canvas. So the LM head runs on the sub-block's rows (+1 for shifted
    # logits) instead of the whole block or canvas (loop.head_span); head_rows="all" restores the official work.
    reads_within_max_width = True

    # -- helpers -------------------------------------------------------------------------------------------------
    def _bl(self):
        return int(self.block_size)

    def _sbs(self):
        return int(self.sub_block or self.block_size)

    def max_width(self, ctx):
        return self._bl() + (1 if self.complete == "ar" else 0)

    def head_read_width(self, ctx):
        return self._sbs()

    def validate(self, ctx):
        bl, sbs = self._bl(), self._sbs()
        if bl <= 0:
            raise ValueError(f"block_size must be > 0, got {bl}")
        if sbs <= 0 or bl % sbs:
            raise ValueError(f"small_block_size ({sbs}) must divide block_size ({bl}): otherwise the positions after "
                             "the last whole sub-block are never decoded (the official loop never ends)")
        if self.complete not in COMPLETE_MODES:
            raise ValueError(f"complete must be one of {COMPLETE_MODES}, got {self.complete!r}")
        if self.end_rule not in END_RULES:
            raise ValueError(f"end_rule must be one of {END_RULES}, got {self.end_rule!r}")

    def _red(self, v_B, alive_B, how="any"):
        """Reduce a per-row condition over the batch in lockstep mode (alive rows only); identity otherwise."""
        if not self.lockstep:
            return v_B
        r = jnp.any(v_B & alive_B) if how == "any" else jnp.all(v_B | ~alive_B)
        return jnp.broadcast_to(r, v_B.shape)

    def _block_range(self, st):
        a = st["origin"] + st["blk"] * self._bl()
        return a, a + self._bl()

    # -- init ----------------------------------------------------------------------------------------------------
    def init(self, ctx, x_BxL):
        B = ctx.batch
        return self.init_layout(ctx, x_BxL, jnp.ones((B, ctx.total_len), bool),
                                jnp.broadcast_to(jnp.arange(ctx.total_len, dtype=jnp.int32), (B, ctx.total_len)))

    def init_layout(self, ctx, x, key_valid, positions):
        bl, B, L = self._bl(), ctx.batch, ctx.total_len
        pos = iota_BxL(ctx)
        first_valid = first_true(key_valid, jnp.zeros((B,), jnp.int32))
        origin = first_valid - jnp.take_along_axis(positions, first_valid[:, None], axis=1)[:, 0]
        gen0 = first_true((x == ctx.mask_id) & key_valid, jnp.full((B,), L, jnp.int32))  # first masked position
        m0 = gen0 - origin  # its model position (= the row's prompt length as the model sees it)
        alive = jnp.ones((B,), bool)
        k0 = m0 // bl
        if self.lockstep:
            k0 = jnp.broadcast_to(jnp.min(k0), (B,))
        if self.end_rule == "new_tokens":
            end = k0 + self.new_tokens // bl
        elif self.end_rule == "new_tokens_after_max_prompt":
            end = jnp.broadcast_to(jnp.max(m0) // bl, (B,)) + self.new_tokens // bl
        else:
            end = -(-(m0 + self.new_tokens) // bl)
        prefill = (k0 >= 1) & self.prefill
        pre_ar = prefill & (m0 == k0 * bl) & (self.complete == "ar")  # prompt ends on a block boundary
        s0 = origin + k0 * bl
        st = {
            "origin": origin.astype(jnp.int32), "gen0": gen0.astype(jnp.int32), "m0": m0.astype(jnp.int32),
            "blk": k0.astype(jnp.int32), "end": end.astype(jnp.int32), "sub": jnp.zeros((B,), jnp.int32),
            "kind": jnp.where(prefill, PREFILL, DENOISE).astype(jnp.int32), "bc": jnp.zeros((B,), bool),
            "alive": alive, "fin": jnp.zeros((B,), bool), "new_block": jnp.zeros((B,), bool),
            # the per-block stop check starts at `pl` (Fast-dLLM generate's prompt_length: after the prompt and the
            # autoregressive token), the after-block one and the final truncation at `orig`
            "pl": (gen0 + pre_ar).astype(jnp.int32),
            "orig": (gen0 + (pre_ar & self.stop_skips_prefill_token)).astype(jnp.int32),
            "pre_ar": pre_ar, "out_len": jnp.full((B,), L, jnp.int32),
            "premask": x == ctx.mask_id,
            "s": jnp.where(pre_ar, s0, 0).astype(jnp.int32), "e": jnp.where(pre_ar, s0 + 1, 0).astype(jnp.int32),
        }
        # rows with nothing to decode (no block) start DONE
        st["kind"] = jnp.where(~prefill & (k0 >= end), DONE, st["kind"]).astype(jnp.int32)
        st = jax.lax.cond(jnp.any(~prefill & (k0 < end)), lambda s: self._decide(s, ctx, x, ~prefill & (k0 < end)),
                          lambda s: s, st)
        return {**st, "new_block": jnp.zeros((B,), bool)}

    # -- the state machine ---------------------------------------------------------------------------------------
    def resolve(self, st, ctx, x_BxL, x0_BxL, conf_BxL, block_first_forward_B):
        return {**st, "premask": x_BxL == ctx.mask_id}  # what was masked before this forward's commit

    def _stop_first(self, ctx, x, lo_B, hi_B):
        """First stop token in [lo, hi) per row (L where none)."""
        pos = iota_BxL(ctx)
        hit = jnp.zeros(x.shape, bool)
        for t in self.stop_ids:
            hit = hit | (x == int(t))
        hit = hit & (pos >= lo_B[:, None]) & (pos < hi_B[:, None])
        return first_true(hit, jnp.full((ctx.batch,), ctx.total_len, jnp.int32))

    def _in_block_stop(self, st, ctx, x):
        """Fast-dLLM v2 `generate`: the first stop token after `pl` in the block (first row that has one, its first
        column; lockstep) with no mask before it (in any row) ends the block without a completion forward."""
        L = ctx.total_len
        _, be = self._block_range(st)
        fs = self._stop_first(ctx, x, st["pl"], be)
        has = fs < L
        if self.lockstep:
            r = jnp.argmax(has & st["alive"])
            col = fs[r] - st["pl"][r]
            any_has = jnp.any(has & st["alive"])
            cut = st["pl"] + col
        else:
            any_has, cut = has, fs
        pos = iota_BxL(ctx)
        m_before = jnp.any((x == ctx.mask_id) & (pos >= st["pl"][:, None]) & (pos < cut[:, None]), axis=1)
        return any_has & ~self._red(m_before, st["alive"])

    def _after_block_stop(self, st, ctx, x):
        fs = self._stop_first(ctx, x, st["orig"], jnp.full((ctx.batch,), ctx.total_len, jnp.int32))
        return self._red(fs < ctx.total_len, st["alive"])

    def _decide(self, st, ctx, x, rows_B):
        """For rows in `rows_B` (at the current block, nothing pending): the next forward of the block."""
        bl, sbs, L = self._bl(), self._sbs(), ctx.total_len
        nsb = bl // sbs
        a, be = self._block_range(st)
        blk_x = row_slice(x, jnp.clip(a, 0, L - bl), bl)
        masks = (blk_x == ctx.mask_id).reshape(ctx.batch, nsb, sbs).any(-1)  # [B, nsb]
        if self.lockstep:
            masks = jnp.broadcast_to(jnp.any(masks & st["alive"][:, None], axis=0), masks.shape)
        any_mask = jnp.any(masks, axis=1)
        sub = jnp.argmax(masks, axis=1).astype(jnp.int32)
        first_pos_mask = self._red(jnp.take_along_axis(blk_x, (sub * sbs)[:, None], axis=1)[:, 0] == ctx.mask_id,
                                   st["alive"])
        kind = jnp.where(self.sub_cache & st["bc"] & ~first_pos_mask, SUB, DENOISE)
        s, e = a + sub * sbs, a + (sub + 1) * sbs
        stop = self._in_block_stop(st, ctx, x) if self.stop_in_block else jnp.zeros((ctx.batch,), bool)
        # block finished: completion forward, or (no completion) straight to the next block / done
        done_blk = ~any_mask
        if self.complete == "ar":
            cs = jnp.where(self._gets_ar(st, ctx, be), be, 0)
            c_s, c_e = cs, jnp.where(cs > 0, be + 1, 0)
        else:
            c_s, c_e = jnp.zeros_like(s), jnp.zeros_like(e)
        new_kind = jnp.where(done_blk, COMPLETE, kind)
        s = jnp.where(done_blk, c_s, s)
        e = jnp.where(done_blk, c_e, e)
        if self.complete == "none":
            new_kind = jnp.where(done_blk, DONE, new_kind)  # rewritten by the caller's block step
        new_kind = jnp.where(stop, DONE, new_kind)
        upd = {"kind": new_kind.astype(jnp.int32), "sub": sub, "s": s.astype(jnp.int32), "e": e.astype(jnp.int32)}
        return {k: (jnp.where(rows_B, v, st[k]) if k in upd else st[k]) for k, v in {**st, **upd}.items()}

    def _gets_ar(self, st, ctx, be):
        if not self.ar_token_quirk:
            return st["alive"]
        # batch_sample: only rows whose prompt ended before the block end (or at it when no prompt is longer)
        longest = jnp.max(st["m0"])  # the official tensor keeps its width when finished rows leave
        mbe = be - st["origin"]
        return (st["m0"] < mbe) | ((st["m0"] == mbe) & (longest <= mbe))

    def _next_block(self, st, ctx, x, rows_B):
        """Rows in `rows_B` finished their block: move on (or finish), decide the next forward."""
        blk = jnp.where(rows_B, st["blk"] + 1, st["blk"])
        st = {**st, "blk": blk, "bc": jnp.where(rows_B, False, st["bc"]),
              "pl": jnp.where(rows_B, st["origin"] + blk * self._bl() + 1, st["pl"]).astype(jnp.int32),
              "new_block": st["new_block"] | rows_B}
        over = blk >= st["end"]
        if self.stop_after_block:
            over = over | self._after_block_stop(st, ctx, x)
        done = rows_B & over
        st = {**st, "kind": jnp.where(done, DONE, st["kind"]).astype(jnp.int32)}
        return self._decide(st, ctx, x, rows_B & ~done)

    def coordinate(self, st, ctx, x, aux, did_full_B, n_commit_B, kv):
        B, L = ctx.batch, ctx.total_len
        pos = iota_BxL(ctx)
        served = st["kind"]
        live = st["alive"] & (served != DONE)
        st = {**st, "new_block": jnp.zeros((B,), bool)}
        if self.row_finish and self.stop_ids:
            newly = st["premask"] & (x != ctx.mask_id) & (pos >= st["s"][:, None]) & (pos < st["e"][:, None])
            hit = jnp.zeros(x.shape, bool)
            for t in self.stop_ids:
                hit = hit | (x == int(t))
            st = {**st, "fin": st["fin"] | (live & (served != COMPLETE) & jnp.any(newly & hit, axis=1))}
        # after PREFILL: enter the first block
        after_pre = live & (served == PREFILL)
        st = {**st, "new_block": st["new_block"] | after_pre,
              "kind": jnp.where(after_pre, DENOISE, st["kind"]).astype(jnp.int32)}
        over = after_pre & (st["blk"] >= st["end"])
        if self.stop_after_block:
            over = over | (after_pre & self._after_block_stop(st, ctx, x))
        st = {**st, "kind": jnp.where(over, DONE, st["kind"]).astype(jnp.int32)}
        st = self._decide(st, ctx, x, after_pre & ~over)
        # after a DENOISE / SUB forward: the block cache exists; decide the next forward of the block
        after_den = live & ((served == DENOISE) | (served == SUB))
        st = {**st, "bc": st["bc"] | (live & (served == DENOISE))}
        st = self._decide(st, ctx, x, after_den)
        # batch_sample: at the end of a block, finished rows get pad after their first stop; if every row is
        # finished there is no completion forward
        if self.row_finish:
            to_complete = after_den & (st["kind"] == COMPLETE)
            _, be = self._block_range(st)
            fs = self._stop_first(ctx, x, st["gen0"], be)
            fill = to_complete & st["fin"] & (st["gen0"] < be)
            x = jnp.where(fill[:, None] & (pos > fs[:, None]) & (pos < be[:, None]) & (self.pad_after_stop >= 0),
                          self.pad_after_stop, x)
            all_fin = self._red(st["fin"], st["alive"], "all")
            stop_all = to_complete & all_fin
            st = {**st, "kind": jnp.where(stop_all, DONE, st["kind"]).astype(jnp.int32),
                  "out_len": jnp.where(stop_all, be, st["out_len"]).astype(jnp.int32)}
        if self.complete == "none":
            fin_blk = after_den & (st["kind"] == DONE) & ~(self.stop_in_block & self._in_block_stop(st, ctx, x))
            st = self._next_block(st, ctx, x, fin_blk)
        # after COMPLETE: finished rows (batch_sample) get pad as their completion token and leave; the others go on
        after_c = live & (served == COMPLETE)
        if self.row_finish:
            _, be = self._block_range(st)
            leave = after_c & st["fin"]
            x = jnp.where(leave[:, None] & (pos == be[:, None]) & (self.pad_after_stop >= 0), self.pad_after_stop, x)
            st = {**st, "out_len": jnp.where(leave, be + 1, st["out_len"]).astype(jnp.int32),
                  "alive": st["alive"] & ~leave, "kind": jnp.where(leave, DONE, st["kind"]).astype(jnp.int32)}
            after_c = after_c & ~leave
        st = self._next_block(st, ctx, x, after_c)
        st = {**st, "new_block": st["new_block"] | (live & (st["kind"] == DONE))}
        return st, x, None

    def advance(self, st, ctx, x_BxL, block_done_B):
        return st, st["kind"] == DONE


def _blockend_key_end(st, q_BxT, input_end_B, g):
    m = q_BxT - st["origin"][:, None]
    ke = jnp.broadcast_to(input_end_B[:, None], q_BxT.shape)
    if g:
        ke = jnp.minimum(ke, st["origin"][:, None] + block_end(m, g))
    return ke.astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class BlockCache(Cache):
    """The finished-block KV cache of block diffusion (with Fast-dLLM v2's sub-block cache when the window asks):
    a full forward only for the prompt's prefill; every other forward computes the current block (W = window width)
    over the cached K/V of the blocks before it. Reads everything from the BlockWindow state."""

    has_cache: bool = True
    window: BlockWindow | None = None  # set by `block_schedule` (masks per forward kind)

    def width(self, ctx, window):
        return window.max_width(ctx)

    def needs_full(self, st, ctx, wst):
        return wst["kind"] == PREFILL

    def full_key_end(self, st, ctx, wst):
        win = self.window
        bl = win._bl()
        q = iota_BxL(ctx)
        pre_end = wst["origin"] + wst["blk"] * bl  # the prefill covers the prompt's whole blocks
        return _blockend_key_end(wst, q, pre_end, win.complete_mask or bl)

    def plan_window(self, st, ctx, wst, W):
        win = self.window
        bl = win._bl()
        a = wst["origin"] + wst["blk"] * bl
        be = a + bl
        w0 = jnp.clip(a, 0, ctx.total_len - W).astype(jnp.int32)
        q = w0[:, None] + jnp.arange(W, dtype=jnp.int32)[None]
        kind = wst["kind"]
        sub = kind == SUB
        lo = jnp.where(sub, wst["s"], a)
        hi = jnp.where(sub, wst["e"], be)
        write = (q >= lo[:, None]) & (q < hi[:, None])
        g_c, g_d = win.complete_mask or bl, win.denoise_mask or bl
        ke_c = _blockend_key_end(wst, q, be, g_c)
        ke_d = _blockend_key_end(wst, q, be, g_d)
        ke_s = _blockend_key_end(wst, q, be, 0)
        ke = jnp.where((kind == COMPLETE)[:, None], ke_c, jnp.where(sub[:, None], ke_s, ke_d))
        return w0, write, jnp.where(sub, wst["s"], a).astype(jnp.int32), ke

    def block_ready(self, st):
        return jnp.ones_like(st["need_refresh"])


@dataclasses.dataclass(frozen=True)
class NoBlockCache(Cache):
    """No KV cache: every forward is a full forward whose queries see [0, current block end) under the block mask
    (LLaDA 2.x `generate` recomputes x[:, :block_end] each step)."""

    window: BlockWindow | None = None

    def full_key_end(self, st, ctx, wst):
        win = self.window
        bl = win._bl()
        q = iota_BxL(ctx)
        be = wst["origin"] + (wst["blk"] + 1) * bl
        return _blockend_key_end(wst, q, be, win.denoise_mask or bl)

    def block_ready(self, st):
        return jnp.ones_like(st["need_refresh"])


# -- acceptance rules of the block-diffusion samplers --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StrictThreshold(Accept):
    """Fast-dLLM v2 `sample_with_top_p` at temperature 0: every candidate with confidence > threshold (strict), plus
    per row the most confident candidate (first index on ties). A completion forward's single candidate (the next
    block's first token) is therefore always committed."""

    threshold: float = dynamic(0.9)

    def validate(self, ctx, window):
        if not (0.0 <= self.threshold <= 1.0):
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")

    def select(self, st, ctx, conf_BxL, cand_BxL, i_B):
        r = rank_desc(conf_BxL)
        return cand_BxL & ((r == 0) | (conf_BxL > self.threshold)), st

    def block_done(self, st, ctx, i_B, no_mask_B):
        return jnp.ones_like(no_mask_B)


def transfer_quota(block_length: int, steps: int, i_B):
    """SDAR get_num_transfer_tokens(block_length, steps)[i] (0 past the last step)."""
    base, rem = block_length // steps, block_length % steps
    q = base + (i_B < rem).astype(jnp.int32)
    return jnp.where(i_B < steps, q, 0)


def _first_k(mask_BxL, k_B):
    """The first k_B True positions of each row (lowest index first)."""
    c = jnp.cumsum(mask_BxL.astype(jnp.int32), axis=1)
    return mask_BxL & (c <= k_B[:, None])


@dataclasses.dataclass(frozen=True)
class QuotaThreshold(Accept):
    """SDAR's evaluation generator (huggingface_bd3.py, remasking='low_confidence') and LLaDA 2.0 `generate`: quota
    q = get_num_transfer_tokens(block_length, steps)[step]; with threshold < 1 the candidates with confidence >
    threshold (strict) are committed when there are at least q of them, else the q most confident (torch.topk;
    ties lowest index first); with threshold >= 1 always the top q."""

    block_length: int = 4
    steps: int = 4
    threshold: float = dynamic(1.0)

    def select(self, st, ctx, conf_BxL, cand_BxL, i_B):
        q = transfer_quota(self.block_length, self.steps, i_B)
        top = cand_BxL & (rank_desc(conf_BxL) < q[:, None])
        high = cand_BxL & (conf_BxL > self.threshold)
        use_high = (self.threshold < 1.0) & (jnp.sum(high, axis=1) >= q)
        return jnp.where(use_high[:, None], high, top), st

    def block_done(self, st, ctx, i_B, no_mask_B):
        return jnp.ones_like(no_mask_B)


SDAR_STRATEGIES = ("low_confidence_dynamic", "low_confidence_static", "sequential")


@dataclasses.dataclass(frozen=True)
class SDARScript(Accept):
    """SDAR generate.py (`block_diffusion_generate`) with greedy sampling (top_k=1): the confidence of every masked
    position is the probability of its token under the top-1-filtered distribution, exactly 1.0. Strategies:
    sequential (q positions from the first mask), low_confidence_static (top q), low_confidence_dynamic (all masks when
    1.0 > threshold and there are >= q of them, else top q). The official selection has no `where`: when q exceeds
    the masks left, torch.topk also picks non-mask positions of the block and the model's prediction overwrites them
    (the prompt tail, with steps=1); `overwrite=False` keeps them (corrected). Ties: lowest index first (masks before
    non-masks; the official tie order is unspecified, exact whenever q covers the whole block)."""

    strategy: str = "low_confidence_dynamic"
    block_length: int = 4
    steps: int = 4
    threshold: float = dynamic(0.85)
    overwrite: bool = True
    wants_window = True

    def select(self, st, ctx, conf_BxL, cand_BxL, i_B, window=None):
        q = transfer_quota(self.block_length, self.steps, i_B)
        n = jnp.sum(cand_BxL, axis=1)
        if self.strategy == "sequential":
            pos = iota_BxL(ctx)
            f = first_true(cand_BxL, jnp.full((ctx.batch,), ctx.total_len, jnp.int32))
            pick = window & (pos >= f[:, None]) & (pos < (f + q)[:, None])
            return (pick if self.overwrite else pick & cand_BxL), st
        masks = _first_k(cand_BxL, q)
        extra = _first_k(window & ~cand_BxL, jnp.maximum(q - n, 0)) if self.overwrite else jnp.zeros_like(cand_BxL)
        top = masks | extra
        if self.strategy == "low_confidence_static":
            return top, st
        high = cand_BxL & (1.0 > self.threshold)
        use_high = jnp.sum(high, axis=1) >= q
        return jnp.where(use_high[:, None], high, top), st

    def block_done(self, st, ctx, i_B, no_mask_B):
        return jnp.ones_like(no_mask_B)
