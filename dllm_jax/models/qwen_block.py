"""Dense block-diffusion checkpoints on Qwen bodies: config parsing and weight names shared by Fast-dLLM v2
(`models/fastdllm_v2.py`, Qwen2.5) and SDAR (`models/sdar.py`, Qwen3). Both run on the shared body
(`models/transformer.py`): Qwen2 has q/k/v biases; Qwen3 has per-head q/k RMSNorm (`q_norm`/`k_norm`, one [head_dim]
weight shared by all heads, applied before RoPE) and no biases; either may tie the LM head to the embedding.

The attention mask of a block-diffusion forward is an argument of the official forward (Fast-dLLM v2: `block_size`,
default 32; SDAR: the `attention_mask` the generator builds), so `cfg.block_causal` only sets the mask of a plain
`model.logits(ids)` call (the training block size: `bd_size` / `block_size` of config.json); the samplers pass the
mask of every forward themselves (`key_end`, dllm_jax/engine/block_diffusion.py).
"""

from __future__ import annotations

from dllm_jax.models.config import ConfigError, ModelConfig, _need


def weight_table(qkv_bias: bool, qk_norm: bool) -> tuple:
    """(regex on the HF name, params path, transpose?) for a Qwen2/Qwen3 decoder (`model.layers.N...`)."""
    t = [
        (r"model\.embed_tokens\.weight", ("embed",), False),
        (r"model\.norm\.weight", ("final_norm",), False),
        (r"lm_head\.weight", ("lm_head",), True),
        (r"model\.layers\.(\d+)\.input_layernorm\.weight", ("layers", "attn_norm"), False),
        (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", ("layers", "wq"), True),
        (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", ("layers", "wk"), True),
        (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", ("layers", "wv"), True),
        (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", ("layers", "wo"), True),
        (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", ("layers", "mlp_norm"), False),
        (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", ("layers", "w_gate"), True),
        (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", ("layers", "w_up"), True),
        (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", ("layers", "w_down"), True),
    ]
    if qkv_bias:
        t += [(rf"model\.layers\.(\d+)\.self_attn\.{n}_proj\.bias", ("layers", f"b{n}"), False) for n in "qkv"]
    if qk_norm:
        t += [(rf"model\.layers\.(\d+)\.self_attn\.{n}_norm\.weight", ("layers", f"{n}_norm"), False) for n in "qk"]
    return tuple(t)


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """Fast-dLLM v2 (`model_type` Fast_dLLM_Qwen / Fast_dLLM_QwenForCausalLM) or SDAR (`sdar` / SDARForCausalLM)."""
    mt = str(hf.get("model_type", "")).lower()
    arch = set(hf.get("architectures") or ())
    sdar = mt == "sdar" or "SDARForCausalLM" in arch
    if mt == "sdar_moe" or hf.get("num_experts"):
        raise ConfigError(f"{where}: SDAR MoE (SDAR-30B-A3B, model_type 'sdar_moe') is not supported; dense SDAR "
                          "('sdar') and Fast-dLLM v2 ('Fast_dLLM_Qwen') are")
    if hf.get("rope_scaling"):
        raise ConfigError(f"{where}: rope_scaling {hf['rope_scaling']!r} is not supported (the released Fast-dLLM v2 "
                          "and SDAR checkpoints use plain RoPE)")
    if hf.get("use_sliding_window"):
        raise ConfigError(f"{where}: use_sliding_window=true is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act {hf.get('hidden_act')!r} is not supported (expected 'silu')")
    d = int(_need(hf, "hidden_size", where))
    nh = int(_need(hf, "num_attention_heads", where))
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    if sdar:
        family, mask_default, eos_default, train_block = "sdar", 151669, 151643, hf.get("block_size", 4)
        qkv_bias, qk_norm, shift = bool(hf.get("attention_bias", False)), True, False
    else:
        family, mask_default, eos_default, train_block = "fastdllm_v2", 151665, 151645, hf.get("bd_size", 32)
        qkv_bias, qk_norm, shift = True, False, True
    eos = int(eos if eos is not None else eos_default)
    pad = hf.get("pad_token_id")
    return ModelConfig(
        family=family,
        vocab_size=int(_need(hf, "vocab_size", where)),
        d_model=d,
        n_layers=int(_need(hf, "num_hidden_layers", where)),
        n_heads=nh,
        n_kv_heads=int(hf.get("num_key_value_heads") or nh),
        head_dim=int(hf.get("head_dim") or d // nh),
        mlp_hidden=int(_need(hf, "intermediate_size", where)),
        rope_theta=float(hf.get("rope_theta", 1e6)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        mask_token_id=int(hf.get("mask_token_id") if hf.get("mask_token_id") is not None else mask_default),
        eos_token_id=eos,
        pad_token_id=int(pad if pad is not None else eos),
        max_seq_len=int(hf.get("max_position_embeddings", 32768)),
        # Fast-dLLM v2 is trained with the causal-LM loss: row i - 1 predicts token i (every sampler shifts)
        logit_shift=shift,
        block_causal=int(train_block or 0),
        extra=(("bos_token_id", hf.get("bos_token_id")), ("train_block_size", int(train_block or 0))),
    )
