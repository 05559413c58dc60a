"""Dream (Dream-v0-Base/Instruct-7B; Qwen2.5 body): GQA, q/k/v biases, untied LM head.

The model returns raw logits; Dream predicts token i+1 at row i, so every sampler shifts the logits right by one
(`dllm_jax.models.transformer.shift_logits`), which the engine applies when `cfg.logit_shift` is set.
"""

from dllm_jax.models.qwen_block import weight_table

FAMILY = "dream"

# Dream's checkpoint is a Qwen2 decoder (q/k/v biases, no q/k norms): the same HF names as Fast-dLLM v2's
WEIGHT_TABLE = weight_table(qkv_bias=True, qk_norm=False)
