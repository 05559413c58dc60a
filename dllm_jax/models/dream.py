"""Dream (Dream-v0-Base/Instruct-7B; Qwen2.5 body): GQA, q/k/v biases, untied LM head.

The model returns raw logits; Dream predicts token i+1 at row i, so every sampler shifts the logits right by one
(`dllm_jax.models.transformer.shift_logits`), which the engine applies when `cfg.logit_shift` is set.
"""

FAMILY = "dream"

WEIGHT_TABLE = (
    (r"model\.embed_tokens\.weight", ("embed",), False),
    (r"model\.norm\.weight", ("final_norm",), False),
    (r"lm_head\.weight", ("lm_head",), True),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", ("layers", "attn_norm"), False),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", ("layers", "wq"), True),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", ("layers", "wk"), True),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", ("layers", "wv"), True),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.bias", ("layers", "bq"), False),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.bias", ("layers", "bk"), False),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.bias", ("layers", "bv"), False),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", ("layers", "wo"), True),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", ("layers", "mlp_norm"), False),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", ("layers", "w_gate"), True),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", ("layers", "w_up"), True),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", ("layers", "w_down"), True),
)
