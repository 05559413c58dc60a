"""The serving scheduler: one thread owns the device and drives the slot groups (continuous batching).

Requests wait in a bounded FIFO queue. Between loop chunks the thread clears finished and cancelled slots, loads
waiting requests into free slots of their group (same program: schedule, prompt bucket, gen length), runs the next
chunk of the group whose turn it is (round robin), then turns each slot's canvas into events for its request: the
finalised prefix (generated tokens up to the first still-masked position) as it grows, and the end. A request ends
as soon as its answer is final: EOS, a stop id or string, or max_tokens tokens in the finalised prefix, or the row
finished; its slot is refilled at once. No HTTP here (dllm_jax/serve/app.py).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from typing import Any, Callable

import numpy as np

from dllm_jax.serve import slots as slots_mod
from dllm_jax.serve.slots import SlotGroup


class QueueFull(RuntimeError):
    pass


@dataclasses.dataclass(eq=False)
class Request:
    prompt_ids: list
    group_key: Any
    max_tokens: int
    seed: int = 0
    stop: tuple = ()
    stop_ids: frozenset = frozenset()
    sink: Callable | None = None  # called (from the scheduler thread) with each event dict
    id: str = ""
    t_arrival: float = dataclasses.field(default_factory=time.perf_counter)
    t_start: float | None = None
    t_first: float | None = None
    t_end: float | None = None
    cancelled: bool = False
    done: bool = False
    ids: list = dataclasses.field(default_factory=list)  # output token ids so far (final)
    text: str = ""  # output text sent so far
    nfe: int = 0
    finish_reason: str | None = None

    def emit(self, ev):
        if self.sink is not None:
            self.sink(ev)

    def stats(self) -> dict:
        end = self.t_end or time.perf_counter()
        start = self.t_start or end
        run = max(end - start, 1e-9)
        return {"nfe": self.nfe, "completion_tokens": len(self.ids), "tokens_per_s": len(self.ids) / run,
                "queue_s": start - self.t_arrival, "ttft_s": (self.t_first or end) - self.t_arrival,
                "latency_s": end - self.t_arrival, "token_ids": [int(t) for t in self.ids]}


class Metrics:
    def __init__(self):
        self.counts = collections.Counter()
        self.tokens_total = 0
        self.forwards_total = 0
        self.chunks = 0
        self.recent = collections.deque()  # (t_end, tokens) of the last 30 s

    def finish(self, req: Request):
        self.counts[req.finish_reason if req.finish_reason in ("cancelled", "error") else "ok"] += 1
        self.tokens_total += len(req.ids)
        self.forwards_total += req.nfe
        now = time.perf_counter()
        self.recent.append((now, len(req.ids)))
        while self.recent and self.recent[0][0] < now - 30:
            self.recent.popleft()

    def tokens_per_s(self) -> float:
        now = time.perf_counter()
        while self.recent and self.recent[0][0] < now - 30:
            self.recent.popleft()
        return sum(n for _, n in self.recent) / 30.0


class Batcher:
    """Owns the slot groups and the scheduler thread.

    make_group(key) -> SlotGroup builds the group of a key (the app knows schedules and buckets); decode(ids) -> str.
    chunk: loop iterations per device call when the group is full (a quarter of it while a slot is free, so new
    arrivals are admitted sooner); the host gets control back at least this often to stream and refill.
    static: static batching instead of continuous (a baseline for benchmarks/serve_load.py).
    """

    def __init__(self, make_group: Callable, decode: Callable, eos_id: int, mask_id: int, max_queue: int = 256,
                 chunk: int = 8, static: bool = False):
        self.make_group, self.decode = make_group, decode
        self.static = static  # baseline for benchmarks: refill a group only once all its slots are free
        self.eos_id, self.mask_id = eos_id, mask_id
        self.max_queue, self.chunk = max_queue, chunk
        self.groups: dict = {}
        self.waiting: collections.deque = collections.deque()
        self.in_flight = 0
        self.metrics = Metrics()
        self.cv = threading.Condition()
        self.stopping = False
        self.error: BaseException | None = None
        self._rr = itertools.count()
        self.thread = threading.Thread(target=self._run, name="dllm-batcher", daemon=True)

    # -- called from the server --------------------------------------------------------------------------------
    def warm(self, keys) -> float:
        """Build and compile the groups of `keys` before serving; returns the seconds spent."""
        t0 = time.perf_counter()
        for k in keys:
            self.group(k)
        return time.perf_counter() - t0

    def group(self, key) -> SlotGroup:
        """The slot group of `key`, built and compiled on first use (a failure leaves no group behind)."""
        g = self.groups.get(key)
        if g is None:
            g = self.make_group(key)
            g.compile()
            g.key = key
            self.groups[key] = g
        return g

    def start(self):
        self.thread.start()

    def submit(self, req: Request) -> None:
        with self.cv:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                self.metrics.counts["rejected_queue_full"] += 1
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            self.waiting.append(req)
            self.in_flight += 1
            self.cv.notify()

    def cancel(self, req: Request) -> None:
        with self.cv:
            if not req.done:
                req.cancelled = True
                self.cv.notify()

    def stop(self, timeout=None) -> None:
        """Finish everything in flight (drain), then stop the thread."""
        with self.cv:
            self.stopping = True
            self.cv.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def snapshot(self) -> dict:
        with self.cv:
            occupied = sum(g.busy() for g in self.groups.values())
            total = sum(g.n for g in self.groups.values())
            m = self.metrics
            return {"in_flight": self.in_flight, "queue": len(self.waiting), "slots_occupied": occupied,
                    "slots_total": total, "groups": len(self.groups), "counts": dict(m.counts),
                    "tokens_total": m.tokens_total, "forwards_total": m.forwards_total, "chunks": m.chunks,
                    "tokens_per_s": m.tokens_per_s(), "compilations": slots_mod.STATS["compilations"]}

    # -- the scheduler thread ---------------------------------------------------------------------------------
    def _finish(self, req: Request, reason: str, grp: SlotGroup | None = None, slot: int | None = None):
        if grp is not None:
            grp.clear(slot)
        if req.done:
            return
        req.done, req.finish_reason, req.t_end = True, reason, time.perf_counter()
        self.in_flight -= 1
        self.metrics.finish(req)
        if reason != "cancelled":
            if req.t_first is None:
                req.t_first = req.t_end
            tail = self.decode(req.ids)
            tail = self._cut_stop(req, tail)[0]
            if tail.startswith(req.text) and len(tail) > len(req.text):
                req.emit({"text": tail[len(req.text):]})
            req.text = tail
        req.emit({"done": True, "finish_reason": reason, "stats": req.stats(), "text_all": req.text})

    def _cut_stop(self, req: Request, text: str):
        hits = [text.find(s) for s in req.stop if s and s in text]
        return (text[:min(hits)], True) if hits else (text, False)

    def _admit(self):
        """Clear cancelled slots, drop cancelled waiters, load waiting requests into free slots (FIFO per group)."""
        for g in self.groups.values():
            for b, r in enumerate(g.owner):
                if r is not None and r.cancelled:
                    self._finish(r, "cancelled", g, b)
        keep = collections.deque()
        # static batching (benchmark baseline): a group takes new requests only when it is empty
        free = {k: g.free_slots() if not self.static or g.busy() == 0 else [] for k, g in self.groups.items()}
        while self.waiting:
            r = self.waiting.popleft()
            if r.cancelled:
                self._finish(r, "cancelled")
                continue
            if r.group_key not in free:
                try:
                    g = self.group(r.group_key)
                except Exception as e:  # building or compiling this request's program failed: fail it alone
                    r.emit({"error": str(e)})
                    self._finish(r, "error")
                    continue
                free[r.group_key] = g.free_slots() if not self.static or g.busy() == 0 else []
            f = free[r.group_key]
            if f:
                self.groups[r.group_key].load(f.pop(0), r.prompt_ids, r.seed, r)
                r.t_start = time.perf_counter()
            else:
                keep.append(r)
        self.waiting = keep

    def _observe(self, grp: SlotGroup, views):
        for b, v in enumerate(views):
            r = grp.owner[b]
            if r is None:
                continue
            r.nfe = v.nfe
            if r.cancelled:
                self._finish(r, "cancelled", grp, b)
                continue
            gen = v.gen
            masked = np.flatnonzero(gen == self.mask_id)
            final = gen[: masked[0]] if masked.size else gen
            cut, reason = min(len(final), r.max_tokens), None
            if len(final) >= r.max_tokens:
                reason = "length"
            stops = np.flatnonzero((final[:cut] == self.eos_id) | np.isin(final[:cut], list(r.stop_ids)))
            if stops.size:
                cut, reason = int(stops[0]), "stop"
            if not v.active and reason is None:  # the row finished without EOS (or hit the max_nfe bound)
                reason = "length"
            r.ids.extend(int(t) for t in final[len(r.ids):cut])
            text = self.decode(r.ids)
            text, hit = self._cut_stop(r, text)
            if hit:
                reason = "stop"
            if reason is not None:
                self._finish(r, reason, grp, b)
                continue
            # stream the finalised text, holding back an incomplete character and a possible stop-string prefix
            hold = max((len(s) - 1 for s in r.stop), default=0)
            safe = text[: len(text) - hold] if hold else text
            safe = safe.rstrip("\ufffd")
            if len(safe) > len(r.text) and safe.startswith(r.text):
                if r.t_first is None:
                    r.t_first = time.perf_counter()
                r.emit({"text": safe[len(r.text):]})
                r.text = safe

    def _run(self):
        try:
            while True:
                with self.cv:
                    self._admit()
                    live = [g for g in self.groups.values() if g.busy()]
                    while not live:
                        if self.stopping and not self.waiting:
                            return
                        self.cv.wait(0.5)
                        self._admit()
                        live = [g for g in self.groups.values() if g.busy()]
                    grp = live[next(self._rr) % len(live)]
                    waiting_here = any(r.group_key == grp.key for r in self.waiting)
                    # with a free slot, come back sooner so that a request arriving meanwhile waits less
                    full = grp.busy() == grp.n or self.static
                    chunk = self.chunk if full else max(1, self.chunk // 4)
                views = grp.step(chunk, stop_on_finish=waiting_here)
                with self.cv:
                    self.metrics.chunks += 1
                    self._observe(grp, views)
        except BaseException as e:  # keep the failure visible: /health turns 500 and waiting requests get an error
            self.error = e
            with self.cv:
                for g in self.groups.values():
                    for b, r in enumerate(g.owner):
                        if r is not None:
                            r.emit({"error": f"internal error: {e}"})
                            self._finish(r, "error", g, b)
                while self.waiting:
                    r = self.waiting.popleft()
                    r.emit({"error": f"internal error: {e}"})
                    self._finish(r, "error")
            raise

