"""`Model` (config + params pytree) and `load` for HF and converted checkpoints."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from dllm_jax.models.config import ConfigError, ModelConfig, config_from_hf, read_hf_config
from dllm_jax.models import transformer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "fp32": jnp.float32, "bf16": jnp.bfloat16}
CONVERTED_CONFIG = "dllm_jax_config.json"


def resolve_dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type if dtype is not None else jnp.float32


@dataclasses.dataclass
class Model:
    """A model: static config plus a params pytree (pass `model.params` to jitted functions)."""

    cfg: ModelConfig
    params: dict
    path: str | None = None
    tokenizer_path: str | None = None

    @property
    def mask_id(self) -> int:
        return self.cfg.mask_token_id

    def logits(self, input_ids, attention_mask=None, positions=None, prefix_len=None):
        """Raw logits [B, T, V] (float32) of a full forward. Dream logits are returned before the shift.
        prefix_len: the prompt length, for block-causal models whose prompt is one block (`with_block_causal`)."""
        ids = jnp.asarray(input_ids, jnp.int32)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(ids.shape)}")
        if int(jnp.max(ids)) >= self.cfg.vocab_size or int(jnp.min(ids)) < 0:
            raise ValueError(f"input_ids must lie in [0, {self.cfg.vocab_size})")
        key_valid = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool).reshape(ids.shape)
        if positions is not None:
            positions = jnp.asarray(positions, jnp.int32).reshape(ids.shape)
        out, _ = transformer.forward(self.params, self.cfg, ids, positions, key_valid, prefix_len=prefix_len)
        return out

    def with_attention(self, impl: str, interpret: bool = False) -> "Model":
        """The same model with another attention implementation ("reference", "pallas_tpu", "pallas_gpu",
        "pallas_mgpu", "auto"); interpret=True runs a Pallas kernel in the interpreter (any backend; slow, for
        testing)."""
        from pallas_kernels.block_attention import api

        if impl not in api.available_implementations():
            raise ValueError(f"unknown attention implementation {impl!r}; expected one of "
                             f"{api.available_implementations()}")
        if impl not in ("reference", "auto") and not interpret:
            api.resolve(impl, False)  # fail now, with the kernel's own message, not inside jit
        return dataclasses.replace(self, cfg=self.cfg.replace(attention_impl=impl, attention_interpret=interpret))


    def with_block_causal(self, block_length: int, whole_prompt: bool = True) -> "Model":
        """The same weights run with block-causal attention over blocks of `block_length` canvas positions (each block
        sees the earlier blocks and itself), as block-diffusion checkpoints (D2F, Fast-dLLM v2, SDAR) are trained;
        0 = bidirectional again. whole_prompt (default, D2F's mask): the prompt is one block, seen whole by every
        query and seeing only itself; False: the prompt is split into blocks like the generation."""
        if int(block_length) < 0:
            raise ValueError(f"block_length must be >= 0, got {block_length}")
        return dataclasses.replace(self, cfg=self.cfg.replace(
            block_causal=int(block_length), block_causal_prompt=bool(whole_prompt) and int(block_length) > 0))


def _cast_tree(params, dtype):
    from dllm_jax.quant import cast_params

    return cast_params(params, dtype)  # jnp.asarray(leaf, dtype); int8 QArray leaves keep their int8/f32 arrays


def load(path: str, dtype="float32", mesh=None, attention: str = "reference", quantize=None, lora=None) -> Model:
    """Load a model from an HF checkpoint dir (config.json + *.safetensors) or a converted dllm-jax dir.

    quantize: None, "int8" (linear layer weights int8) or "int8-all" (also embedding + LM head); see
    dllm_jax.quant. `dtype` stays the compute dtype and that of the unquantized leaves. A converted checkpoint
    written with `--quantize` restores as int8 whatever `quantize` says. lora: a PEFT LoRA adapter directory merged
    into the HF checkpoint's weights while they are read (dllm_jax.lora; e.g. a D2F adapter on LLaDA-Instruct)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist")
    path = os.fspath(path)
    jdtype = resolve_dtype(dtype)
    from dllm_jax import quant

    qcfg = quant.resolve(quantize)  # a bad value fails here, before anything is read
    adapter = None
    if lora is not None:
        from dllm_jax.lora import read_adapter

        if os.path.isfile(os.path.join(path, CONVERTED_CONFIG)):
            raise ConfigError(f"{path!r} is a converted checkpoint: merge a LoRA adapter while converting "
                              "(dllm-jax convert SRC DST --lora ADAPTER) or load the HF checkpoint with lora=")
        adapter = read_adapter(lora)
    if os.path.isfile(os.path.join(path, CONVERTED_CONFIG)):
        from dllm_jax import checkpoint

        model = checkpoint.restore_converted(path, dtype=jdtype, mesh=mesh, quantize=qcfg)
    elif os.path.isfile(os.path.join(path, "config.json")):
        from dllm_jax.hf_weights import load_hf_params

        cfg = config_from_hf(read_hf_config(path), where=os.path.join(path, "config.json"))
        np_dtype = np.float32 if jdtype == jnp.float32 else jnp.bfloat16
        # with quantize, each tensor is quantized on the host as it is read: the float model is never built
        params = load_hf_params(path, cfg, dtype=np_dtype, quantize=qcfg, lora=adapter)
        tok = path if any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")) \
            else None
        model = Model(cfg, _cast_tree(params, jdtype), path=path, tokenizer_path=tok)
        if mesh is not None:
            from dllm_jax import sharding

            model = dataclasses.replace(model, params=sharding.shard_params(model.params, model.cfg, mesh))
    else:
        raise ConfigError(f"{path!r} is neither an HF checkpoint (config.json + *.safetensors) nor a converted "
                          f"dllm-jax checkpoint ({CONVERTED_CONFIG} + params/)")
    if attention != "reference":
        model = model.with_attention(attention)
    if qcfg is not None:
        model = quant.quantize_model(model, qcfg)  # a no-op when the loader already quantized
    return model
