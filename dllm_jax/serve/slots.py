"""Slot groups: continuous batching on the one jitted loop (`engine.loop.run_chunk`), no HTTP here.

A `SlotGroup` is a fixed batch of `n` slots sharing one compiled program: one static schedule (+ its traced numeric
parameters), one prompt bucket P and one generation length G. A slot holds one request's canvas (its prompt
left-padded into [0, P) exactly as `generate` pads it alone), its PRNG key (`seed`) and the loop's per-row state.
`step()` runs a bounded chunk of loop iterations on the device and returns to the host with each row's canvas;
finished or cancelled slots are cleared and refilled (`load`) between chunks, without recompiling.

Exactness: rows of the loop are independent (docs/engine.md "Batching"), a refilled row gets the state `make_loop`
gives a fresh batch, and the sampler draws with each row's own forward count, so a request's tokens equal
`generate(model, [prompt], gen_length=G, schedule=..., seed=seed)` whatever else is in flight
(tests/test_continuous.py). Schedules whose rows are not independent are refused (`check_schedule`).
"""

from __future__ import annotations

import dataclasses
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from dllm_jax.engine.context import Ctx
from dllm_jax.engine.loop import Schedule, init_slots, run_chunk
from dllm_jax.generate import ScheduleError, _dyn_arrays, bucket_length, validate

_STATIC = ("cfg", "sched", "ctx", "kv_sharding")


def _chunk_impl(params, state, x, key_valid, positions, keys, reset, occupied, max_iters, stop_on_finish, dyn, *,
                cfg, sched, ctx, kv_sharding=None):
    return run_chunk(params, cfg, sched.merge_dynamic(dyn), ctx, state, x, key_valid, positions, keys, reset,
                     occupied, max_iters, stop_on_finish, kv_sharding=kv_sharding)


_chunk_jit = jax.jit(_chunk_impl, static_argnames=_STATIC, donate_argnames=("state",))

_PROGRAMS: dict = {}
_LOCK = threading.Lock()
STATS = {"compilations": 0, "compile_s": 0.0}


def check_schedule(sched: Schedule) -> Schedule:
    """The schedule as it runs in slots, or ScheduleError when its rows are not independent.

    BlockBatch runs each request as several coupled rows (branches): refused. Dream's batch-mean quota couples rows
    only through the batch mean, which for a request alone is its own count: the per-row quota is used (identical
    to `generate` on the request alone)."""
    if getattr(sched.window, "rows_per_request", 1) > 1:
        raise ScheduleError(f"schedule {sched.name!r} runs each request as several coupled rows (BlockBatch "
                            "branches) and cannot share a batch with other requests; serve another preset or use "
                            "`dllm-jax generate` for it")
    if getattr(sched.accept, "batch_mean", False):
        sched = sched.replace(accept=dataclasses.replace(sched.accept, batch_mean=False))
    if sched.cfg_scale > 0:
        raise ScheduleError("cfg_scale > 0 is not supported by the server (its unconditional half doubles the batch)")
    return sched


@dataclasses.dataclass
class RowView:
    """What the host sees of one slot after a chunk."""

    gen: np.ndarray  # [G] generated region of the canvas (mask id where not yet decoded)
    nfe: int
    active: bool
    capped: bool


