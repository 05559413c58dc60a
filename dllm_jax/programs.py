"""Bounded caches of compiled XLA programs (`generate`, the block runner, BlockBatch, the serving slots).

Each compiled executable holds native code and buffers outside Python's view: on XLA:CPU every program maps
dozens to hundreds of memory regions, and Linux allows a process 65,530 (`vm.max_map_count`). A long-lived
process that compiles many distinct programs -- a server seeing many shapes, a notebook sweeping schedules, a
test worker -- must therefore drop old ones, or XLA's compiler eventually fails to map memory and aborts the
process. Each cache keeps the most recently used `maxsize` programs (default 32, or `$DLLM_JAX_MAX_PROGRAMS`);
evicting one only means compiling it again when it is next used.

    from dllm_jax.programs import clear_program_caches
    clear_program_caches()     # drop every compiled dllm-jax program (jax.clear_caches() drops jax's own)
"""

from __future__ import annotations

import collections
import os
import threading
import weakref

MAX_ENV = "DLLM_JAX_MAX_PROGRAMS"
DEFAULT_MAX = 32

_ALL: "weakref.WeakSet[ProgramCache]" = weakref.WeakSet()


def default_maxsize() -> int:
    raw = os.environ.get(MAX_ENV, "")
    if not raw:
        return DEFAULT_MAX
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"${MAX_ENV} must be a positive integer (compiled programs kept per cache), got {raw!r}")
    return n


class ProgramCache:
    """A thread-safe least-recently-used map key -> compiled program, at most `maxsize` entries."""

    def __init__(self, name: str, maxsize: int | None = None):
        self.name = name
        self._maxsize = maxsize
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0
        _ALL.add(self)

    @property
    def maxsize(self) -> int:
        return self._maxsize if self._maxsize is not None else default_maxsize()

    def get(self, key):
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
                self.evictions += 1

    def values(self):
        with self._lock:
            return list(self._items.values())

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key) -> bool:
        return key in self._items


def clear_program_caches() -> None:
    """Drop every compiled program held by dllm-jax's caches (they are compiled again on next use)."""
    for cache in list(_ALL):
        cache.clear()
