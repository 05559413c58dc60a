"""Public generation API: validation at the boundary, prompt bucketing, one compiled program per shape bucket."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from dllm_jax.engine.context import Ctx
from dllm_jax.engine.loop import Schedule, run
from dllm_jax.model import Model
from dllm_jax.programs import ProgramCache


class ScheduleError(ValueError):
    """Invalid generation arguments (raised before anything is compiled)."""


@dataclasses.dataclass
class GenerateOutput:
    sequences: np.ndarray  # [B, P + G]: left-padded prompt (padded to the bucket P) + generation
    generated: np.ndarray  # [B, G]
    prompt_len: int  # P (bucketed)
    nfe: np.ndarray  # [B] forwards each row took part in
    gen_lengths: np.ndarray  # [B] generated tokens up to (excluding) the first EOS, else G
    compile_time_s: float
    run_time_s: float
    loop_iterations: int
    unfinished: np.ndarray  # [B] rows stopped by the max_nfe safety bound (should be all False)
    trace: dict | None = None


_COMPILED = ProgramCache("generate")
_STATS = {"compilations": 0}


def compile_count() -> int:
    """Number of generation programs compiled in this process (for bucketing tests)."""
    return _STATS["compilations"]


def bucket_length(n: int, multiple: int = 32) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _as_rows(prompt_ids, attention_mask):
    if isinstance(prompt_ids, np.ndarray) or hasattr(prompt_ids, "shape"):
        arr = np.asarray(prompt_ids)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2:
            raise ScheduleError(f"prompt_ids must be [batch, length] or a list of token lists, got shape {arr.shape}")
        if attention_mask is None:
            return [list(map(int, r)) for r in arr]
        m = np.asarray(attention_mask).reshape(arr.shape).astype(bool)
        rows = []
        for r, mr in zip(arr, m):
            if mr.any() and not mr[np.argmax(mr):].all():
                raise ScheduleError("attention_mask must describe left padding (zeros only before the prompt)")
            rows.append([int(t) for t, v in zip(r, mr) if v])
        return rows
    if isinstance(prompt_ids, (list, tuple)):
        if prompt_ids and all(isinstance(t, (int, np.integer)) for t in prompt_ids):
            prompt_ids = [prompt_ids]
        if attention_mask is not None:
            return _as_rows(np.asarray(prompt_ids), attention_mask)
        return [list(map(int, r)) for r in prompt_ids]
    raise ScheduleError(f"prompt_ids must be an array or a list of token lists, got {type(prompt_ids).__name__}")


def validate(model: Model, rows, gen_length: int, schedule: Schedule, prompt_len: int) -> Ctx:
    cfg = model.cfg
    if not isinstance(schedule, Schedule):
        raise ScheduleError(f"schedule must be a dllm_jax Schedule (see dllm_jax.presets), got {type(schedule).__name__}")
    if schedule.gen_length is not None and schedule.gen_length != gen_length:
        raise ScheduleError(f"the schedule was built for gen_length {schedule.gen_length}, but gen_length={gen_length} "
                            "was requested; build the schedule with the same gen_length")
    if not rows or any(len(r) == 0 for r in rows):
        raise ScheduleError("every prompt must hold at least one token")
    if not isinstance(gen_length, (int, np.integer)) or gen_length <= 0:
        raise ScheduleError(f"gen_length must be a positive integer, got {gen_length!r}")
    if not (0 <= cfg.mask_token_id < cfg.vocab_size):
        raise ScheduleError(f"mask id {cfg.mask_token_id} lies outside the vocabulary [0, {cfg.vocab_size})")
    for r in rows:
        bad = [t for t in r if not (0 <= t < cfg.vocab_size)]
        if bad:
            raise ScheduleError(f"prompt token ids {bad[:5]} lie outside the vocabulary [0, {cfg.vocab_size})")
    total = prompt_len + gen_length
    if total > cfg.max_seq_len:
        raise ScheduleError(f"prompt ({prompt_len}) + gen_length ({gen_length}) = {total} exceeds the model's maximum "
                            f"length {cfg.max_seq_len}")
    ctx = Ctx(batch=len(rows), prompt_len=prompt_len, gen_length=int(gen_length), mask_id=cfg.mask_token_id,
              eos_id=cfg.eos_token_id, pad_id=cfg.pad_token_id)
    try:
        schedule.window.validate(ctx)
        schedule.accept.validate(ctx, schedule.window)
    except ValueError as e:
        raise ScheduleError(str(e)) from None
    if schedule.cfg_scale > 0 and schedule.cache.has_cache:
        raise ScheduleError("cfg_scale > 0 is only supported without a KV cache (as in the reference)")
    return ctx


_STATIC = ("cfg", "sched", "ctx", "trace_len", "kv_sharding")


def _generate_impl(params, x, key_valid, positions, keys, dyn, *, cfg, sched, ctx, trace_len, kv_sharding=None):
    # `sched` is the static structure; `dyn` holds its traced numeric parameters (Schedule.split_dynamic)
    return run(params, cfg, sched.merge_dynamic(dyn), ctx, x, key_valid, positions, keys, trace_len,
               kv_sharding=kv_sharding)


def _dyn_arrays(values: dict) -> dict:
    def arr(v):
        is_int = isinstance(v, (int, np.integer)) and not isinstance(v, bool)
        return jnp.asarray(v, jnp.int32 if is_int else jnp.float32)

    return {k: arr(v) for k, v in values.items()}


_generate_jit = jax.jit(_generate_impl, static_argnames=_STATIC)


def _generate_jit_sharded(in_shardings, out_shardings, **static):
    """The same program for a mesh, with explicit in/out shardings (dllm_jax.sharding.generate_shardings).

    jit takes no keyword arguments once in_shardings is given, so the static arguments are bound here (one jit
    object per compiled program; `generate` caches the compiled result)."""
    def fn(params, x, key_valid, positions, keys, dyn):
        return _generate_impl(params, x, key_valid, positions, keys, dyn, **static)

    return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings)


def prepare(model: Model, prompt_ids, gen_length: int, schedule: Schedule, attention_mask=None, bucket=True,
            seed=0):
    rows = _as_rows(prompt_ids, attention_mask)
    longest = max((len(r) for r in rows), default=0)
    P = bucket_length(longest) if bucket else longest
    ctx = validate(model, rows, gen_length, schedule, P)
    B, L = len(rows), P + gen_length
    x = np.full((B, L), model.cfg.pad_token_id, np.int32)
    valid = np.zeros((B, L), bool)
    for b, r in enumerate(rows):
        x[b, P - len(r):P] = r
        valid[b, P - len(r):] = True
    x[:, P:] = model.cfg.mask_token_id
    # Positions count real tokens only (pads get 0), so a left-padded row sees the same RoPE angles as unpadded.
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    seeds = np.asarray(seed if np.ndim(seed) else np.uint32(seed) + np.arange(B, dtype=np.uint32), np.uint32)
    if seeds.shape != (B,):
        raise ScheduleError(f"seed must be an int or one int per row ({B}), got shape {seeds.shape}")
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    return ctx, jnp.asarray(x), jnp.asarray(valid), jnp.asarray(positions), keys


def generate(model: Model, prompt_ids, *, gen_length: int, schedule: Schedule, attention_mask=None, seed=0,
             bucket: bool = True, trace: bool = False, mesh=None) -> GenerateOutput:
    """Generate with one jitted program (a lax.while_loop over the whole denoising process).

    model: `dllm_jax.load(...)`. schedule: `presets.make_schedule(name, gen_length, model.cfg, ...)` (or any
    Schedule). gen_length: generated positions G; block schedules need G divisible by their block length
    (make_schedule checks it and says which lengths would do), and a block-causal model's block must divide it.
    prompt_ids: a list of token lists (any lengths) or a [B, T] array (with `attention_mask` for left padding).
    Prompts are left-padded to a common length, bucketed to a multiple of 32 unless bucket=False, so prompts of the
    same bucket reuse the compiled program. seed: an int (row b uses seed + b) or one seed per row; with a per-row
    seed a row's sampled output does not depend on the rest of the batch.
    trace: also record, per loop iteration and row, whether it was a full forward, the window [s, e), the tokens
    committed, and per position the iteration that filled it (`out.trace` = {"full", "s", "e", "n": [iters, B],
    "step_of": [B, P + G]}; what `dllm-jax generate --show-steps` renders). mesh: a jax Mesh (see
    `sharding.mesh_from_spec`): params and the batch are placed on it and the program is compiled with shardings;
    tokens and NFE equal the single-device run.

    Returns GenerateOutput: sequences [B, P + G] (left-padded prompt bucket + generation), generated [B, G],
    prompt_len P, nfe [B] (forwards each row took part in), gen_lengths [B] (tokens before the first EOS, else G),
    compile_time_s (0 when the program was cached), run_time_s, loop_iterations, unfinished [B] (rows stopped by
    the schedule's max_nfe bound; all False normally), trace.
    """
    from dllm_jax.engine.block_diffusion import BlockWindow

    if isinstance(schedule.window, BlockWindow):  # block diffusion (Fast-dLLM v2, SDAR): its own canvas layout
        from dllm_jax.engine.block_runner import generate_output

        return generate_output(model, prompt_ids, gen_length, schedule, attention_mask, seed, mesh, trace)
    if getattr(schedule.window, "rows_per_request", 1) > 1:
        # a request is several rows (BlockBatch branches): its runner expands the requests and returns the winners
        if trace or mesh is not None or attention_mask is not None:
            raise ScheduleError(f"schedule {schedule.name!r} runs each request as several rows (BlockBatch "
                                "branches): trace=, mesh= and attention_mask= are not supported for it; pass "
                                "prompts as token lists (dllm_jax.engine.blockbatch.generate_branches has the "
                                "per-request details)")
        return _generate_branches(model, prompt_ids, gen_length, schedule, bucket, seed)
    ctx, x, valid, positions, keys = prepare(model, prompt_ids, gen_length, schedule, attention_mask, bucket, seed)
    params = model.params
    trace_len = (schedule.max_nfe or 4 * gen_length + 8) if trace else 0
    kv_sh = None
    if mesh is not None:
        from dllm_jax import sharding

        params, (x, valid, positions, keys) = sharding.place_for_generate(model, mesh, (x, valid, positions, keys))
        kv_sh = sharding.kv_sharding(model.cfg, mesh, ctx.batch, ctx.total_len) if schedule.cache.has_cache else None
    static_sched, dyn_values = schedule.split_dynamic()
    dyn = _dyn_arrays(dyn_values)
    key = (model.cfg, static_sched, ctx, trace_len, tuple((k, str(v.dtype)) for k, v in sorted(dyn.items())),
           jax.tree.structure(params),
           tuple((a.shape, str(a.dtype), getattr(a, "sharding", None)) for a in jax.tree.leaves(params)),
           mesh)  # a jax Mesh is hashable (axis names, shape and device ids)
    t0 = time.perf_counter()
    compiled = _COMPILED.get(key)
    if compiled is None:
        static = dict(cfg=model.cfg, sched=static_sched, ctx=ctx, trace_len=trace_len)
        if mesh is None:
            lowered = _generate_jit.lower(params, x, valid, positions, keys, dyn, **static)
        else:
            in_sh, out_sh = sharding.generate_shardings(model, mesh, ctx.batch, trace_len)
            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            in_sh = (*in_sh, {k: replicated for k in dyn})
            lowered = _generate_jit_sharded(in_sh, out_sh, kv_sharding=kv_sh, **static).lower(
                params, x, valid, positions, keys, dyn)
        compiled = lowered.compile()
        _COMPILED.put(key, compiled)
        _STATS["compilations"] += 1
    t1 = time.perf_counter()
    out = compiled(params, x, valid, positions, keys, dyn)
    out = jax.tree.map(np.asarray, jax.block_until_ready(out))
    t2 = time.perf_counter()
    seqs = out["x"]
    gen = seqs[:, ctx.prompt_len:]
    gen_lengths = _lengths_to_eos(gen, ctx.eos_id)
    return GenerateOutput(sequences=seqs, generated=gen, prompt_len=ctx.prompt_len, nfe=out["nfe"],
                          gen_lengths=gen_lengths, compile_time_s=t1 - t0, run_time_s=t2 - t1,
                          loop_iterations=int(out["steps"]), unfinished=out["unfinished"], trace=out.get("trace"))


def _lengths_to_eos(gen_BxG, eos_id):
    """Generated tokens per row up to (excluding) the first EOS, else the full length."""
    is_eos = gen_BxG == eos_id
    return np.where(is_eos.any(1), is_eos.argmax(1), gen_BxG.shape[1])


def _generate_branches(model, prompt_ids, gen_length, schedule, bucket, seed) -> GenerateOutput:
    """BlockBatch through `generate`: each request's winning branch, as a GenerateOutput (nfe = batched forwards
    of the request, i.e. model calls; Dream stop-on-EOS outputs are EOS-filled after the cut)."""
    from dllm_jax.engine.blockbatch import generate_branches

    bo = generate_branches(model, prompt_ids, gen_length=gen_length, schedule=schedule, bucket=bucket, seed=seed)
    eos = model.cfg.eos_token_id
    P = bo.prompt_len
    seqs = np.full((len(bo.sequences), P + gen_length), eos, np.int32)
    for r, seq in enumerate(bo.sequences):
        seqs[r, :len(seq)] = np.asarray(seq)
    gen = seqs[:, P:]
    return GenerateOutput(sequences=seqs, generated=gen, prompt_len=P, nfe=np.asarray(bo.nfe, np.int32),
                          gen_lengths=_lengths_to_eos(gen, eos),
                          compile_time_s=bo.compile_time_s, run_time_s=bo.run_time_s,
                          loop_iterations=int(max(bo.nfe)), unfinished=np.asarray([e == "unfinished" for e in bo.exit]))
