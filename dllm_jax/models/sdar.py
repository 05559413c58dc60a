"""SDAR (JetLM/SDAR-1.7B/4B/8B-Chat; TraDo builds on it): a Qwen3 body trained for block diffusion (block-causal
attention over `block_size` 4 blocks): per-head q/k RMSNorm before RoPE, no biases, head_dim from config.json,
logits not shifted (row i predicts token i).

Samplers: presets `sdar` (generate.py `block_diffusion_generate`) and `sdar_eval` (the Hugging Face evaluation
generator), see dllm_jax/presets_block.py.
"""

from dllm_jax.models.qwen_block import weight_table

FAMILY = "sdar"
# bias names listed for attention_bias=true configs; without it a checkpoint holding biases is reported as unexpected
WEIGHT_TABLE = weight_table(qkv_bias=True, qk_norm=True)
DEFAULT_PRESET = "sdar_eval"  # `dllm-jax generate --model DIR` without --schedule
PRESETS = ("sdar_eval", "sdar")  # made for this family (`dllm-jax presets`)
