"""One entry point for block attention; the implementation is chosen by name.

"reference" is plain jnp (any backend). Named kernels that cannot run here raise a clear error; "auto" picks the
best available kernel for the default backend and falls back to the reference with a warning.
"""

from __future__ import annotations

import warnings

import jax

from pallas_kernels.block_attention import reference

IMPLEMENTATIONS = ("reference", "pallas_tpu", "pallas_gpu", "auto")


class KernelUnavailableError(RuntimeError):
    pass


def available_implementations() -> tuple[str, ...]:
    return IMPLEMENTATIONS


def _kernel_for(name: str, interpret: bool):
    if name == "reference":
        return reference.block_attention
    backend = jax.default_backend()
    if name == "pallas_tpu":
        if backend != "tpu" and not interpret:
            raise KernelUnavailableError(
                f"attention implementation 'pallas_tpu' needs a TPU (default backend is {backend!r}); "
                "pass interpret=True to run it in the Pallas interpreter, or use 'reference'/'auto'")
        from pallas_kernels.block_attention import pallas_tpu
        return pallas_tpu.make(interpret=interpret)
    if name == "pallas_gpu":
        if backend != "gpu" and not interpret:
            raise KernelUnavailableError(
                f"attention implementation 'pallas_gpu' needs a GPU (default backend is {backend!r}); "
                "pass interpret=True to run it in the Pallas interpreter, or use 'reference'/'auto'")
        from pallas_kernels.block_attention import pallas_gpu
        return pallas_gpu.make(interpret=interpret)
    raise ValueError(f"unknown attention implementation {name!r}; expected one of {IMPLEMENTATIONS}")


def resolve(name: str, interpret: bool = False):
    """Return the attention callable for `name` (see module docstring)."""
    if name == "auto":
        backend = jax.default_backend()
        want = {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(backend)
        if want is None:
            return reference.block_attention
        try:
            return _kernel_for(want, interpret)
        except Exception as e:  # noqa: BLE001 - fall back loudly
            warnings.warn(f"attention 'auto': {want} unavailable ({e}); using the jnp reference")
            return reference.block_attention
    return _kernel_for(name, interpret)


def block_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, key_valid_BxS, q_index_BxT=None, *, block_size=0,
                    scale=None, implementation="reference", interpret=False):
    fn = resolve(implementation, interpret)
    return fn(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, key_valid_BxS, q_index_BxT, block_size=block_size, scale=scale)
