"""Small helpers for notebooks and scripts: the persistent compilation cache, accelerator facts, the demo model.

    from dllm_jax.utils import enable_compilation_cache, accelerator_info, demo_model_path
    enable_compilation_cache()            # $DLLM_JAX_CACHE_DIR or ~/.cache/dllm_jax/xla
    info = accelerator_info()             # platform, device kind/count, memory per device
    model = dllm_jax.load(demo_model_path())

The `dllm-jax` command line enables the cache when `DLLM_JAX_CACHE_DIR` is set.
"""

from __future__ import annotations

import os
import sys

CACHE_ENV = "DLLM_JAX_CACHE_DIR"
CI_ENV = "DLLM_JAX_CI"


def default_cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "dllm_jax", "xla")


def enable_compilation_cache(path: str | None = None, min_compile_time_s: float = 0.0,
                             min_entry_size_bytes: int = 0) -> str:
    """Turn on JAX's persistent compilation cache in `path` (default: $DLLM_JAX_CACHE_DIR, else
    ~/.cache/dllm_jax/xla) and return the directory.

    Every program compiled afterwards (generation programs included: `generate` lowers and compiles through jax)
    is written there, and an identical program in a later process is read back instead of compiled -- so
    re-running a notebook after a runtime restart, or the same CLI command twice, skips XLA compilation. (Within
    one process `generate` already keeps its compiled programs.) JAX by default caches only programs that took
    >= 1 s to compile; `min_compile_time_s=0` caches all of them. The key covers the program, the jax/jaxlib
    version, the backend and its flags, so one directory may be shared between machines and versions. On Colab,
    a directory on a mounted Drive survives the runtime."""
    import jax

    path = os.path.abspath(os.path.expanduser(path or default_cache_dir()))
    os.makedirs(path, exist_ok=True)
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", int(min_entry_size_bytes))
    if previous and os.path.abspath(previous) != path:
        try:  # the cache object was created for the old directory: make jax re-open it
            from jax.experimental.compilation_cache import compilation_cache

            compilation_cache.reset_cache()
        except Exception:  # noqa: BLE001 - best effort; the new dir is used from the next initialisation
            pass
    return path


def is_ci() -> bool:
    """True when $DLLM_JAX_CI is set to a true value (the headless notebook tests: smallest sizes)."""
    return os.environ.get(CI_ENV, "").strip().lower() not in ("", "0", "false", "no")


def accelerator_info() -> dict:
    """Facts about the attached devices: platform ('cpu' / 'tpu' / 'gpu'), device kind, count, memory per device
    in bytes (None where the backend does not report it, e.g. CPU) and whether it is an accelerator."""
    import jax

    devs = jax.devices()
    d = devs[0]
    mem = None
    try:
        stats = d.memory_stats() or {}
        mem = stats.get("bytes_limit") or stats.get("bytes_reservable_limit")
    except Exception:  # noqa: BLE001 - not every backend implements memory_stats
        pass
    return {"platform": d.platform, "device_kind": getattr(d, "device_kind", d.platform), "device_count": len(devs),
            "memory_per_device": int(mem) if mem else None, "accelerator": d.platform != "cpu",
            "jax": jax.__version__}


def describe_devices(info: dict | None = None) -> str:
    """One human line about the devices, saying clearly when JAX runs on the CPU."""
    info = info or accelerator_info()
    mem = info["memory_per_device"]
    mem_s = f", {mem / 1e9:.1f} GB each" if mem else ""
    line = f"{info['device_count']} x {info['device_kind']} ({info['platform']}{mem_s}); jax {info['jax']}"
    if not info["accelerator"]:
        line += ("\nRunning on the CPU: no TPU/GPU is attached (Colab: Runtime > Change runtime type > TPU). "
                 "The cells use the small embedded model; the 7-8B model cells only print what they would do.")
    return line


def default_model_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "default_model")


def demo_model_path(standin_dir: str | None = None, verbose: bool = True) -> str:
    """The embedded default model if it is installed; otherwise a stand-in with the same tokenizer and the
    'tiny' training preset's shape but *random, untrained* weights (built once under `standin_dir`, default
    ~/.cache/dllm_jax/standin_tiny), so that every code path of the notebooks runs; its answers are gibberish."""
    emb = default_model_path()
    if os.path.isfile(os.path.join(emb, "dllm_jax_config.json")):
        return emb
    d = os.path.abspath(os.path.expanduser(standin_dir or os.path.join("~", ".cache", "dllm_jax", "standin_tiny")))
    if not os.path.isfile(os.path.join(d, "dllm_jax_config.json")):
        import jax

        from dllm_jax import checkpoint, train
        from dllm_jax.models.transformer import init_params
        from dllm_jax.tokenizer import save

        cfg = train.model_config(train.get_preset("tiny"))
        tmp = d + ".tmp"
        if os.path.exists(tmp):
            import shutil

            shutil.rmtree(tmp)
        os.makedirs(tmp)
        checkpoint.save_converted(tmp, cfg, init_params(cfg, jax.random.key(0)))
        save(tmp)
        os.makedirs(os.path.dirname(d), exist_ok=True)
        os.replace(tmp, d)
    if verbose:
        print(f"NOTE: the embedded default model is not installed ({emb}); using an untrained stand-in with random "
              f"weights ({d}): the code runs, the answers are gibberish.", file=sys.stderr)
    return d
