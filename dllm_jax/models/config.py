"""Model configuration shared by every family: a frozen, hashable dataclass (a static jit argument)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any


class ConfigError(ValueError):
    """A checkpoint's config.json cannot be turned into a model configuration."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str  # "llada" | "dream"
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_hidden: int
    rope_theta: float
    norm_eps: float
    qkv_bias: bool
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int
    max_seq_len: int
    # Dream predicts token i+1 at row i: samplers shift logits right by one (see `shift_logits`).
    logit_shift: bool = False
    # Block-causal attention (q_block >= k_block) for block-diffusion checkpoints; 0 = bidirectional.
    block_causal: int = 0
    # With block_causal: the prompt (the first `prefix_len` canvas positions handed to the forward) is ONE block, seen
    # whole by every query and seeing only itself, as D2F trains and decodes (its `create_full_block_attention_mask`);
    # False splits the prompt into blocks of `block_causal` like the rest of the canvas.
    block_causal_prompt: bool = False
    # Attention implementation name, resolved by pallas_kernels.block_attention.api.
    attention_impl: str = "reference"
    attention_interpret: bool = False  # run a Pallas kernel in the interpreter (CPU testing)
    extra: tuple = ()  # (key, value) pairs kept for round trips (e.g. bos/eot ids)
    # tie_word_embeddings: no lm_head leaf, the head is embed.T (Fast-dLLM v2 1.5B)
    tie_embeddings: bool = False
    # --- LLaDA 2.x (family "llada2_moe", dllm_jax/models/llada2_moe.py); the defaults describe the dense families ---
    qk_norm: bool = False  # per-head RMSNorm of q and k (weight [head_dim]) before RoPE
    rope_dim: int = 0  # RoPE on the first rope_dim dims of each head (partial rotary); 0 = the whole head
    # How a block mask enters attention: "hard" = keys of later blocks are excluded; "soft01" = LLaDA2.1 `generate`'s
    # 0/1 mask used as an additive bias (allowed keys +1, nothing excluded; a quirk of the official code)
    block_mask_mode: str = "hard"
    n_experts: int = 0  # routed experts per MoE layer (0 = dense model)
    n_experts_per_tok: int = 0  # top-k
    moe_hidden: int = 0  # intermediate size of one routed expert
    n_shared_experts: int = 0  # the shared expert's width is moe_hidden * n_shared_experts
    n_group: int = 1  # group-limited routing: experts in n_group contiguous groups, the topk_group best kept
    topk_group: int = 1
    routed_scaling: float = 1.0  # routed_scaling_factor
    first_dense_layers: int = 0  # first_k_dense_replace: layers [0, k) use the dense MLP (mlp_hidden)
    moe_impl: str = "auto"  # expert compute: "auto" | "ragged" | "segment" | "gather" | "dense" (llada2_moe.py)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.extra).get(key, default)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["extra"] = [list(p) for p in self.extra]
        return d

    @staticmethod
    def from_dict(d: dict) -> "ModelConfig":
        d = dict(d)
        d["extra"] = tuple(tuple(p) for p in d.get("extra", ()))
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        return ModelConfig(**{k: v for k, v in d.items() if k in names})


def read_hf_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"missing config: {cfg_path} does not exist (expected a Hugging Face config.json)")
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_path} is not valid JSON: {e}") from None


def _need(hf: dict, key: str, where: str):
    if key not in hf:
        raise ConfigError(f"{where}: config.json has no '{key}'")
    return hf[key]


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """Map a Hugging Face config (LLaDA or Dream/Qwen2) to ModelConfig."""
    mt = str(hf.get("model_type", "")).lower()
    if mt == "llada":
        d = _need(hf, "d_model", where)
        nh = _need(hf, "n_heads", where)
        nkv = hf.get("n_kv_heads") or nh
        if hf.get("multi_query_attention"):
            nkv = 1
        if hf.get("weight_tying"):
            raise ConfigError(f"{where}: LLaDA with weight_tying=true is not supported (LLaDA-8B is untied)")
        if hf.get("block_type", "llama") != "llama":
            raise ConfigError(f"{where}: LLaDA block_type {hf.get('block_type')!r} is not supported (expected 'llama')")
        vocab = hf.get("embedding_size") or _need(hf, "vocab_size", where)
        mask_id = hf.get("mask_token_id", 126336)
        eos = hf.get("eos_token_id", 126081)
        return ModelConfig(
            family="llada",
            vocab_size=int(vocab),
            d_model=int(d),
            n_layers=int(_need(hf, "n_layers", where)),
            n_heads=int(nh),
            n_kv_heads=int(nkv),
            head_dim=int(d) // int(nh),
            mlp_hidden=int(hf.get("mlp_hidden_size") or hf.get("mlp_ratio", 4) * d),
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            qkv_bias=bool(hf.get("include_qkv_bias", False) or hf.get("include_bias", False)),
            mask_token_id=int(mask_id),
            eos_token_id=int(eos),
            pad_token_id=int(hf.get("pad_token_id", eos)),
            max_seq_len=int(hf.get("max_sequence_length", 4096)),
            logit_shift=False,
            extra=(("bos_token_id", hf.get("bos_token_id", 126080)), ("eot_token_id", hf.get("eot_token_id", 126348))),
        )
    if mt in ("dream", "qwen2"):
        d = _need(hf, "hidden_size", where)
        nh = _need(hf, "num_attention_heads", where)
        if hf.get("tie_word_embeddings"):
            raise ConfigError(f"{where}: Dream with tie_word_embeddings=true is not supported")
        eos = hf.get("eos_token_id", 151643)
        return ModelConfig(
            family="dream",
            vocab_size=int(_need(hf, "vocab_size", where)),
            d_model=int(d),
            n_layers=int(_need(hf, "num_hidden_layers", where)),
            n_heads=int(nh),
            n_kv_heads=int(hf.get("num_key_value_heads") or nh),
            head_dim=int(hf.get("head_dim") or int(d) // int(nh)),
            mlp_hidden=int(_need(hf, "intermediate_size", where)),
            rope_theta=float(hf.get("rope_theta", 1e6)),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            qkv_bias=True,
            mask_token_id=int(hf.get("mask_token_id", 151666)),
            eos_token_id=int(eos),
            pad_token_id=int(hf.get("pad_token_id", eos) if hf.get("pad_token_id") is not None else eos),
            max_seq_len=int(hf.get("max_position_embeddings", 131072)),
            logit_shift=True,
            extra=(("bos_token_id", hf.get("bos_token_id")),),
        )
    if mt in ("fast_dllm_qwen", "sdar", "sdar_moe") or {"Fast_dLLM_QwenForCausalLM", "SDARForCausalLM"} & set(
            hf.get("architectures") or ()):
        from dllm_jax.models.qwen_block import config_from_hf as block_config

        return block_config(hf, where)
    if mt == "llada2_moe" or "LLaDA2MoeModelLM" in (hf.get("architectures") or ()):
        from dllm_jax.models.llada2_moe import config_from_hf as llada2_config

        return llada2_config(hf, where)
    raise ConfigError(
        f"{where}: unknown model_type {hf.get('model_type')!r}; supported: 'llada' (LLaDA), 'Dream'/'qwen2' (Dream), "
        "'llada2_moe' (LLaDA 2.x MoE), 'Fast_dLLM_Qwen' (Fast-dLLM v2), 'sdar' (SDAR)"
    )
