"""Run a block-diffusion schedule (engine/block_diffusion.py) on the one loop and return what the official function
returns. The runner only lays out the canvas and reads the result; every decision is made inside the loop.

Layouts:
  "left"          prompts left-padded to the longest (pads invisible, positions count real tokens): each row's blocks
                  follow its own positions (the official functions take equal-length prompts, which need no padding).
  "right_masked"  Fast-dLLM v2 `batch_sample` as eval.py calls it: prompts right-padded with the MASK id (the padding
                  is generated like any masked position), positions = canvas index for every row.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from dllm_jax.engine.block_diffusion import BlockWindow
from dllm_jax.engine.context import Ctx
from dllm_jax.programs import ProgramCache

_COMPILED = ProgramCache("block_runner")


class BlockRunError(ValueError):
    """Invalid input for a block-diffusion run (raised before anything is compiled)."""


@dataclasses.dataclass
class BlockOutput:
    sequences: list  # per row, the official return value (1-D int arrays; see BlockWindow.output)
    canvas: np.ndarray  # [B, L] final canvas (left layout: left-padded)
    nfe: int  # batched forwards (what the official code counts: model calls)
    nfe_per_row: np.ndarray  # forwards each row took part in
    prompt_len: int
    compile_time_s: float
    run_time_s: float
    unfinished: np.ndarray
    state: dict


def _rows(prompt_ids):
    from dllm_jax.generate import ScheduleError, _as_rows

    try:
        return _as_rows(prompt_ids, None)
    except ScheduleError as e:
        raise BlockRunError(str(e)) from None


def _layout(rows, win: BlockWindow, layout: str, mask_id: int, pad_id: int):
    """Canvas, key validity, positions and the canvas length the schedule needs."""
    bl = win.block_size
    B, P = len(rows), max(len(r) for r in rows)
    lens = np.array([len(r) for r in rows])
    shift = 0
    if win.skip_prompt_block and lens.min() == bl:
        shift = bl  # Fast-dLLM v2 quirk: a one-block prompt is never fed to the model
    if layout == "left":
        origin = P - lens + shift
    elif layout == "right_masked":
        origin = np.full(B, shift)
    else:
        raise BlockRunError(f"layout must be 'left' or 'right_masked', got {layout!r}")
    m0 = lens - shift  # the first generated position, in model positions
    k0 = m0 // bl
    if win.lockstep:
        k0 = np.full(B, k0.min())
    if win.end_rule == "new_tokens":
        end = k0 + win.new_tokens // bl
    elif win.end_rule == "new_tokens_after_max_prompt":
        end = np.full(B, m0.max() // bl) + win.new_tokens // bl
    else:
        end = -(-(m0 + win.new_tokens) // bl)
    L = int(max(P + 1, (origin + end * bl).max() + (1 if win.complete == "ar" else 0)))
    x = np.full((B, L), mask_id, np.int32)
    valid = np.ones((B, L), bool)
    for b, r in enumerate(rows):
        if layout == "left":
            x[b, :P - len(r)] = pad_id
            valid[b, :P - len(r)] = False
            x[b, P - len(r):P] = r
        else:
            x[b, :len(r)] = r
    for b in range(B):  # left pads, and with the quirk the prompt block the model never sees
        valid[b, :origin[b]] = False
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    nothing = bool(np.all(k0 >= end) and (not win.prefill or np.all(k0 < 1)))  # no block, no prefill
    return x, valid, positions, P, L, lens, origin, nothing


def generate_blocks(model, prompt_ids, *, schedule, layout: str = "left", seed=0, mesh=None) -> BlockOutput:
    """Run `schedule` (a Schedule whose window is a BlockWindow) on the prompts; see the module docstring."""
    from dllm_jax.engine.loop import make_loop

    win = schedule.window
    if not isinstance(win, BlockWindow):
        raise BlockRunError(f"schedule {schedule.name!r} is not a block-diffusion schedule")
    if hasattr(win, "adapt_model"):  # the attention of the family's official forwards (LLaDA2.1: a 0/1 bias)
        model = win.adapt_model(model)
    cfg = model.cfg
    rows = _rows(prompt_ids)
    if not rows or any(len(r) == 0 for r in rows):
        raise BlockRunError("every prompt must hold at least one token")
    for r in rows:
        bad = [t for t in r if not (0 <= t < cfg.vocab_size)]
        if bad:
            raise BlockRunError(f"prompt token ids {bad[:5]} lie outside the vocabulary [0, {cfg.vocab_size})")
        if cfg.mask_token_id in r:
            raise BlockRunError(f"a prompt contains the mask id {cfg.mask_token_id}")
    lens = {len(r) for r in rows}
    if win.lockstep and layout == "left" and len(lens) > 1:
        raise BlockRunError(f"prompts of different lengths {sorted(lens)}: the official batched function takes equal "
                            "lengths; pass lockstep=False (each row decoded as on its own) or use the batch_sample "
                            "preset (right-padded ragged batches)")
    x, valid, positions, P, L, lens_np, origin, nothing = _layout(rows, win, layout, cfg.mask_token_id,
                                                                  cfg.pad_token_id)
    if int(positions.max()) + 1 > cfg.max_seq_len:
        raise BlockRunError(f"prompt + generation needs {int(positions.max()) + 1} positions, more than the model's "
                            f"maximum length {cfg.max_seq_len}")
    ctx = Ctx(batch=len(rows), prompt_len=P, gen_length=L - P, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id,
              pad_id=cfg.pad_token_id)
    try:
        win.validate(ctx)
        schedule.accept.validate(ctx, win)
    except ValueError as e:
        raise BlockRunError(str(e)) from None
    if nothing:  # no block to decode and no prefill forward: the prompt comes back, no forward is made
        seqs = [np.asarray(r[len(r):] if win.output == "generated" else r, np.int32) for r in rows]
        return BlockOutput(sequences=seqs, canvas=x, nfe=0, nfe_per_row=np.zeros(len(rows), np.int32), prompt_len=P,
                           compile_time_s=0.0, run_time_s=0.0, unfinished=np.zeros(len(rows), bool), state=None)
    keys = jax.vmap(jax.random.key)(jnp.asarray(np.uint32(seed) + np.arange(len(rows), dtype=np.uint32)))
    sched = schedule.replace(max_nfe=schedule.max_nfe or (L + 4) * 2)
    static_sched, dyn_values = sched.split_dynamic()
    dyn = {k: jnp.asarray(v, jnp.int32 if isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                          else jnp.float32) for k, v in dyn_values.items()}
    params = model.params
    xs, vs, ps = jnp.asarray(x), jnp.asarray(valid), jnp.asarray(positions)
    kv_sh = None
    if mesh is not None:
        from dllm_jax import sharding

        params, (xs, vs, ps, keys) = sharding.place_for_generate(model, mesh, (xs, vs, ps, keys))
        kv_sh = sharding.kv_sharding(cfg, mesh, ctx.batch, ctx.total_len)
    key = (cfg, static_sched, ctx, tuple(sorted(dyn)), jax.tree.structure(params),
           tuple((a.shape, str(a.dtype), getattr(a, "sharding", None)) for a in jax.tree.leaves(params)), mesh)
    t0 = time.perf_counter()
    compiled = _COMPILED.get(key)
    if compiled is None:
        def fn(params, x, valid, positions, keys, dyn):
            carry, cond, body = make_loop(params, cfg, static_sched.merge_dynamic(dyn), ctx, x, valid, positions,
                                          keys, kv_sharding=kv_sh)
            c = jax.lax.while_loop(cond, body, carry)
            return {"x": c["x"], "nfe": c["nfe"], "steps": c["it"], "unfinished": c["active"], "w": c["w"]}
        compiled = jax.jit(fn).lower(params, xs, vs, ps, keys, dyn).compile()
        _COMPILED.put(key, compiled)
    t1 = time.perf_counter()
    out = jax.tree.map(np.asarray, jax.block_until_ready(compiled(params, xs, vs, ps, keys, dyn)))
    t2 = time.perf_counter()
    return _finish(win, layout, ctx, rows, out, origin, t1 - t0, t2 - t1)


def _finish(win, layout, ctx, rows, out, origin, tc, tr) -> BlockOutput:
    x = out["x"]
    B, P, L = ctx.batch, ctx.prompt_len, ctx.total_len
    starts = [P - len(r) if layout == "left" else 0 for r in rows]
    w = out.get("w")
    ends = [L] * B
    if w is not None:  # a row's canvas ends with its own last block (+ the completion token)
        ends = [int(max(w["origin"][b] + w["end"][b] * win.block_size + (win.complete == "ar"),
                        w["gen0"][b] + w["pre_ar"][b])) for b in range(B)]
    seqs = [x[b, starts[b]:min(ends[b], L)] for b in range(B)]
    if win.output in ("truncate_stop", "generated"):
        orig = (np.asarray(w["orig"]) - np.asarray(starts)) if w is not None else np.array([len(r) for r in rows])
        cuts = []
        for b in range(B):
            hits = np.nonzero(np.isin(seqs[b][orig[b]:], np.asarray(win.stop_ids, np.int64)))[0] if win.stop_ids \
                else np.array([], int)
            cuts.append(orig[b] + int(hits[0]) + 1 if len(hits) else len(seqs[b]))
        if win.lockstep:  # the first row (in row order) holding a stop decides the cut for every row
            first = next((c for b, c in enumerate(cuts) if c < len(seqs[b])), None)
            cuts = [first if first is not None else len(s) for s in seqs]
        seqs = [s[:c] for s, c in zip(seqs, cuts)]
        if win.output == "generated":
            seqs = [s[o:] for s, o in zip(seqs, orig)]
    elif win.output == "rows" and w is not None:
        seqs = [s[:int(n) - starts[b]] for b, (s, n) in enumerate(zip(seqs, w["out_len"]))]
    steps = int(out["steps"])
    return BlockOutput(sequences=seqs, canvas=x, nfe=steps, nfe_per_row=np.asarray(out["nfe"]), prompt_len=P,
                       compile_time_s=tc, run_time_s=tr, unfinished=np.asarray(out["unfinished"]), state=w)


def generate_output(model, prompt_ids, gen_length, schedule, attention_mask=None, seed=0, mesh=None, trace=False):
    """`dllm_jax.generate` for a block-diffusion schedule: the run as a GenerateOutput over the final canvas
    (sequences [B, L] left-padded; `nfe` per row; gen_lengths up to the first EOS). The official return value of the
    preset's function is `generate_blocks(...).sequences`."""
    from dllm_jax.generate import GenerateOutput, ScheduleError, _lengths_to_eos

    if trace or attention_mask is not None:
        raise ScheduleError(f"schedule {schedule.name!r} (block diffusion): trace= and attention_mask= are not "
                            "supported; pass prompts as token lists")
    if schedule.gen_length is not None and schedule.gen_length != gen_length:
        raise ScheduleError(f"the schedule was built for gen_length {schedule.gen_length}, but gen_length="
                            f"{gen_length} was requested")
    layout = "right_masked" if schedule.name == "fastdllm_v2_batch" else "left"
    try:
        out = generate_blocks(model, prompt_ids, schedule=schedule, layout=layout, seed=seed, mesh=mesh)
    except BlockRunError as e:
        raise ScheduleError(str(e)) from None
    P = out.prompt_len
    gen = out.canvas[:, P:]
    return GenerateOutput(sequences=out.canvas, generated=gen, prompt_len=P, nfe=out.nfe_per_row,
                          gen_lengths=_lengths_to_eos(gen, model.cfg.eos_token_id), compile_time_s=out.compile_time_s,
                          run_time_s=out.run_time_s, loop_iterations=out.nfe, unfinished=out.unfinished)
