"""One entry point for block attention; the implementation is chosen by name.

  "reference"   plain jnp (any backend).
  "pallas_tpu"  Pallas/Mosaic TPU kernel; needs a TPU, or `interpret=True` (Pallas interpreter, any backend).
  "pallas_gpu"  Pallas/Triton GPU kernel; needs a GPU, or `interpret=True` (Pallas interpreter). Triton is
                deprecated in Pallas from JAX 0.11 on; kept for older jax and as the fallback.
  "pallas_mgpu" Pallas/Mosaic GPU kernel (Hopper wgmma + TMA); needs a GPU, or `interpret=True` (the Mosaic GPU
                interpreter: simulated SMEM, TMA copies, barriers; slow, for tests).
  "auto"        the kernels for the default backend in order of preference (TPU -> pallas_tpu; GPU -> pallas_mgpu,
                then pallas_gpu): the first that is importable and passes a one-off probe (compile + run a tiny
                case, compare with the reference); otherwise the reference. Every candidate that fails is reported
                with a warning (emitted once per process and reason).

A named kernel that cannot run here raises `KernelUnavailableError` (never silently falls back). Resolved
callables are cached per (name, interpret, backend), so the probe and imports happen once.
"""

from __future__ import annotations

import functools
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_attention import reference

IMPLEMENTATIONS = ("reference", "pallas_tpu", "pallas_gpu", "pallas_mgpu", "auto")
_KERNEL_BACKEND = {"pallas_tpu": "tpu", "pallas_gpu": "gpu", "pallas_mgpu": "gpu"}
_AUTO_CHOICE = {"tpu": ("pallas_tpu",), "gpu": ("pallas_mgpu", "pallas_gpu")}


class KernelUnavailableError(RuntimeError):
    """A named attention implementation cannot run on this machine."""


_cache: dict = {}
_warned: set = set()
_lock = threading.Lock()


def available_implementations() -> tuple[str, ...]:
    """All implementation names accepted by `resolve` / `block_attention`."""
    return IMPLEMENTATIONS


def required_backend(name: str) -> str | None:
    """The backend a named kernel compiles for ("tpu" / "gpu"); None for "reference" and "auto"."""
    return _KERNEL_BACKEND.get(name)


def runnable_implementations(interpret: bool = False) -> tuple[str, ...]:
    """Names that resolve without error on the default backend (kernels only on their own hardware unless
    `interpret`)."""
    backend = jax.default_backend()
    names = ["reference"]
    for name, want in _KERNEL_BACKEND.items():
        if interpret or backend == want:
            names.append(name)
    return tuple(names) + ("auto",)


def _warn_once(msg: str) -> None:
    with _lock:
        if msg in _warned:
            return
        _warned.add(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _kernel_for(name: str, interpret):
    if name == "reference":
        return reference.block_attention
    if name not in _KERNEL_BACKEND:
        raise ValueError(f"unknown attention implementation {name!r}; expected one of {IMPLEMENTATIONS}")
    want = _KERNEL_BACKEND[name]
    backend = jax.default_backend()
    if backend != want and not interpret:
        raise KernelUnavailableError(
            f"attention implementation {name!r} needs a {want.upper()} (default backend is {backend!r}); "
            "pass interpret=True to run it in the Pallas interpreter, or use 'reference'/'auto'")
    try:
        if name == "pallas_tpu":
            from pallas_kernels.block_attention import pallas_tpu as mod
        elif name == "pallas_mgpu":
            from pallas_kernels.block_attention import pallas_mgpu as mod
        else:
            from pallas_kernels.block_attention import pallas_gpu as mod
    except ImportError as e:  # e.g. a jaxlib built without the Mosaic/Triton bindings, a jax without Triton
        raise KernelUnavailableError(f"attention implementation {name!r} cannot be imported here: {e}") from e
    return mod.make(interpret=interpret)


def _probe(fn) -> None:
    """Compile and run `fn` on a tiny block-causal GQA case with left padding; raise if it fails or disagrees
    with the reference. Uses ahead-of-time compiled executables on host (numpy) inputs, so it runs eagerly even
    when `resolve` is called while an outer jit is being traced."""
    rng = np.random.default_rng(0)
    B, T, S, H, K, D = 2, 16, 256, 4, 2, 128
    q, k, v = (rng.standard_normal(shape, np.float32).astype(jnp.bfloat16)
               for shape in ((B, T, H, D), (B, S, K, D), (B, S, K, D)))
    key_valid = np.arange(S)[None, :] >= np.array([[0], [37]])
    q_index = np.broadcast_to(100 + np.arange(T, dtype=np.int32), (B, T))
    args = (q, k, v, key_valid, q_index)
    outs = []
    for f in (fn, reference.block_attention):
        compiled = jax.jit(functools.partial(f, block_size=32)).lower(*args).compile()
        outs.append(np.asarray(compiled(*args), np.float32))
    err = float(np.max(np.abs(outs[0] - outs[1])))
    if not err <= 5e-2:
        raise RuntimeError(f"probe mismatch vs reference: max abs err {err}")


def _cache_key(name, interpret):
    try:
        hash(interpret)
    except TypeError:
        interpret = repr(interpret)
    return name, interpret, jax.default_backend()


def resolve(name: str, interpret=False):
    """Return the attention callable for `name` (see module docstring)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}; expected one of {IMPLEMENTATIONS}")
    key = _cache_key(name, interpret)
    fn = _cache.get(key)
    if fn is not None:
        return fn
    if name == "auto":
        backend = jax.default_backend()
        candidates = _AUTO_CHOICE.get(backend, ())
        if not candidates:
            _warn_once(f"attention 'auto': no Pallas kernel for backend {backend!r}; using the jnp reference")
        fn = None
        for n, want in enumerate(candidates):
            try:
                fn = _kernel_for(want, interpret)
                _probe(fn)
                break
            except Exception as e:  # noqa: BLE001 - fall back, loudly
                fn = None
                then = f"trying {candidates[n + 1]}" if n + 1 < len(candidates) else "using the jnp reference"
                _warn_once(f"attention 'auto': {want} unavailable ({type(e).__name__}: {e}); {then}")
        if fn is None:
            fn = reference.block_attention
    else:
        fn = _kernel_for(name, interpret)
    _cache[key] = fn
    return fn


def block_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, key_valid_BxS, q_index_BxT=None, *, block_size=0,
                    scale=None, implementation="reference", interpret=False):
    fn = resolve(implementation, interpret)
    return fn(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, key_valid_BxS, q_index_BxT, block_size=block_size, scale=scale)
