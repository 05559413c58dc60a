"""The denoising loop, written once: one `lax.while_loop`, one forward per iteration, policies decide the rest.

Iteration (per row, all rows batched; finished rows are frozen with `where`, not removed):
  1. the cache policy says whether this row needs a full (refresh) forward or a cached window forward;
  2. the forward runs (full, window, or both when rows disagree, so every row gets exactly its own semantics) and
     is reduced to canvas-sized [B, L] token proposals x0 and confidences;
  3. the window policy may resolve its window from these (AdaBlock); candidates = masked positions in [s, e);
  4. the acceptance rule picks the positions to commit (a refresh forward may commit only the first mask);
  5. states advance; a block is done when the acceptance rule and the cache policy agree; the window moves on.
     A window policy whose rows are branches of one request (BlockBatch) may also coordinate rows after the commit
     (`Window.coordinate`: rewrite the canvas, copy KV rows) using extra per-position statistics of the forward
     (`Window.aux_stats`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dllm_jax.engine.acceptance import Accept
from dllm_jax.engine.caches import Cache, NoCache
from dllm_jax.engine.context import Ctx, first_true, in_range, iota_BxL, row_slice, row_update
from dllm_jax.engine.sampling import TokenSampler, token_stats
from dllm_jax.engine.windows import Window
from dllm_jax.models import transformer
from dllm_jax.models.config import ModelConfig


HEAD_ROWS = ("masked", "window", "all")  # Schedule.head_rows


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A complete decoding schedule: window x acceptance x cache, plus token sampling options."""

    window: Window
    accept: Accept
    cache: Cache = NoCache()
    sampler: TokenSampler = TokenSampler()
    cfg_scale: float = 0.0
    eos_early_stop: bool = False
    max_nfe: int | None = None  # safety bound on forwards (default: 4 * gen_length + 8)
    name: str = "custom"
    gen_length: int | None = None  # set by presets: the generation length the schedule was built for
    # Where the LM head, softmax and confidences are computed: "window" = only at the positions this forward's
    # decisions can read (the window, see `head_span`), where the policies declare that bound and sampling is
    # deterministic, else everywhere; "masked" (default) = within that window only at the rows still masked, where
    # every decision reads masked positions only (`head_masked`), else as "window"; "all" = every position of every
    # forward (the reference codes' work; same tokens, kept for measurements).
    head_rows: str = "masked"
    # Continuous batching (serve): when rows disagree, run the full (refresh) forward on at most this many rows, the
    # rows that need it first; a row that needs a refresh beyond them waits one iteration (frozen, it draws the same
    # with per-row steps). None = a full forward over the whole batch (every row that needs it refreshes at once).
    refresh_rows: int | None = None

    def replace(self, **kw) -> "Schedule":
        return dataclasses.replace(self, **kw)

    def split_dynamic(self) -> tuple["Schedule", dict]:
        """Separate the numeric policy parameters marked `dynamic` (thresholds, factors, step counts that shape
        nothing) from the static structure, so schedules differing only in them share one compiled program."""
        values, parts = {}, {}
        for f in dataclasses.fields(self):
            pol = getattr(self, f.name)
            if not dataclasses.is_dataclass(pol):
                continue
            upd = {}
            for pf in dataclasses.fields(pol):
                if pf.metadata.get("dynamic"):
                    v = getattr(pol, pf.name)
                    values[f"{f.name}.{pf.name}"] = v
                    upd[pf.name] = None
            if upd:
                parts[f.name] = dataclasses.replace(pol, **upd)
        return dataclasses.replace(self, **parts), values

    def merge_dynamic(self, values: dict) -> "Schedule":
        """Inverse of split_dynamic (inside jit the values are tracers)."""
        parts: dict = {}
        for path, v in values.items():
            name, field = path.split(".")
            parts.setdefault(name, {})[field] = v
        return dataclasses.replace(self, **{n: dataclasses.replace(getattr(self, n), **u) for n, u in parts.items()})


def head_span(sched: Schedule, ctx: Ctx, wst):
    """(start [B], width) of the canvas positions whose x0/confidence this forward's decisions can read, or None
    (all positions). Exact by construction: a window policy declares `reads_within_max_width` when its resolve and
    candidates stay in [s, s + max_width), a cache policy `cand_within_window` when its candidates stay in the
    window; random draws (temperature, random confidence) are shaped by the rows computed, so they keep all rows."""
    if not _span_applies(sched):
        return None
    return wst["s"], sched.window.head_read_width(ctx)


