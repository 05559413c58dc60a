"""The converted dllm-jax checkpoint format: `dllm_jax_config.json` + an orbax `params/` directory.

dllm_jax_config.json = {"format_version": 1, "model": ModelConfig.to_dict(), "dtype": "float32"|"bfloat16", ...,
                        optional "quantization": dllm_jax.quant.QuantConfig.to_meta()}
params/ = orbax StandardCheckpointer save of the params pytree (see dllm_jax.models.transformer); an int8 leaf
          (dllm_jax.quant.QArray) is stored as {"q": int8, "scale": float32} under the leaf's name.
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
    """Write a converted checkpoint into the (existing, empty) directory `dst` (int8 params record their
    `quantization`, so they restore as int8)."""
    from dllm_jax import quant

    q = quant.quantization_of(params)
    if q is not None:
        extra.setdefault("quantization", q.to_meta())
    save_params(dst, params)
    write_config(dst, cfg, dtype_name, **extra)


def abstract_params(cfg: ModelConfig, dtype, shardings=None, quantization=None):
    """ShapeDtypeStruct tree of the params (the orbax restore target). quantization ("int8", "int8-all", a
    QuantConfig or None): the quantized leaves become `QArray(int8 values, float32 scales)` shapes, as written by
    `convert --quantize`. shardings: a tree with the same leaves (`dllm_jax.quant.param_shardings`)."""
    from dllm_jax import quant

    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), dtype=dtype))
    shapes = quant.abstract_params(shapes, quantization, dtype)
    if shardings is None:
        return shapes
    leaves, treedef = jax.tree.flatten(shapes)
    sh_leaves = jax.tree.leaves(shardings)
    if len(sh_leaves) != len(leaves):
        raise ValueError(f"shardings have {len(sh_leaves)} leaves, the params {len(leaves)}")
    return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)
                                        for s, sh in zip(leaves, sh_leaves)])


def _host_device():
    """The CPU device when the default backend is an accelerator (None on a CPU-only run or without a CPU)."""
    if jax.default_backend() == "cpu":
        return None
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return None


def restore_converted(path: str, dtype=jnp.float32, mesh=None, quantize=None) -> Model:
    """Restore a converted checkpoint; with a mesh, each array lands directly on its sharding (no host copy).

    A checkpoint written with `--quantize` (its config records `quantization`) restores as int8. `quantize`
    asks for (more) int8 leaves: the float leaves are then restored on the host CPU when the default backend is
    an accelerator, quantized there and only the result placed, so the float model never has to fit the device."""
    import orbax.checkpoint as ocp

    from dllm_jax import quant

    cfg, meta = read_config(path)
    stored = quant.QuantConfig.from_meta(meta.get("quantization"))
    want = quant.resolve(quantize)
    more = want is not None and (stored is None or not stored.covers(want))
    host = _host_device() if more else None
    shardings = None
    if host is not None:
        from jax.sharding import SingleDeviceSharding

        shardings = jax.tree.map(lambda _: SingleDeviceSharding(host), abstract_params(cfg, dtype,
                                                                                        quantization=stored))
    elif mesh is not None:
        shardings = quant.param_shardings(cfg, mesh, stored)
    target = abstract_params(cfg, dtype, shardings, quantization=stored)
    ckptr = ocp.StandardCheckpointer()
    try:
        params = ckptr.restore(os.path.abspath(os.path.join(path, "params")), target)
    except Exception as e:  # noqa: BLE001 - orbax raises many types; name the problem once
        raise ConfigError(f"cannot restore params from {path}/params: {type(e).__name__}: {e}") from None
    finally:
        ckptr.close()
    if more:
        params = quant.quantize_params(params, want if stored is None else want.union(stored))
        if mesh is not None:
            from dllm_jax import sharding

            params = sharding.shard_params(params, cfg, mesh)
        elif host is not None:
            params = jax.device_put(params, jax.devices()[0])
    tok = path if os.path.isfile(os.path.join(path, "tokenizer.json")) else None
    return Model(cfg, params, path=path, tokenizer_path=tok)
