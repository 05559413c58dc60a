"""The converted dllm-jax checkpoint format: `dllm_jax_config.json` + an orbax `params/` directory.

dllm_jax_config.json = {"format_version": 1, "model": ModelConfig.to_dict(), "dtype": "float32"|"bfloat16", ...}
params/ = orbax StandardCheckpointer save of the params pytree (see dllm_jax.models.transformer).
Tokenizer files, when present, sit beside them.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from dllm_jax.model import CONVERTED_CONFIG, Model
from dllm_jax.models.config import ConfigError, ModelConfig
from dllm_jax.models.transformer import init_params

FORMAT_VERSION = 1


def write_config(dst: str, cfg: ModelConfig, dtype_name: str, **extra) -> None:
    with open(os.path.join(dst, CONVERTED_CONFIG), "w") as f:
        json.dump({"format_version": FORMAT_VERSION, "model": cfg.to_dict(), "dtype": dtype_name, **extra}, f,
                  indent=1)


def read_config(path: str) -> tuple[ModelConfig, dict]:
    p = os.path.join(path, CONVERTED_CONFIG)
    try:
        with open(p) as f:
            meta = json.load(f)
        return ModelConfig.from_dict(meta["model"]), meta
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{p} is not a valid dllm-jax config: {e}") from None


def save_params(dst: str, params) -> None:
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(os.path.join(dst, "params")), params)
    ckptr.wait_until_finished()
    ckptr.close()


def save_converted(dst: str, cfg: ModelConfig, params, dtype_name: str = "float32", **extra) -> None:
    """Write a converted checkpoint into the (existing, empty) directory `dst`."""
    save_params(dst, params)
    write_config(dst, cfg, dtype_name, **extra)


def abstract_params(cfg: ModelConfig, dtype, shardings=None):
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), dtype=dtype))
    if shardings is None:
        return shapes
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def restore_converted(path: str, dtype=jnp.float32, mesh=None) -> Model:
    """Restore a converted checkpoint; with a mesh, each array lands directly on its sharding (no host copy)."""
    import orbax.checkpoint as ocp

    cfg, meta = read_config(path)
    shardings = None
    if mesh is not None:
        from dllm_jax import sharding

        shardings = sharding.param_shardings(cfg, mesh)
    target = abstract_params(cfg, dtype, shardings)
    ckptr = ocp.StandardCheckpointer()
    try:
        params = ckptr.restore(os.path.abspath(os.path.join(path, "params")), target)
    except Exception as e:  # noqa: BLE001 - orbax raises many types; name the problem once
        raise ConfigError(f"cannot restore params from {path}/params: {type(e).__name__}: {e}") from None
    finally:
        ckptr.close()
    tok = path if os.path.isfile(os.path.join(path, "tokenizer.json")) else None
    return Model(cfg, params, path=path, tokenizer_path=tok)