def _span_applies(sched: Schedule) -> bool:
    win, smp = sched.window, sched.sampler
    return (sched.head_rows in ("window", "masked") and getattr(win, "reads_within_max_width", False)
            and getattr(sched.cache, "cand_within_window", True) and not getattr(win, "wants_aux", False)
            and smp.temperature == 0 and smp.confidence != "random")


def head_masked(sched: Schedule, cfg: ModelConfig) -> bool:
    """True when the LM head runs only on the still-masked rows of the head span (`Schedule.head_rows="masked"`).
    Exact by construction where, on top of `head_span`'s conditions, nothing reads x0/conf at a filled position: the
    acceptance rules read candidates (masked) only and the loop keeps the token of a filled position; the window
    declares `resolve_reads_masked_only`; no logit-processing rule (it sees every computed row), and no classifier-free
    guidance (it mixes two heads' logits). Shifted logits (Dream: position p reads row p - 1, the first position of a
    reference slice its own row) are handled by `_rows_read_at_masks`."""
    return (sched.head_rows == "masked" and _span_applies(sched)
            and getattr(sched.window, "resolve_reads_masked_only", False)
            and not getattr(sched.accept, "wants_logits", False) and sched.cfg_scale == 0)


def _rows_read_at_masks(cfg: ModelConfig, ctx: Ctx, rows, w0, slice_start):
    """[B, T] bool: the rows (canvas positions w0 + j of tokens `rows` [B, T]) whose logits a masked position reads.
    Unshifted: the masked rows. Shifted logits: position q reads its own row where q <= slice_start (the first
    position of a reference slice; 0 for a full forward) and row q - 1 after it, so row j is read by position j
    (own, masked) or by position j + 1 (masked, after slice_start); the row after the last is never read (the head
    span ends one row past the last position it covers)."""
    masked = rows == ctx.mask_id
    if not cfg.logit_shift:
        return masked
    q = w0[:, None] + jnp.arange(rows.shape[1], dtype=jnp.int32)[None]
    nxt = jnp.concatenate([masked[:, 1:], jnp.zeros_like(masked[:, :1])], axis=1)
    return (masked & (q <= slice_start[:, None])) | (nxt & (q + 1 > slice_start[:, None]))


