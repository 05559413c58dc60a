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
from dllm_jax.engine.loop import Schedule, _batch_axis, init_slots, run_chunk
from dllm_jax.generate import ScheduleError, _dyn_arrays, bucket_length, validate
from dllm_jax.programs import ProgramCache

_STATIC = ("cfg", "sched", "ctx", "kv_sharding")  # ctx.batch: the physical batch of one chunk


def _chunk_impl(params, state, idx, x, key_valid, positions, seeds, reset, occupied, max_iters, stop_on_finish, dyn,
                *, cfg, sched, ctx, kv_sharding=None):
    """One chunk over the rows `idx` [b] of the group's state (all n slots): those rows are gathered into a batch of
    b = ctx.batch rows, advanced by `run_chunk`, and written back (rows are independent, so where a row runs does
    not change its tokens). The per-row inputs x ... occupied are given for the b rows already."""
    def take(path, a):
        return a if a.ndim == 0 else jnp.take(a, idx, axis=_batch_axis(path))

    sub = jax.tree_util.tree_map_with_path(take, state)
    keys = jax.vmap(jax.random.key)(seeds)  # as `generate.prepare` makes them (one seed per row)
    new = run_chunk(params, cfg, sched.merge_dynamic(dyn), ctx, sub, x, key_valid, positions, keys, reset,
                    occupied, max_iters, stop_on_finish, kv_sharding=kv_sharding)

    def put(path, a, b):
        if a.ndim == 0:
            return b
        ax = _batch_axis(path)
        return a.at[(slice(None),) * ax + (idx,)].set(b)

    return jax.tree_util.tree_map_with_path(put, state, new)


_chunk_jit = jax.jit(_chunk_impl, static_argnames=_STATIC, donate_argnames=("state",))

