"""BlockBatch (Laurence-Wu/BlockBatch): N block-size branches of one request run as N rows of one batched forward.

A request is expanded into N consecutive rows (`BranchBlocks.rows_per_request`); branch k (row k of the group) uses
block size `block_sizes[k]` (sorted ascending). Everything that couples the rows lives in the window policy:

  window  `BranchBlocks`: per-branch block window (the block-size-aligned block holding the branch's first mask), the
          per-branch token-probability maps, the merge / leader-sync policy, refresh triggers, EOS cycle and exits
          (`coordinate`, called by the loop after every commit; it may rewrite the canvas and copy KV rows);
  accept  `Threshold` (LLaDA; the official code reuses Fast-dLLM's rule inside the block) or `NoCommit` (Dream: the
          commits of the official Dream code are done by the window policy, they need the EOS-aware target window);
  cache   `BranchCache`: every forward is one batched forward over all rows of the group; block steps are dual-cache
          window forwards of each branch's block (Dream: the predecessor window [s-1, e-1), i.e. Dream's right shift
          done by moving the window), full (init / refresh) forwards rewrite every row's cache.

NFE: the loop counts one forward per batched model call (= the official `nfe_counted`). The state also records what
the official functions return: LLaDA original_bulk returns the winner's participation count (`ret_nfe`), the RMS
variant and Dream return model calls.

Variants (`variant`): "bulk" = LLaDA generate_blockBatching_original_bulk.py; "rms" = LLaDA
generate_blockBatching_expand_sim_refresh_dominent_RMS.py (KV-divergence refresh trigger); "dream" = Dream
generate_blockBatching_original_bulk.py. Reproduced quirks are named in comments ("quirk:").
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp

from dllm_jax.engine.acceptance import Accept
from dllm_jax.engine.caches import Cache
from dllm_jax.engine.context import first_true, in_range, iota_BxL
from dllm_jax.engine.sampling import vocab_argmax
from dllm_jax.engine.windows import Window
from dllm_jax.programs import ProgramCache

_NEG = -jnp.inf


def _grp(a, N):
    return a.reshape((-1, N) + a.shape[1:])


def _ungrp(a):
    return a.reshape((-1,) + a.shape[2:])


def _gany(m_B, N):
    """Per-row: does any row of my group satisfy m?"""
    return jnp.repeat(jnp.any(_grp(m_B, N), axis=1), N)


def _row_take(a_BxL, idx_B):
    return jnp.take_along_axis(a_BxL, jnp.clip(idx_B, 0, a_BxL.shape[1] - 1)[:, None], axis=1)[:, 0]


@dataclasses.dataclass(frozen=True)
class NoCommit(Accept):
    """The loop commits nothing: the window policy commits in `coordinate` (BlockBatch Dream)."""

    def select(self, st, ctx, conf_BxL, cand_BxL, i_B):
        return jnp.zeros_like(cand_BxL), st

    def block_done(self, st, ctx, i_B, no_mask_B):
        return jnp.zeros_like(no_mask_B)


@dataclasses.dataclass(frozen=True)
class BranchCache(Cache):
    """One batched forward per step: full forwards (init / refresh) when the window policy says so, otherwise each
    participating row's block through the dual cache (its K/V overwrite the block slots of its own cache row; queries
    attend to the whole row, stale K/V outside the block). predecessor=True (Dream): the window is [s-1, e-1) and
    raw row j predicts position s+j."""

    has_cache: bool = True
    predecessor: bool = False

    def needs_full(self, st, ctx, wst):
        return wst["refresh"]

    def width(self, ctx, window):
        # predecessor window: the loop applies Dream's shift inside the window (position p <- row p-1), so the
        # static window needs one more row than the block to reach the block's last position
        return min(window.max_width(ctx) + (1 if self.predecessor else 0), ctx.total_len)

    def plan_window(self, st, ctx, wst, W):
        off = 1 if self.predecessor else 0
        lo = wst["s"] - off
        hi = wst["e"] - off
        w0 = jnp.clip(lo, 0, ctx.total_len - W).astype(jnp.int32)
        pos = w0[:, None] + jnp.arange(W, dtype=jnp.int32)[None]
        write = (pos >= lo[:, None]) & (pos < hi[:, None]) & wst["deno"][:, None]
        return w0, write, lo.astype(jnp.int32)

    def new_block(self, st, block_done_B):
        return st


@dataclasses.dataclass(frozen=True)
class BranchBlocks(Window):
    block_sizes: tuple = (4, 8, 16, 32)
    variant: str = "bulk"  # "bulk" | "rms" | "dream"
    threshold: float = 0.9  # Dream block commits (LLaDA: the acceptance rule)
    sync_threshold: int = 8
    conf_threshold: float = 0.5  # merge threshold tau_merge (LLaDA: > ; Dream: >=)
    refresh_block_size: int = 32
    eos_id: int = -1  # LLaDA: config eos (EOS cycle); Dream: eos id if stop_on_eos else -1
    map_slots: int = 4  # Dream probability-map slots per position (entries >= tau_merge that can matter)

    wants_aux = True

    # -- static helpers -------------------------------------------------------------------------------------------
    @property
    def rows_per_request(self):
        return len(self.block_sizes)

    @property
    def _n(self):
        return len(self.block_sizes)

    @property
    def _keep(self):
        # token-probability map entries kept (official _TOKEN_PROB_THRESHOLD)
        return 0.2 if self.variant == "dream" else 0.1

    @property
    def _k(self):
        if self.variant == "dream":
            return self.map_slots
        # entries that can pass the merge test p > tau (and p > keep): fewer than 1 / max(tau, keep) of them exist
        c = max(self.conf_threshold, self._keep)
        return int(max(1, math.ceil(1.0 / c) - 1))

    def validate(self, ctx):
        if ctx.batch % self._n:
            raise ValueError(f"BlockBatch needs {self._n} rows per request (one per block size); use "
                             "dllm_jax.engine.blockbatch.generate_branches")
        for bs in self.block_sizes:
            if bs <= 0 or ctx.gen_length % bs:
                raise ValueError(f"gen_length ({ctx.gen_length}) must be divisible by every block size ({bs})")
        if self.variant == "dream" and ctx.prompt_len < 1:
            raise ValueError("Dream BlockBatch needs a non-empty prompt (predecessor window)")

    def max_width(self, ctx):
        return min(max(self.block_sizes), ctx.gen_length)

    def _bs(self, ctx):
        return jnp.tile(jnp.asarray(self.block_sizes, jnp.int32), ctx.batch // self._n)

    def _k_of_row(self, ctx):
        return jnp.arange(ctx.batch, dtype=jnp.int32) % self._n

    def init(self, ctx, x_BxL):
        B, P, L = ctx.batch, ctx.prompt_len, ctx.total_len
        s = jnp.full((B,), P, jnp.int32)
        z = jnp.zeros((B,), jnp.int32)
        f = jnp.zeros((B,), bool)
        K = self._k
        return {
            "s": s, "e": jnp.minimum(s + self._bs(ctx), L).astype(jnp.int32), "done": f, "td": z, "cnt": z,
            "flag": f, "hit": f, "eprob": jnp.zeros((B,), jnp.float32), "prog": z, "part": z, "calls": z,
            "mid": jnp.full((B, L, K), -1, jnp.int32), "mp": jnp.zeros((B, L, K), jnp.float32),
            "refresh": jnp.ones((B,), bool), "first": jnp.ones((B,), bool), "deno": f, "fin": f,
            "winner": f, "ret_nfe": z, "exit": z,
        }

    # -- forward statistics ---------------------------------------------------------------------------------------
    def aux_stats(self, st, ctx, logits, pos):
        lg = logits.astype(jnp.float32)
        V = lg.shape[-1]
        p = jax.nn.softmax(lg, axis=-1)
        if self.variant != "dream":
            K = min(self._k, V)
            topv, topi = jax.lax.top_k(p, K)
            topv = jnp.where(topv > self._keep, topv, 0.0)
            # quirk: eos_prob = softmax(logits.to(bfloat16))[eos] (ties among branches are broken by bf16 rounding)
            eos = max(self.eos_id, 0)
            lb = lg.astype(jnp.bfloat16).astype(jnp.float32)
            m = jnp.max(lb, axis=-1, keepdims=True)
            e = jnp.exp(lb - m)
            peos = (e[..., eos] / jnp.sum(e, axis=-1)).astype(jnp.bfloat16).astype(jnp.float32)
            return {"mid": topi.astype(jnp.int32), "mp": topv, "peos": peos}
        # Dream: commits use a float32 softmax with the mask column at -1e4; the map uses the plain softmax
        ls = lg.at[..., ctx.mask_id].set(-1e4)
        ps = jax.nn.softmax(ls, axis=-1)
        pred = vocab_argmax(ls).astype(jnp.int32)
        conf = jnp.take_along_axis(ps, pred[..., None], axis=-1)[..., 0]
        t2v, t2i = jax.lax.top_k(p, 2)
        slot_ids = jax.vmap(lambda m, q: m[q])(st["mid"], jnp.clip(pos, 0, ctx.total_len - 1))  # [B, T, K]
        slotp = jnp.where(slot_ids >= 0, jnp.take_along_axis(p, jnp.maximum(slot_ids, 0), axis=-1), 0.0)
        return {"pred": pred, "conf": conf, "t2i": t2i.astype(jnp.int32), "t2v": t2v, "slotp": slotp}

    # -- shared pieces --------------------------------------------------------------------------------------------
    def _snap_llada(self, ctx, x, bs):
        """update_block_window: the block (aligned to multiples of bs from P) holding the first mask; none: done."""
        P, L = ctx.prompt_len, ctx.total_len
        pos = iota_BxL(ctx)
        fm = first_true((pos >= P) & (x == ctx.mask_id), jnp.full((ctx.batch,), L, jnp.int32))
        has = fm < L
        s = P + ((fm - P) // bs) * bs
        e = jnp.minimum(s + bs, L)
        return jnp.where(has, s, L).astype(jnp.int32), jnp.where(has, e, L).astype(jnp.int32), ~has

    def _merge(self, ctx, x, st, done, s, e, inclusive, mode):
        """One policy merge pass (all dsts at once: a dst's sources come later in the block_end order and are only
        modified when they are dsts themselves, so the sequential official loop is order independent).
        Returns (x, filled_B)."""
        N, P, L, M = self._n, ctx.prompt_len, ctx.total_len, ctx.mask_id
        pos = jnp.arange(L, dtype=jnp.int32)
        xg, dg, sg, eg = _grp(x, N), _grp(done, N), _grp(s, N), _grp(e, N)
        gen = pos >= P
        mg = xg == M
        dec = ~mg & gen
        both = dec[:, :, None, :] & dec[:, None, :, :]
        eos = self.eos_id
        if mode == "dream" and eos >= 0:
            fe = first_true(_ungrp(dec) & (x == eos), jnp.full((x.shape[0],), L, jnp.int32))
            cend = _grp(jnp.minimum(fe + 1, L), N)  # counted end (absolute), compare only before it
            both = both & (pos[None, None, None, :] < jnp.minimum(cend[:, :, None], cend[:, None, :])[..., None])
        compat = jnp.all(~both | (xg[:, :, None, :] == xg[:, None, :, :]), axis=-1)  # [R, d, j]
        elig = ~dg
        k = jnp.arange(N)
        later = (eg[:, None, :] < eg[:, :, None]) | ((eg[:, None, :] == eg[:, :, None]) & (k[None, None, :] >
                                                                                         k[None, :, None]))
        src = elig[:, :, None] & elig[:, None, :] & later & compat  # [R, d, j]
        inwin = (pos[None, None, :] >= sg[..., None]) & (pos[None, None, :] < eg[..., None])  # [R, N, L]
        if mode == "bulk":  # the union of the compatible sources' current windows
            allowed = jnp.any(src[..., None] & inwin[:, None, :, :], axis=2)
        elif mode == "rms":  # [P, max source block_end)
            end = jnp.max(jnp.where(src, eg[:, None, :], 0), axis=2)
            allowed = gen[None, None, :] & (pos[None, None, :] < end[..., None])
        else:  # dream: dst's own current block
            allowed = inwin & jnp.any(src, axis=2)[..., None]
        tok = jnp.broadcast_to(xg[:, None, :, :], src.shape + (L,))  # [R, d, j, L]
        valid = src[..., None] & (tok != M)
        if mode == "dream" and eos >= 0:
            fe_g = _grp(fe, N)
            valid = valid & ~((fe_g[:, None, :, None] < L) & (pos[None, None, None, :] > fe_g[:, None, :, None]))
        midg, mpg = _grp(st["mid"], N), _grp(st["mp"], N)  # [R, d, L, K]
        hitk = midg[:, :, None, :, :] == tok[..., None]
        prob = jnp.sum(jnp.where(hitk, mpg[:, :, None, :, :], 0.0), axis=-1)
        prob = jnp.where(valid, prob, 0.0)
        best = jnp.max(prob, axis=2)
        jb = jnp.argmax(prob, axis=2)
        btok = jnp.take_along_axis(tok, jb[:, :, None, :], axis=2)[:, :, 0, :]
        ok = best >= self.conf_threshold if inclusive else best > self.conf_threshold
        fill = allowed & mg & ok & (best > 0)
        return _ungrp(jnp.where(fill, btok, xg)), _ungrp(jnp.sum(fill, axis=-1)).astype(jnp.int32)

    def _leader(self, td, N):
        """Row index (global) of each group's leader: max tokens_decoded, first branch on ties; and its td."""
        g = _grp(td, N)
        li = jnp.argmax(g, axis=1)
        base = jnp.arange(g.shape[0]) * N
        lead = jnp.repeat(base + li, N).astype(jnp.int32)
        return lead, td[lead]

    def _rms_refresh(self, ctx, kv, active):
        """RMS chord-shell test: each active row of every K/V tensor flattened and L2-normalised; r_i^2 =
        ||z_i - mu||^2, rho^2 = max(0, 1 - ||mu||^2), both averaged over tensors; refresh if max r^2 > 2 rho^2
        (never with < 2 active rows)."""
        N = self._n
        ag = _grp(active, N).astype(jnp.float32)  # [R, N]
        n_act = jnp.sum(ag, axis=1)
        r2 = 0.0
        rho2 = 0.0
        n_t = 0
        for name in ("k", "v"):
            a = kv[name].astype(jnp.float32)  # [layers, B, L, K, hd]
            nl = a.shape[0]
            a = a.reshape(nl, -1, N, a.shape[2] * a.shape[3] * a.shape[4])  # [layers, R, N, D]
            z = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
            mu = jnp.sum(z * ag[None, :, :, None], axis=2) / jnp.maximum(n_act, 1)[None, :, None]
            r2 = r2 + jnp.sum(jnp.square(z - mu[:, :, None, :]), axis=-1).sum(0)  # [R, N]
            rho2 = rho2 + jnp.maximum(1.0 - jnp.sum(jnp.square(mu), axis=-1), 0.0).sum(0)  # [R]
            n_t += nl
        r2, rho2 = r2 / n_t, rho2 / n_t
        rmax2 = jnp.max(jnp.where(ag > 0, r2, -jnp.inf), axis=1)
        # deviation: identical rows (r^2 = rho^2 = 0 in exact arithmetic, e.g. right after the broadcast init) must
        # not trigger on float round-off, so the comparison carries a 1e-6 margin
        return jnp.repeat((n_act >= 2) & (rmax2 > 2.0 * rho2 + 1e-6), N)

    def _finish(self, st, x, exiting, winner_row, ret):
        """Groups exiting now: every row takes the winner's row (the request's output), record winner and NFE."""
        B = x.shape[0]
        rows = jnp.arange(B, dtype=jnp.int32)
        src = jnp.where(exiting, winner_row, rows)
        x = x[src]
        st = {**st, "fin": st["fin"] | exiting, "winner": jnp.where(exiting, rows == winner_row, st["winner"]),
              "ret_nfe": jnp.where(exiting, ret, st["ret_nfe"])}
        return st, x

    # -- the policy step ------------------------------------------------------------------------------------------
    def coordinate(self, st, ctx, x, aux, did_full, n_commit, kv):
        if self.variant == "dream":
            return self._coord_dream(st, ctx, x, aux, did_full, kv)
        return self._coord_llada(st, ctx, x, aux, did_full, n_commit, kv)

    def _coord_llada(self, st, ctx, x, aux, did_full, n_commit, kv):
        N, P, L, M = self._n, ctx.prompt_len, ctx.total_len, ctx.mask_id
        B = ctx.batch
        rms = self.variant == "rms"
        pos = iota_BxL(ctx)
        bs = self._bs(ctx)
        kk = self._k_of_row(ctx)
        rows = jnp.arange(B, dtype=jnp.int32)
        run = ~st["fin"]
        full = did_full & run
        first = full & st["first"]
        refresh = full & ~st["first"]
        block = run & ~did_full
        s, e, done = st["s"], st["e"], st["done"]
        active = run & ~done
        cov_rows = jnp.where(first, run, jnp.where(refresh, active, block & st["deno"]))
        part = st["part"] + cov_rows.astype(jnp.int32)
        calls = st["calls"] + run.astype(jnp.int32)
        # probability maps: reset and refilled on every position the row's forward covered
        cov = cov_rows[:, None] & (full[:, None] | in_range(pos, s, e))
        mid = jnp.where(cov[..., None], aux["mid"], st["mid"])
        mp = jnp.where(cov[..., None], aux["mp"], st["mp"])
        td = st["td"] + jnp.where(run, n_commit, 0)
        cnt = jnp.where(full & cov_rows, 0, st["cnt"])
        flag = jnp.where(full & cov_rows, False, st["flag"])
        # EOS cycle: a covered row whose block is complete and holds EOS records p(EOS) from this forward's logits
        blk = in_range(pos, s, e)
        complete = ~jnp.any(blk & (x == M), axis=1)
        eos = self.eos_id
        first_eos = first_true(blk & (x == eos), jnp.full((B,), L, jnp.int32))
        check_rows = cov_rows if rms else (block & st["deno"])
        hit_now = check_rows & complete & (first_eos < L) & (eos >= 0)
        hit = st["hit"] | hit_now
        eprob = jnp.where(hit_now, _row_take(aux["peos"], first_eos), st["eprob"])
        # EOS-ready exit (original_bulk: after block steps; RMS: also after refresh forwards, not after init)
        check = (block | refresh) if rms else block
        ready = check & hit & complete & run
        any_ready = _gany(ready, N)
        w_eos = _grp(jnp.where(ready, eprob, -jnp.inf), N)
        eos_winner = jnp.repeat(jnp.arange(B // N) * N + jnp.argmax(w_eos, axis=1), N).astype(jnp.int32)

        # policy: advance, merge, sync. quirk (original_bulk): skipped after a refresh whose active rows all still have
        # masks in their blocks (the official loop goes straight to the next block step); when the refresh completed
        # every block, the official next iteration runs no forward, only this policy step: folded in here
        masks_left = active & ~complete
        if rms:
            do_pol = run & ~any_ready
        else:
            do_pol = run & ~any_ready & (first | block | (refresh & ~_gany(masks_left, N)))
        src_total = rows
        nd = done
        ns, ne = s, e
        if rms:
            # quirk (RMS): right after the init forward every branch is hard-synced to the leader
            lead, tdl = self._leader(td, N)
            hs = first & do_pol & (rows != lead) & ~nd & (tdl > 0)
            x = jnp.where(hs[:, None], x[lead], x)
            src_total = jnp.where(hs, lead, src_total)
            hit = jnp.where(hs, hit[lead], hit)
            eprob = jnp.where(hs, eprob[lead], eprob)
            ss, se, sd = self._snap_llada(ctx, x, bs)
            ns, ne, nd = jnp.where(hs, ss, ns), jnp.where(hs, se, ne), jnp.where(hs, sd | nd[lead], nd)
            td = jnp.where(hs, tdl, td)
        # advance every live branch whose block is complete
        blkn = in_range(pos, ns, ne)
        compl = ~jnp.any(blkn & (x == M), axis=1)
        adv = do_pol & ~nd & compl
        ss, se, sd = self._snap_llada(ctx, x, bs)
        ns, ne, nd = jnp.where(adv, ss, ns), jnp.where(adv, se, ne), jnp.where(adv, sd, nd)
        if not rms:
            cnt = jnp.where(adv & ~nd, cnt + 1, cnt)
            flag = flag | (adv & ~nd & (cnt * bs >= self.refresh_block_size))
        # merge (skipped when the leader has decoded nothing)
        _, tdl0 = self._leader(td, N)
        pol = do_pol & (tdl0 > 0)
        st_m = {**st, "mid": mid, "mp": mp}
        xm, filled = self._merge(ctx, x, st_m, nd, ns, ne, False, "rms" if rms else "bulk")
        x = jnp.where(pol[:, None], xm, x)
        filled = jnp.where(pol, filled, 0)
        blkn = in_range(pos, ns, ne)
        compl = ~jnp.any(blkn & (x == M), axis=1)
        madv = (filled > 0) & ~nd & compl
        ss, se, sd = self._snap_llada(ctx, x, bs)
        ns, ne, nd = jnp.where(madv, ss, ns), jnp.where(madv, se, ne), jnp.where(madv, sd, nd)
        if rms:
            td = td + filled  # quirk: RMS counts merged tokens as decoded (original_bulk does not)
        else:
            cnt = jnp.where(madv & ~nd, cnt + 1, cnt)
            flag = flag | (madv & ~nd & (cnt * bs >= self.refresh_block_size))
        # sync: branches more than sync_threshold tokens behind the leader copy its row and KV row
        lead, tdl = self._leader(td, N)
        sy = pol & (rows != lead) & ~nd & (tdl - td > self.sync_threshold)
        x = jnp.where(sy[:, None], x[lead], x)
        src_total = jnp.where(sy, src_total[lead], src_total)
        if rms:  # quirk (RMS): the EOS flag travels with the sync (a stale flag can end the run later)
            hit = jnp.where(sy, hit[lead], hit)
            eprob = jnp.where(sy, eprob[lead], eprob)
        ss, se, sd = self._snap_llada(ctx, x, bs)
        ns, ne, nd = jnp.where(sy, ss, ns), jnp.where(sy, se, ne), jnp.where(sy, sd | nd[lead], nd)
        td = jnp.where(sy, tdl, td)
        # next forward: refresh or block step
        act_n = run & ~nd
        if rms:
            force = _gany(sy, N)
            kv_n = jax.tree.map(lambda a: jnp.take(a, src_total, axis=1), kv)
            want = self._rms_refresh(ctx, kv_n, act_n) & ~force
        else:
            want = _gany(flag & act_n, N)
        # natural exit: every branch done -> quirk: the first branch (max progress; every branch has progress G)
        all_done = ~_gany(act_n, N) & run & ~any_ready
        nat_winner = jnp.repeat(jnp.arange(B // N) * N, N).astype(jnp.int32)
        blkn = in_range(pos, ns, ne)
        has_m = jnp.any(blkn & (x == M), axis=1)
        st = {**st, "s": ns, "e": ne, "done": nd, "td": td, "cnt": cnt, "flag": flag, "hit": hit, "eprob": eprob,
              "part": part, "calls": calls, "mid": mid, "mp": mp,
              "refresh": run & want, "first": st["first"] & ~full, "deno": act_n & (True if rms else has_m)}
        exiting = any_ready | all_done
        winner = jnp.where(any_ready, eos_winner, nat_winner)
        ret = part[winner] if not rms else calls
        st, x = self._finish(st, x, exiting, winner, ret)
        st["exit"] = jnp.where(any_ready, 2, jnp.where(all_done, 1, st["exit"]))
        return st, x, src_total

    # -- Dream ----------------------------------------------------------------------------------------------------
    def _snap_dream(self, ctx, x, bs):
        """_update_block_window_for_branch: window of the first mask before the first EOS (EOS-limited end),
        progress = that mask's offset, tokens_decoded = decoded tokens up to and including the first EOS."""
        P, L, G, M = ctx.prompt_len, ctx.total_len, ctx.gen_length, ctx.mask_id
        B = ctx.batch
        pos = iota_BxL(ctx)
        gen = pos >= P
        eos = self.eos_id
        fe = first_true(gen & (x == eos), jnp.full((B,), L, jnp.int32)) if eos >= 0 else jnp.full((B,), L,
                                                                                                   jnp.int32)
        cend = jnp.minimum(fe + 1, L)
        td = jnp.sum(gen & (x != M) & (pos < cend[:, None]), axis=1).astype(jnp.int32)
        fm = first_true(gen & (x == M) & (pos < fe[:, None]), jnp.full((B,), L, jnp.int32))
        has = fm < L
        s = P + ((fm - P) // bs) * bs
        e = jnp.minimum(s + bs, fe)
        prog_done = jnp.where(fe < L, fe - P + 1, G)
        prog = jnp.where(has, fm - P, prog_done)
        s = jnp.where(has, s, P + prog_done)
        e = jnp.where(has, e, P + prog_done)
        return {"s": s.astype(jnp.int32), "e": e.astype(jnp.int32), "done": ~has, "prog": prog.astype(jnp.int32),
                "td": td, "fe": fe}

    def _dream_ready(self, ctx, x, sn, run):
        """_check_eos_ready: EOS with no mask before it (eos_ready; winner max (td, progress, block size)), else a
        branch with no mask at all (branch_complete; winner = the largest block size among them)."""
        N, P, L, M = self._n, ctx.prompt_len, ctx.total_len, ctx.mask_id
        B = ctx.batch
        pos = iota_BxL(ctx)
        gen = pos >= P
        kk = self._k_of_row(ctx)
        base = jnp.repeat(jnp.arange(B // N) * N, N).astype(jnp.int32)
        if self.eos_id >= 0:
            fe = sn["fe"]
            before = jnp.any(gen & (x == M) & (pos < fe[:, None]), axis=1)
            ready = run & (fe < L) & ~before
        else:
            ready = jnp.zeros((B,), bool)
        score = (sn["td"] * (ctx.gen_length + 2) + sn["prog"]) * N + kk  # lexicographic (td, progress, size)
        wr = base + jnp.argmax(_grp(jnp.where(ready, score, -1), N), axis=1).repeat(N)
        complete = run & ~jnp.any(gen & (x == M), axis=1)
        wc = base + jnp.argmax(_grp(jnp.where(complete, kk, -1), N), axis=1).repeat(N)
        any_r, any_c = _gany(ready, N), _gany(complete, N)
        return any_r, any_c, jnp.where(any_r, wr, wc).astype(jnp.int32)

    def _dream_map_update(self, ctx, st, aux, cov):
        """Official _update_prob_map: entries with p > 0.2 are set (never removed until a full forward clears the
        map). Only entries >= tau_merge can pass a merge, so `map_slots` slots keep those (a slot whose value fell
        below tau_merge is free)."""
        tau = self.conf_threshold
        mid, mp = st["mid"], st["mp"]
        upd = cov[..., None] & (mid >= 0) & (aux["slotp"] > self._keep)
        mp = jnp.where(upd, aux["slotp"], mp)
        for r in range(2):
            t, p = aux["t2i"][..., r], aux["t2v"][..., r]
            present = jnp.any(mid == t[..., None], axis=-1)
            free = (mp < tau) | (mid < 0)
            slot = jnp.argmax(free, axis=-1)
            ins = cov & ~present & (p >= tau) & jnp.any(free, axis=-1)
            onehot = (jnp.arange(mid.shape[-1]) == slot[..., None]) & ins[..., None]
            mid = jnp.where(onehot, t[..., None], mid)
            mp = jnp.where(onehot, p[..., None], mp)
        return mid, mp

    def _coord_dream(self, st, ctx, x, aux, did_full, kv):
        N, P, L, M = self._n, ctx.prompt_len, ctx.total_len, ctx.mask_id
        B = ctx.batch
        pos = iota_BxL(ctx)
        bs = self._bs(ctx)
        rows = jnp.arange(B, dtype=jnp.int32)
        run = ~st["fin"]
        full = did_full & run
        block = run & ~did_full
        rows_on = run & ~st["done"]
        s, e = st["s"], st["e"]
        calls = st["calls"] + run.astype(jnp.int32)
        pred, conf = aux["pred"], aux["conf"]
        win = in_range(pos, s, e)
        target = win & (x == M) & rows_on[:, None]
        # full forward (init / refresh): seed ONE token per branch, the first mask of its (EOS-limited) block, greedy
        # with the mask column suppressed, no threshold; the branch's probability map is cleared
        fm = first_true(target, jnp.full((B,), L, jnp.int32))
        seeded = full & (fm < L)
        seed = seeded[:, None] & (pos == fm[:, None])
        # block step: threshold (>=) on the target window, else the single most confident position, preferring a
        # non-EOS prediction (quirk: the preference matters only with stop_on_eos; otherwise EOS is id -1)
        tr = target & (conf >= self.threshold)
        mc = jnp.where(target, conf, _NEG)
        ne_ok = target & (pred != self.eos_id)
        mc_ne = jnp.where(ne_ok, conf, _NEG)
        fb = jnp.where(jnp.any(ne_ok, axis=1), jnp.argmax(mc_ne, axis=1), jnp.argmax(mc, axis=1))
        tr = tr | (~jnp.any(tr, axis=1, keepdims=True) & jnp.any(target, axis=1, keepdims=True)
                   & (pos == fb[:, None]))
        commit = jnp.where(full[:, None], seed, tr & block[:, None])
        x = jnp.where(commit, pred, x)
        # probability map: block steps update the target window; full forwards clear seeded branches
        cov = block[:, None] & target.any(axis=1, keepdims=True) & win
        mid, mp = self._dream_map_update(ctx, st, aux, cov)
        mid = jnp.where(seeded[:, None, None], -1, mid)
        mp = jnp.where(seeded[:, None, None], 0.0, mp)
        # advance (the frontier delta counts towards the refresh trigger)
        sn = self._snap_dream(ctx, x, bs)
        adv = rows_on & (block | seeded)
        cnt = st["cnt"] + jnp.where(adv, jnp.maximum(sn["prog"] - st["prog"], 0), 0)
        cnt = jnp.where(full & rows_on, 0, cnt)
        prog = jnp.where(run, sn["prog"], st["prog"])
        # exits after the forward (quirk: Dream ends as soon as ONE branch has no mask, the largest such block wins)
        r1, c1, w1 = self._dream_ready(ctx, x, sn, run)
        ex1 = r1 | c1
        # policy after block steps: merge (dst's own block, >= tau), then sync to the leader
        pol = block & ~ex1
        lead0, tdl0 = self._leader(sn["td"], N)
        pol = pol & (tdl0 > 0)
        st_m = {**st, "mid": mid, "mp": mp}
        xm, filled = self._merge(ctx, x, st_m, sn["done"], sn["s"], sn["e"], True, "dream")
        x = jnp.where(pol[:, None], xm, x)
        filled = jnp.where(pol, filled, 0)
        sn2 = self._snap_dream(ctx, x, bs)
        cnt = cnt + jnp.where(filled > 0, jnp.maximum(sn2["prog"] - prog, 0), 0)
        prog = jnp.where(run, sn2["prog"], prog)
        lead, tdl = self._leader(sn2["td"], N)
        sy = pol & (rows != lead) & ~sn2["done"] & (tdl - sn2["td"] > self.sync_threshold)
        x = jnp.where(sy[:, None], x[lead], x)
        src = jnp.where(sy, lead, rows)
        cnt = jnp.where(sy, cnt[lead], cnt)
        mid = jnp.where(sy[:, None, None], mid[lead], mid)
        mp = jnp.where(sy[:, None, None], mp[lead], mp)
        sn3 = self._snap_dream(ctx, x, bs)
        prog = jnp.where(run, sn3["prog"], prog)
        r2, c2, w2 = self._dream_ready(ctx, x, sn3, run & ~ex1)
        ex2 = (r2 | c2) & pol
        any_r = r1 | (r2 & ex2)
        exiting = ex1 | ex2
        winner = jnp.where(ex1, w1, w2)
        act = run & ~sn3["done"]
        want = block & _gany(act & (cnt >= self.refresh_block_size), N)
        st = {**st, "s": sn3["s"], "e": sn3["e"], "done": sn3["done"], "td": sn3["td"], "cnt": cnt, "prog": prog,
              "calls": calls, "mid": mid, "mp": mp, "refresh": run & want, "first": st["first"] & ~full,
              "deno": act}
        st, x = self._finish(st, x, exiting, winner, calls)
        st["exit"] = jnp.where(exiting, jnp.where(any_r, 2, 1), st["exit"])
        return st, x, src

    def advance(self, st, ctx, x_BxL, block_done_B):
        return st, st["fin"]


# ---------------------------------------------------------------------------------------------------------------
# Runner: expand requests into branch rows, run the one loop, return each request's winner.

@dataclasses.dataclass
class BranchOutput:
    sequences: list  # per request: the winner's row (Dream stop_on_eos: cut after the EOS)
    nfe: list  # batched forwards (= model calls)
    nfe_returned: list  # what the official function returns (LLaDA original_bulk: the winner's participations)
    winner: list  # winning branch index per request
    exit: list  # "natural" / "eos"
    raw_row_forwards: list  # sum over branches of the forwards each branch took part in (LLaDA original_bulk)
    prompt_len: int = 0  # bucketed prompt length: sequences[r][prompt_len:] is request r's generation
    compile_time_s: float = 0.0  # 0 when the program came from the in-process cache
    run_time_s: float = 0.0


_JIT = ProgramCache("blockbatch")


def generate_branches(model, prompt_ids, *, gen_length: int, schedule, bucket: bool = False, seed: int = 0):
    import importlib

    import numpy as np

    from dllm_jax.engine.loop import make_loop

    G = importlib.import_module("dllm_jax.generate")
    win = schedule.window
    N = win.rows_per_request
    rows = G._as_rows(prompt_ids, None)
    expanded = [r for r in rows for _ in range(N)]
    ctx, x, valid, pos, keys = G.prepare(model, expanded, gen_length, schedule, None, bucket, seed)
    key = (model.cfg, schedule, ctx)
    t0 = time.perf_counter()
    fn = _JIT.get(key)
    if fn is None:
        def run(params, x, valid, pos, keys):
            carry, cond, body = make_loop(params, model.cfg, schedule, ctx, x, valid, pos, keys)
            c = jax.lax.while_loop(cond, body, carry)
            return {"x": c["x"], "nfe": c["nfe"], "w": c["w"], "unfinished": c["active"]}

        fn = jax.jit(run).lower(model.params, x, valid, pos, keys).compile()
        _JIT.put(key, fn)
    t1 = time.perf_counter()
    out = jax.tree.map(np.asarray, jax.block_until_ready(fn(model.params, x, valid, pos, keys)))
    t2 = time.perf_counter()
    w = out["w"]
    seqs, nfe, ret, winner, ex, raw = [], [], [], [], [], []
    for r in range(len(rows)):
        g = slice(r * N, (r + 1) * N)
        k = int(np.argmax(w["winner"][g])) if w["winner"][g].any() else 0
        seq = out["x"][r * N + k]
        code = int(w["exit"][r * N])
        if win.variant == "dream" and code == 2 and win.eos_id >= 0:
            gen = seq[ctx.prompt_len:]
            hits = np.nonzero(gen == win.eos_id)[0]
            if len(hits):
                seq = seq[: ctx.prompt_len + int(hits[0]) + 1]
        seqs.append(seq)
        nfe.append(int(out["nfe"][r * N]))
        ret.append(int(w["ret_nfe"][r * N]))
        winner.append(k)
        ex.append({1: "natural", 2: "eos"}.get(code, "unfinished"))
        raw.append(int(w["part"][g].sum()))
    return BranchOutput(seqs, nfe, ret, winner, ex, raw, ctx.prompt_len, t1 - t0, t2 - t1)