def masked_head_widths(Wh: int) -> tuple:
    """The static row counts of the masked-rows head over a span of Wh rows (one compiled head per count; a forward
    takes the smallest that holds every row's masked count)."""
    return tuple(sorted({max(1, -(-Wh // d)) for d in (8, 4, 2, 1)}))


def _masked_head_stats(params, cfg: ModelConfig, sched: Schedule, ctx: Ctx, h, rows, read=None):
    """x0, conf [B, Wh] from hidden states h [B, Wh, D] of rows with tokens `rows` [B, Wh]: the head runs on the K
    first rows of each batch row with the masked rows first (K = the smallest of `masked_head_widths` that holds the
    largest masked count); a row not computed keeps its token with confidence -inf. Rows computed beyond the masked
    ones (a row with fewer masks) get their real statistics: nothing reads them. `read` [B, Wh] replaces "masked"
    by the rows the masked positions read (shifted logits, `_rows_read_at_masks`)."""
    B, Wh = rows.shape
    masked = rows == ctx.mask_id if read is None else read  # read: the rows read (`_rows_read_at_masks`)
    order = jnp.argsort(~masked, axis=1, stable=True).astype(jnp.int32)  # masked rows first, in position order
    widths = masked_head_widths(Wh)
    need = jnp.max(jnp.sum(masked, axis=1))
    b = jnp.arange(B)[:, None]

    def branch(K):
        def run():
            idx = order[:, :K]
            logits = transformer.head_rows(params, cfg, jnp.take_along_axis(h, idx[..., None], axis=1))
            x0k, confk = token_stats(sched.sampler, logits)
            return rows.at[b, idx].set(x0k), jnp.full((B, Wh), -jnp.inf, jnp.float32).at[b, idx].set(confk)
        return run

    if len(widths) == 1:
        return branch(widths[0])()
    return jax.lax.switch(jnp.sum(jnp.asarray(widths, jnp.int32) < need), [branch(K) for K in widths])


def head_width(sched: Schedule, cfg: ModelConfig, ctx: Ctx, T: int) -> int:
    """How many rows the LM head computes in a forward of T rows (the bench's cost model). With the masked-rows head
    (`head_masked`) this is an upper bound: the rows computed follow the data (at most this many)."""
    if not _span_applies(sched):
        return T
    return min(T, sched.window.head_read_width(ctx) + (1 if cfg.logit_shift else 0))


def _span_rows(cfg: ModelConfig, span, lo, T):
    """The rows [a, a + Wh) of a forward of T rows starting at canvas position `lo` ([B]) that cover `span`
    (one row more before it for a shifted-logits model: position p reads row p - 1); (None, None) = all rows."""
    if span is None:
        return None, None
    start, width = span
    shift = 1 if cfg.logit_shift else 0
    Wh = width + shift
    if Wh >= T:
        return None, None
    return jnp.clip(start - shift - lo, 0, T - Wh).astype(jnp.int32), Wh


def _rows(mask_B, a):
    """Broadcast a per-row [B] mask against an array [B, ...]."""
    return mask_B.reshape(mask_B.shape + (1,) * (a.ndim - 1))


def _keep_rows(mask_B, new, old):
    """Per-row state: `new` where mask_B, else `old` (rows that did not run this iteration keep their state)."""
    return jax.tree.map(lambda n, o: jnp.where(_rows(mask_B, n), n, o), new, old)


def _aux_stats(sched: Schedule, cfg: ModelConfig, ctx: Ctx, wst, logits, w0, slice_start):
    """Extra per-position statistics a window policy asks of every forward (`Window.wants_aux`, e.g. BlockBatch's
    token-probability maps), computed from the logits aligned to canvas positions (Dream's shift applied as for x0)
    and scattered into canvas-sized arrays [B, L, ...] (zeros where the forward computed nothing)."""
    win = sched.window
    if not getattr(win, "wants_aux", False):
        return {}
    B, T = logits.shape[:2]
    rel = jnp.arange(T, dtype=jnp.int32)[None]
    if cfg.logit_shift:
        own = (w0[:, None] + rel) <= slice_start[:, None]
        logits = jnp.where(own[..., None], logits, jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1))
    aux = win.aux_stats(wst, ctx, logits, w0[:, None] + rel)
    return {k: row_update(jnp.zeros((B, ctx.total_len) + v.shape[2:], v.dtype), v, w0) for k, v in aux.items()}


def _process_logits(sched: Schedule, ctx: Ctx, pst, logits, x_rows, w0, wst):
    """Stateful logit processing by the acceptance rule (dInfer credit decoding): the rule sees the logits of the
    computed rows and its per-position state for them, returns processed logits and the updated state (spliced back
    into the full [B, L, ...] state). Returns (logits, new state or None)."""
    acc = sched.accept
    if pst is None or not getattr(acc, "wants_logits", False):
        return logits, None
    T = logits.shape[1]
    rows_pos = w0[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
    in_win = (rows_pos >= wst["s"][:, None]) & (rows_pos < wst["e"][:, None])
    # per-position leaves ([B, L, ...]) are sliced to the computed rows and spliced back; per-row leaves ([B]) pass
    rows = jax.tree.map(lambda a: row_slice(a, w0, T) if a.ndim >= 2 else a, pst)
    logits, rows = acc.process_logits(rows, ctx, logits, (x_rows == ctx.mask_id) & in_win, in_win)
    return logits, jax.tree.map(lambda a, r: row_update(a, r, w0) if a.ndim >= 2 else r, pst, rows)


def _row_stats(sched: Schedule, cfg: ModelConfig, ctx: Ctx, wst, pst, logits, rows, w0, a, Wh, slice_start, keys,
               step, params=None):
    """Token statistics of a forward over `rows` [B, T] (canvas position w0 + j for row j) whose logits cover all
    T rows (a None) or only rows [a, a + Wh) (head rows): (x0, conf [B, T], aux, logit state); rows without logits
    keep their token with confidence -inf (no proposal). With `head_masked`, `logits` are the rows' hidden states
    and the head runs here on the masked ones (`params` needed)."""
    if a is not None:
        rows_all, rows, w0 = rows, row_slice(rows, a, Wh), w0 + a
    if head_masked(sched, cfg):
        x0, conf = _masked_head_stats(params, cfg, sched, ctx, logits, rows,
                                      _rows_read_at_masks(cfg, ctx, rows, w0, slice_start))
        aux = {}
    else:
        logits, pst = _process_logits(sched, ctx, pst, logits, rows, w0, wst)
        x0, conf = token_stats(sched.sampler, logits, keys, step)
        aux = _aux_stats(sched, cfg, ctx, wst, logits, w0, slice_start)
    if a is not None:
        x0 = row_update(rows_all, x0, a)
        conf = row_update(jnp.full(rows_all.shape, -jnp.inf, jnp.float32), conf, a)
    return x0, conf, aux, pst


def _full_stats(params, cfg: ModelConfig, sched: Schedule, ctx: Ctx, x, key_valid, positions, keys, step,
                wst=None, pst=None, key_end=None, span=None):
    a, Wh = _span_rows(cfg, span, jnp.zeros((ctx.batch,), jnp.int32), ctx.total_len)
    hid = head_masked(sched, cfg)
    if sched.cfg_scale > 0:
        # ML-GSAI classifier-free guidance: the unconditional input masks every prompt token; one batch of 2B.
        is_prompt = key_valid & (iota_BxL(ctx) < ctx.prompt_len)
        un = jnp.where(is_prompt, ctx.mask_id, x)
        both, kv = transformer.forward(params, cfg, jnp.concatenate([x, un]), jnp.concatenate([positions] * 2),
                                       jnp.concatenate([key_valid] * 2), prefix_len=ctx.prompt_len,
                                       key_end=None if key_end is None else jnp.concatenate([key_end] * 2),
                                       head_start=None if a is None else jnp.concatenate([a, a]), head_width=Wh)
        cond, unc = both[: ctx.batch], both[ctx.batch:]
        logits = unc + (sched.cfg_scale + 1.0) * (cond - unc)
        kv = jax.tree.map(lambda a: a[:, : ctx.batch], kv)
    else:
        logits, kv = transformer.forward(params, cfg, x, positions, key_valid, prefix_len=ctx.prompt_len,
                                         key_end=key_end, head_start=a, head_width=Wh, head_hidden=hid)
    zeros = jnp.zeros((ctx.batch,), jnp.int32)
    x0, conf, aux, pst = _row_stats(sched, cfg, ctx, wst, pst, logits, x, zeros, a, Wh, zeros, keys, step, params)
    if pst is not None:
        aux["_logit_state"] = pst
    if cfg.logit_shift:
        x0 = jnp.concatenate([x0[:, :1], x0[:, :-1]], axis=1)
        conf = jnp.concatenate([conf[:, :1], conf[:, :-1]], axis=1)
    return x0, conf, kv, aux


def _window_stats(params, cfg, sched: Schedule, ctx: Ctx, x, key_valid, positions, keys, step, cache, plan, W,
                  wst=None, pst=None, span=None):
    # a cache policy may add per-query visible key ends [B, W] (block diffusion: the mask of each official forward)
    w0, write, slice_start = plan[:3]
    key_end = plan[3] if len(plan) > 3 else None
    tokens = row_slice(x, w0, W)
    a, Wh = _span_rows(cfg, span, w0, W)  # head rows relative to the window (a prefix-cache window is wider)
    logits, cache = transformer.forward_window(params, cfg, tokens, w0, write, cache, positions, key_valid,
                                               prefix_len=ctx.prompt_len, key_end=key_end, head_start=a, head_width=Wh,
                                               head_hidden=head_masked(sched, cfg))
    x0w, confw, aux, pst = _row_stats(sched, cfg, ctx, wst, pst, logits, tokens, w0, a, Wh, slice_start, keys,
                                      step, params)
    if pst is not None:
        aux["_logit_state"] = pst
    if cfg.logit_shift:
        # shift inside the reference's slice: its first position keeps its own row
        own = (w0[:, None] + jnp.arange(W)[None]) <= slice_start[:, None]
        x0w = jnp.where(own, x0w, jnp.concatenate([x0w[:, :1], x0w[:, :-1]], axis=1))
        confw = jnp.where(own, confw, jnp.concatenate([confw[:, :1], confw[:, :-1]], axis=1))
    # a cache policy may place window row j's output at w0 + j + out_offset (1: a KV-cached next-token decoder that
    # feeds the last committed token, engine/ar.py)
    at = w0 + getattr(sched.cache, "out_offset", 0)
    x0 = row_update(x, x0w, at)
    conf = row_update(jnp.full(x.shape, -jnp.inf, jnp.float32), confw, at)
    return x0, conf, cache, aux


def init_cache(cfg: ModelConfig, ctx: Ctx, dtype, sharding=None):
    shape = (cfg.n_layers, ctx.batch, ctx.total_len, cfg.n_kv_heads, cfg.head_dim)
    return constrain_cache({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}, sharding)


def constrain_cache(kv, sharding=None):
    """Pin the KV cache to `sharding` (see dllm_jax.sharding.kv_sharding) on a mesh; a no-op on one device."""
    if sharding is None:
        return kv
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, sharding), kv)


def _eos_stop(ctx: Ctx, x, active):
    """Per-row early stop: a row whose generated text has an EOS with no mask before it is done; fill with EOS."""
    pos = iota_BxL(ctx)
    gen = pos >= ctx.prompt_len
    first_eos = first_true(gen & (x == ctx.eos_id), jnp.full((ctx.batch,), ctx.total_len, jnp.int32))
    masks_before = jnp.any(gen & (x == ctx.mask_id) & (pos < first_eos[:, None]), axis=1)
    stop = active & (first_eos < ctx.total_len) & ~masks_before
    x = jnp.where(stop[:, None] & (pos > first_eos[:, None]), ctx.eos_id, x)
    return x, stop


def make_loop(params, cfg: ModelConfig, sched: Schedule, ctx: Ctx, x, key_valid, positions, keys,
              trace_len: int = 0, kv_sharding=None, row_steps: bool = False):
    """Build (carry, cond, body) of the denoising loop; `run` hands them to `lax.while_loop`.

    kv_sharding: a NamedSharding for the KV-cache arrays when running on a mesh (None: no constraint).
    row_steps: sample with each row's own forward count as the step (continuous batching: a row that joined late
    draws what it draws alone; for rows that start together this equals the loop iteration)."""
    win, acc, cpol = sched.window, sched.accept, sched.cache
    B, L = ctx.batch, ctx.total_len
    pos = iota_BxL(ctx)
    max_nfe = sched.max_nfe or (4 * ctx.gen_length + 8)
    W = cpol.width(ctx, win) if cpol.has_cache else L
    widths = cpol.widths(ctx, win) if cpol.has_cache else (L,)
    if sched.refresh_rows is not None and (sched.refresh_rows < 1 or (
            not row_steps and (sched.sampler.temperature > 0 or sched.sampler.confidence == "random"))):
        raise ValueError(f"refresh_rows={sched.refresh_rows}: needs an int >= 1, and with random draws per-row steps "
                         "(continuous batching), since a row that waits for a refresh would draw at another step")
    if sched.head_rows not in HEAD_ROWS:
        raise ValueError(f"head_rows={sched.head_rows!r}: expected one of {HEAD_ROWS}")
    if widths[-1] != W:
        raise ValueError(f"{type(cpol).__name__}.widths {widths} must end with its width {W}")

    # a window that needs the prompt layout (block diffusion: per-row origin and first generated position)
    w0 = win.init_layout(ctx, x, key_valid, positions) if hasattr(win, "init_layout") else win.init(ctx, x)
    n_mask0 = jnp.sum((x == ctx.mask_id) & in_range(pos, w0["s"], w0["e"]), axis=1).astype(jnp.int32)
    carry: dict[str, Any] = {
        "x": x, "w": w0, "a": acc.init(ctx, n_mask0), "c": cpol.init(ctx),
        "i": jnp.zeros((B,), jnp.int32), "nfe": jnp.zeros((B,), jnp.int32),
        "active": jnp.ones((B,), bool), "it": jnp.zeros((), jnp.int32),
    }
    if cpol.has_cache:
        carry["kv"] = init_cache(cfg, ctx, params["embed"].dtype, kv_sharding)
    if getattr(acc, "wants_logits", False):
        carry["p"] = acc.logit_state_init(ctx)
    if trace_len:
        carry["trace"] = {"full": jnp.zeros((trace_len, B), bool), "s": jnp.zeros((trace_len, B), jnp.int32),
                          "e": jnp.zeros((trace_len, B), jnp.int32), "n": jnp.zeros((trace_len, B), jnp.int32),
                          # loop iteration at which each position stopped being a mask (-1: never / prompt)
                          "step_of": jnp.full((B, L), -1, jnp.int32)}

    def cond(c):
        return jnp.any(c["active"]) & (c["it"] < max_nfe)

    def body(c):
        x, w, a, cs, i, active = c["x"], c["w"], c["a"], c["c"], c["i"], c["active"]
        step = c["nfe"] if row_steps else c["it"]
        need_full = cpol.needs_full(cs, ctx, w)
        full_key_end = cpol.full_key_end(cs, ctx, w)  # None: the model's own mask
        span = head_span(sched, ctx, w)
        if cpol.has_cache:
            kv = c["kv"]
            full = lambda: _full_stats(params, cfg, sched, ctx, x, key_valid, positions, keys, step, w,  # noqa
                                       c.get("p"), full_key_end, span)

            def window_of(Wk):
                return lambda: _window_stats(params, cfg, sched, ctx, x, key_valid, positions, keys, step, kv,
                                             cpol.plan_window(cs, ctx, w, Wk), Wk, w, c.get("p"), span)

            if len(widths) == 1:
                window = window_of(W)
            else:  # the narrowest compiled width that holds every active row's window (prefix cache: the suffix)
                window = lambda: jax.lax.switch(cpol.width_index(cs, ctx, w, active, widths),  # noqa
                                                [window_of(Wk) for Wk in widths])

            no_defer = jnp.zeros((B,), bool)

            def mixed():
                xf, cf, kvf, af = full()
                xw, cw, kvw, aw = window()
                m = need_full[:, None]
                kvm = jax.tree.map(lambda a, b: jnp.where(need_full[None, :, None, None, None], a, b), kvf, kvw)
                am = jax.tree.map(lambda a, b: jnp.where(_rows(need_full, a), a, b), af, aw)
                return jnp.where(m, xf, xw), jnp.where(m, cf, cw), kvm, am, no_defer

            def mixed_sub():
                # the full forward on K gathered rows (those that need it first), the window forward on all rows
                nf = need_full & active
                idx = jnp.argsort(~nf, stable=True)[:K]
                sel = nf[idx]
                take = lambda a: jnp.take(a, idx, axis=0)  # noqa: E731
                xf, cf, kvf, af = _full_stats(
                    params, cfg, sched, dataclasses.replace(ctx, batch=K), take(x), take(key_valid), take(positions),
                    take(keys), take(step) if jnp.ndim(step) else step, jax.tree.map(take, w),
                    None if c.get("p") is None else jax.tree.map(take, c["p"]),
                    None if full_key_end is None else take(full_key_end),
                    None if span is None else (take(span[0]), span[1]))
                xw, cw, kvw, aw = window()

                def put(a_full, a_base, ax=0):
                    cur = jnp.take(a_base, idx, axis=ax)
                    m = sel.reshape((1,) * ax + (K,) + (1,) * (cur.ndim - ax - 1))
                    return a_base.at[(slice(None),) * ax + (idx,)].set(jnp.where(m, a_full, cur))

                chosen = jnp.zeros((B,), bool).at[idx].set(sel)
                return (put(xf, xw), put(cf, cw), jax.tree.map(lambda a, b: put(a, b, 1), kvf, kvw),
                        jax.tree.map(put, af, aw), nf & ~chosen)

            K = min(sched.refresh_rows or B, B)
            if B == 1:  # a single row never mixes: skip compiling the mixed branch
                x0, conf, kv, aux = jax.lax.cond(need_full[0], full, window)
                defer = no_defer
            else:
                live_full = need_full | ~active
                branch = jnp.where(jnp.all(live_full), 1, jnp.where(jnp.any(need_full & active), 2, 0))
                x0, conf, kv, aux, defer = jax.lax.switch(
                    branch, [lambda: (*window(), no_defer), lambda: (*full(), no_defer),
                             mixed_sub if K < B else mixed])
        else:
            x0, conf, _, aux = _full_stats(params, cfg, sched, ctx, x, key_valid, positions, keys, step, w,
                                           c.get("p"), full_key_end, span)
            defer = None
        if defer is not None:  # rows waiting for a refresh slot sit this iteration out, frozen like finished rows
            was_active, active = active, active & ~defer
        did_full = need_full & active
        pst = aux.pop("_logit_state", None)

        w = _keep_rows(active, win.resolve(w, ctx, x, x0, conf, (i == 0) & active), w)
        c_lo, c_hi = cpol.cand_range(cs, ctx, w, did_full)
        cand = (x == ctx.mask_id) & in_range(pos, c_lo, c_hi) & active[:, None]
        conf = jnp.where(cand, conf, -jnp.inf)
        if getattr(acc, "wants_window", False):  # the rule also sees the window's non-mask positions (SDAR quirk)
            commit, a_new = acc.select(a, ctx, conf, cand, i, window=in_range(pos, c_lo, c_hi) & active[:, None])
        else:
            commit, a_new = acc.select(a, ctx, conf, cand, i)
        if cpol.refresh_commit == "first":
            first = first_true(cand, jnp.full((B,), L, jnp.int32))
            commit = jnp.where(did_full[:, None], cand & (pos == first[:, None]), commit)
            a_new = jax.tree.map(lambda new, old: jnp.where(did_full, old, new) if new.ndim == 1 else new, a_new, a)
        commit = commit & active[:, None]
        a = jax.tree.map(lambda n, o: jnp.where(_rows(active, n), n, o) if n.ndim and n.shape[0] == B else n,
                         a_new, a)
        x = jnp.where(commit, x0, x)
        n_commit = jnp.sum(commit, axis=1).astype(jnp.int32)

        nfe = c["nfe"] + active.astype(jnp.int32)
        i = i + active.astype(jnp.int32)
        cs = cpol.after_forward(cs, did_full, active, w)
        cs = cpol.after_commit(cs, ctx, n_commit, did_full)
        w = _keep_rows(active, win.after_commit(w, ctx, x, n_commit), w)
        # cross-row coordination (BlockBatch: rows are branches of one request): may rewrite the canvas and name,
        # per row, the row whose KV cache it takes over (None: no copy)
        w, x, src_rows = win.coordinate(w, ctx, x, aux, did_full, n_commit, kv if cpol.has_cache else None)
        if src_rows is not None and cpol.has_cache:
            kv = jax.tree.map(lambda a: jnp.take(a, src_rows, axis=1), kv)

        no_mask = ~jnp.any((x == ctx.mask_id) & in_range(pos, w["s"], w["e"]), axis=1)
        bdone = acc.block_done(a, ctx, i, no_mask) & cpol.block_ready(cs) & active
        w_next, finished = win.advance(w, ctx, x, bdone)
        if "new_block" in w_next:  # a window that decides its block ends itself (block diffusion) reports them
            bdone = w_next["new_block"] & active
        w = jax.tree.map(lambda new, old: jnp.where(_rows(active, new), new, old), w_next, w)
        i = jnp.where(bdone, 0, i)
        cs = cpol.new_block(cs, bdone)
        n_mask = jnp.sum((x == ctx.mask_id) & in_range(pos, w["s"], w["e"]), axis=1).astype(jnp.int32)
        a = acc.new_block(a, ctx, n_mask, bdone)
        active = active & ~finished
        if sched.eos_early_stop:
            x, stopped = _eos_stop(ctx, x, active)
            active = active & ~stopped
        if defer is not None:
            active = jnp.where(defer, was_active, active)

        out = {**c, "x": x, "w": w, "a": a, "c": cs, "i": i, "nfe": nfe, "active": active, "it": c["it"] + 1}
        if pst is not None:
            out["p"] = pst
        if cpol.has_cache:
            out["kv"] = constrain_cache(kv, kv_sharding)
        if trace_len:
            t = c["trace"]
            k = jnp.minimum(step, trace_len - 1)
            out["trace"] = {"full": t["full"].at[k].set(did_full), "s": t["s"].at[k].set(c["w"]["s"]),
                            "e": t["e"].at[k].set(c["w"]["e"]), "n": t["n"].at[k].set(n_commit),
                            "step_of": jnp.where((c["x"] == ctx.mask_id) & (x != ctx.mask_id) & (t["step_of"] < 0),
                                                 step, t["step_of"])}
        return out

    return carry, cond, body


def results(c):
    res = {"x": c["x"], "nfe": c["nfe"], "steps": c["it"], "unfinished": c["active"]}
    if "trace" in c:
        res["trace"] = c["trace"]
    return res


def run(params, cfg: ModelConfig, sched: Schedule, ctx: Ctx, x, key_valid, positions, keys, trace_len: int = 0,
        kv_sharding=None):
    """The whole generation as one `lax.while_loop` (call under jit with cfg/sched/ctx/trace_len static).

    Returns a dict: x (final canvas), nfe [B], steps (loop iterations), unfinished [B], and when trace_len > 0 a
    per-forward trace (full flag, window s/e, committed count per row) of the first trace_len forwards, and
    step_of [B, L]: the loop iteration at which each position was filled (-1: prompt or never).
    """
    carry, cond, body = make_loop(params, cfg, sched, ctx, x, key_valid, positions, keys, trace_len, kv_sharding)
    return results(jax.lax.while_loop(cond, body, carry))


# -- continuous batching (dllm_jax.serve) ---------------------------------------------------------------------------
# The same loop over a batch of independent *slots*: `run_chunk` runs a bounded number of iterations and returns the
# whole per-row state; before it runs, rows named in `reset` are re-initialised from the given canvas (a new
# request's prompt written into the slot) exactly as `make_loop` initialises a fresh batch, and the others continue.
# Per-row step counters (`row_steps`) and a per-row NFE cap make a row's tokens independent of when it joined.


def _batch_axis(path) -> int:
    return 1 if path and getattr(path[0], "key", None) == "kv" else 0  # KV cache: [layers, B, L, heads, dim]


def init_slots(params, cfg: ModelConfig, sched: Schedule, ctx: Ctx, x, key_valid, positions, keys, kv_sharding=None):
    """The loop state of `ctx.batch` empty slots (every row inactive), for `run_chunk`."""
    carry, _, _ = make_loop(params, cfg, sched, ctx, x, key_valid, positions, keys, 0, kv_sharding, row_steps=True)
    return {**carry, "active": jnp.zeros((ctx.batch,), bool), "capped": jnp.zeros((ctx.batch,), bool)}


def run_chunk(params, cfg: ModelConfig, sched: Schedule, ctx: Ctx, state, x, key_valid, positions, keys, reset,
              occupied, max_iters, stop_on_finish, kv_sharding=None):
    """Advance the slots by at most `max_iters` loop iterations (call under jit with cfg/sched/ctx static).

    state: from `init_slots` or the previous call. x/key_valid/positions/keys: the slots' canvases and inputs as
    `generate.prepare` builds them (only the rows named in `reset` are read for initialisation). reset [B]: rows to
    re-initialise (fresh window/acceptance/cache state, zero counters, zero KV rows); occupied [B]: whether a reset
    row holds a request (else it stays empty, inactive). Stops early when no row is active, or, if
    `stop_on_finish`, when a row that was active at the start finished. Returns the new state: x, nfe, active and
    `capped` (rows stopped by the max_nfe bound, the `unfinished` of `run`) per row, plus the policies' state."""
    # make_loop's cond (a global `it < max_nfe` bound) is replaced by a per-row cap below
    fresh, _, body = make_loop(params, cfg, sched, ctx, x, key_valid, positions, keys, 0, kv_sharding,
                               row_steps=True)
    fresh = {**fresh, "capped": jnp.zeros((ctx.batch,), bool)}

    def pick(path, new, old):
        if old.ndim == 0:  # the global iteration counter
            return old
        ax = _batch_axis(path)
        if old.shape[ax] != ctx.batch:
            raise ValueError(f"loop state leaf {jax.tree_util.keystr(path)} {old.shape} has no batch axis: this "
                             "schedule cannot run in independent slots")
        m = reset.reshape((1,) * ax + (ctx.batch,) + (1,) * (old.ndim - ax - 1))
        return jnp.where(m, new, old)

    state = jax.tree_util.tree_map_with_path(pick, fresh, state)
    state = {**state, "active": jnp.where(reset, occupied, state["active"])}
    if "kv" in state:
        state["kv"] = constrain_cache(state["kv"], kv_sharding)
    it0, was_active = state["it"], state["active"]
    max_nfe = sched.max_nfe or (4 * ctx.gen_length + 8)

    def chunk_cond(c):
        finished = jnp.any(was_active & ~c["active"])
        return jnp.any(c["active"]) & (c["it"] - it0 < max_iters) & ~(stop_on_finish & finished)

    def chunk_body(c):
        c = body(c)
        cap = c["active"] & (c["nfe"] >= max_nfe)  # per row, as `run`'s global bound is for rows started together
        return {**c, "active": c["active"] & ~cap, "capped": c["capped"] | cap}

    return jax.lax.while_loop(chunk_cond, chunk_body, state)