class SlotGroup:
    """`n` slots of one (static schedule, dynamic values, P, G) program."""

    def __init__(self, model, sched: Schedule, prompt_len: int, gen_length: int, n_slots: int, mesh=None):
        sched = check_schedule(sched)
        cfg = model.cfg
        dummy = [[cfg.pad_token_id]]
        validate(model, dummy * n_slots, gen_length, sched, prompt_len)  # ScheduleError for a bad combination
        self.model, self.sched, self.mesh = model, sched, mesh
        self.P, self.G, self.n = prompt_len, gen_length, n_slots
        self.ctx = Ctx(batch=n_slots, prompt_len=prompt_len, gen_length=gen_length, mask_id=cfg.mask_token_id,
                       eos_id=cfg.eos_token_id, pad_id=cfg.pad_token_id)
        self.static_sched, dyn_values = sched.split_dynamic()
        self.dyn = _dyn_arrays(dyn_values)
        L = prompt_len + gen_length
        self.x = np.full((n_slots, L), cfg.pad_token_id, np.int32)
        self.x[:, prompt_len:] = cfg.mask_token_id
        self.valid = np.zeros((n_slots, L), bool)
        self.valid[:, prompt_len - 1:] = True  # an empty slot holds a one-token dummy prompt (no all-masked row)
        self.positions = np.maximum(np.cumsum(self.valid, axis=1) - 1, 0).astype(np.int32)
        self.seeds = np.zeros((n_slots,), np.uint32)
        self.reset = np.ones((n_slots,), bool)  # everything is initialised by the first chunk
        self.occupied = np.zeros((n_slots,), bool)
        self.owner: list = [None] * n_slots
        self.params = model.params
        self.kv_sharding = None
        if mesh is not None:
            from dllm_jax import sharding

            sharding.check_batch(mesh, n_slots)
            self.params = sharding.shard_params(model.params, cfg, mesh)
            if sched.cache.has_cache:
                self.kv_sharding = sharding.kv_sharding(cfg, mesh, n_slots, L)
        self.state = None
        self.compiled = None
        self.last_view: list[RowView] = []

    # -- program ------------------------------------------------------------------------------------------------
    def _args(self, max_iters=0, stop_on_finish=False):
        keys = jax.vmap(jax.random.key)(jnp.asarray(self.seeds))
        arrays = (jnp.asarray(self.x), jnp.asarray(self.valid), jnp.asarray(self.positions), keys)
        if self.mesh is not None:
            from dllm_jax import sharding

            arrays = tuple(jax.device_put(a, sharding.batch_sharding(self.mesh, np.ndim(a))) for a in arrays)
        return (self.params, self.state, *arrays, jnp.asarray(self.reset), jnp.asarray(self.occupied),
                jnp.asarray(max_iters, jnp.int32), jnp.asarray(stop_on_finish), self.dyn)

    def _static(self):
        return dict(cfg=self.model.cfg, sched=self.static_sched, ctx=self.ctx, kv_sharding=self.kv_sharding)

    def _zero_state(self):
        keys = jax.vmap(jax.random.key)(jnp.asarray(self.seeds))
        shapes = jax.eval_shape(lambda p, x, v, pos, k, d: init_slots(
            p, self.model.cfg, self.static_sched.merge_dynamic(d), self.ctx, x, v, pos, k, self.kv_sharding),
            self.params, jnp.asarray(self.x), jnp.asarray(self.valid), jnp.asarray(self.positions), keys, self.dyn)
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def compile(self) -> float:
        """Compile (or fetch from the process cache) this group's program; returns the seconds spent compiling."""
        if self.state is None:
            self.state = self._zero_state()
        key = (self.model.cfg, self.static_sched, self.ctx, self.kv_sharding,
               tuple((k, str(v.dtype)) for k, v in sorted(self.dyn.items())), jax.tree.structure(self.params),
               tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(self.params)), self.mesh)
        t0 = time.perf_counter()
        with _LOCK:
            compiled = _PROGRAMS.get(key)
            if compiled is None:
                compiled = _chunk_jit.lower(*self._args(), **self._static()).compile()
                _PROGRAMS[key] = compiled
                STATS["compilations"] += 1
                STATS["compile_s"] += time.perf_counter() - t0
        self.compiled = compiled
        return time.perf_counter() - t0

    # -- slots --------------------------------------------------------------------------------------------------
    def free_slots(self) -> list[int]:
        return [b for b in range(self.n) if self.owner[b] is None]

    def busy(self) -> int:
        return sum(o is not None for o in self.owner)

    def load(self, slot: int, prompt_ids, seed: int, owner) -> None:
        """Write a request's prompt into a free slot (left-padded to P as `generate` pads it alone)."""
        ids = list(prompt_ids)
        if not ids or len(ids) > self.P:
            raise ScheduleError(f"prompt of {len(ids)} tokens does not fit the slot bucket P={self.P}")
        P, cfg = self.P, self.model.cfg
        self.x[slot] = cfg.pad_token_id
        self.x[slot, P - len(ids):P] = ids
        self.x[slot, P:] = cfg.mask_token_id
        self.valid[slot] = False
        self.valid[slot, P - len(ids):] = True
        self.positions[slot] = np.maximum(np.cumsum(self.valid[slot]) - 1, 0)
        self.seeds[slot] = np.uint32(seed)
        self.reset[slot], self.occupied[slot], self.owner[slot] = True, True, owner

    def clear(self, slot: int) -> None:
        """Empty a slot (finished or cancelled request): its row is made inactive at the next chunk."""
        P = self.P
        self.x[slot] = self.model.cfg.pad_token_id
        self.x[slot, P:] = self.model.cfg.mask_token_id
        self.valid[slot] = False
        self.valid[slot, P - 1:] = True
        self.positions[slot] = np.maximum(np.cumsum(self.valid[slot]) - 1, 0)
        self.reset[slot], self.occupied[slot], self.owner[slot] = True, False, None

    def step(self, max_iters: int, stop_on_finish: bool = False) -> list[RowView]:
        """Run at most `max_iters` loop iterations (fewer when every row is idle or, with stop_on_finish, when a
        row finishes); returns each slot's view."""
        if self.compiled is None:
            self.compile()
        self.state = self.compiled(*self._args(max_iters, stop_on_finish))
        self.reset[:] = False
        st = jax.device_get({k: self.state[k] for k in ("x", "nfe", "active", "capped")})
        self.last_view = [RowView(gen=st["x"][b, self.P:], nfe=int(st["nfe"][b]), active=bool(st["active"][b]),
                                  capped=bool(st["capped"][b])) for b in range(self.n)]
        return self.last_view


def prompt_bucket(n_tokens: int) -> int:
    """The prompt bucket `generate` pads a prompt of n tokens to (alone)."""
    return bucket_length(n_tokens)