_PROGRAMS = ProgramCache("serve_slots")
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
    """`n` slots of one (static schedule, dynamic values, P, G) program.

    batch_sizes: the physical batch sizes compiled (default: n). A chunk runs the occupied slots (plus idle ones up
    to the size) in the smallest compiled size that holds them, so idle slots cost no compute where compute grows
    with the batch (CPUs); each size is one compiled program."""

    def __init__(self, model, sched: Schedule, prompt_len: int, gen_length: int, n_slots: int, mesh=None,
                 batch_sizes=None):
        sched = check_schedule(sched)
        cfg = model.cfg
        dummy = [[cfg.pad_token_id]]
        validate(model, dummy * n_slots, gen_length, sched, prompt_len)  # ScheduleError for a bad combination
        self.model, self.sched, self.mesh = model, sched, mesh
        self.P, self.G, self.n = prompt_len, gen_length, n_slots
        self.sizes = sorted({int(b) for b in (batch_sizes or ()) if 0 < int(b) < n_slots} | {n_slots})
        self.ctx = self._ctx(n_slots)
        self.static_sched, dyn_values = sched.split_dynamic()
        self.dyn = _dyn_arrays(dyn_values)
        L = prompt_len + gen_length
        self.x = np.full((n_slots, L), cfg.pad_token_id, np.int32)
        self.x[:, prompt_len:] = cfg.mask_token_id
        self.valid = np.zeros((n_slots, L), bool)
        self.valid[:, prompt_len - 1:] = True  # an empty slot holds a one-token dummy prompt (no all-masked row)
        self.positions = np.maximum(np.cumsum(self.valid, axis=1) - 1, 0).astype(np.int32)
        self.seeds = np.zeros((n_slots,), np.uint32)
        self.reset = np.ones((n_slots,), bool)  # pending re-initialisation, applied when the row next runs
        self.occupied = np.zeros((n_slots,), bool)
        self.owner: list = [None] * n_slots
        self.params = model.params
        if mesh is not None:
            from dllm_jax import sharding

            sharding.check_batch(mesh, n_slots)
            self.params = sharding.shard_params(model.params, cfg, mesh)
            self.sizes = [b for b in self.sizes if b % mesh.shape["data"] == 0]
        self.state = None
        self.programs: dict = {}
        self.last_view: list[RowView] = []

    def _ctx(self, b):
        cfg = self.model.cfg
        return Ctx(batch=b, prompt_len=self.P, gen_length=self.G, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id,
                   pad_id=cfg.pad_token_id)

    def _kv_sharding(self, b):
        if self.mesh is None or not self.sched.cache.has_cache:
            return None
        from dllm_jax import sharding

        return sharding.kv_sharding(self.model.cfg, self.mesh, b, self.P + self.G)

    # -- program ------------------------------------------------------------------------------------------------
    def _args(self, idx, max_iters=0, stop_on_finish=False):
        arrays = (self.x[idx], self.valid[idx], self.positions[idx], self.seeds[idx])
        if self.mesh is not None:
            from dllm_jax import sharding

            arrays = tuple(jax.device_put(a, sharding.batch_sharding(self.mesh, np.ndim(a))) for a in arrays)
        return (self.params, self.state, np.asarray(idx, np.int32), *arrays, self.reset[idx], self.occupied[idx],
                np.int32(max_iters), np.bool_(stop_on_finish), self.dyn)

    def _static(self, b):
        return dict(cfg=self.model.cfg, sched=self.static_sched, ctx=self._ctx(b), kv_sharding=self._kv_sharding(b))

    def _zero_state(self):
        keys = jax.vmap(jax.random.key)(jnp.asarray(self.seeds))
        shapes = jax.eval_shape(lambda p, x, v, pos, k, d: init_slots(
            p, self.model.cfg, self.static_sched.merge_dynamic(d), self.ctx, x, v, pos, k, self._kv_sharding(self.n)),
            self.params, jnp.asarray(self.x), jnp.asarray(self.valid), jnp.asarray(self.positions), keys, self.dyn)
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def compile(self) -> float:
        """Compile (or fetch from the process cache) this group's programs; returns the seconds spent."""
        if self.state is None:
            self.state = self._zero_state()
        t0 = time.perf_counter()
        for b in self.sizes:
            key = (self.model.cfg, self.static_sched, self.n, self._ctx(b), self._kv_sharding(b),
                   tuple((k, str(v.dtype)) for k, v in sorted(self.dyn.items())), jax.tree.structure(self.params),
                   tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(self.params)), self.mesh)
            with _LOCK:
                compiled = _PROGRAMS.get(key)
                if compiled is None:
                    t1 = time.perf_counter()
                    compiled = _chunk_jit.lower(*self._args(np.arange(b)), **self._static(b)).compile()
                    _PROGRAMS.put(key, compiled)
                    STATS["compilations"] += 1
                    STATS["compile_s"] += time.perf_counter() - t1
            self.programs[b] = compiled
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
        row finishes) over the occupied slots; returns each slot's view."""
        if not self.programs:
            self.compile()
        occ = [b for b in range(self.n) if self.owner[b] is not None]
        size = min(b for b in self.sizes if b >= len(occ))
        # fill up with idle slots, those with a pending reset first (a cleared row is deactivated when it runs)
        idle = sorted((b for b in range(self.n) if self.owner[b] is None), key=lambda b: not self.reset[b])
        idx = np.asarray(sorted(occ + idle[: size - len(occ)]), np.int32)
        self.state = self.programs[size](*self._args(idx, max_iters, stop_on_finish))
        self.reset[idx] = False
        st = jax.device_get({k: self.state[k] for k in ("x", "nfe", "active", "capped")})
        self.last_view = [RowView(gen=st["x"][b, self.P:], nfe=int(st["nfe"][b]), active=bool(st["active"][b]),
                                  capped=bool(st["capped"][b])) for b in range(self.n)]
        return self.last_view


def prompt_bucket(n_tokens: int) -> int:
    """The prompt bucket `generate` pads a prompt of n tokens to (alone)."""
    return bucket_length(n_tokens)
