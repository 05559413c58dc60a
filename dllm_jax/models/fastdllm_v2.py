"""Fast-dLLM v2 (Efficient-Large-Model/Fast_dLLM_v2_1.5B / _7B; NVlabs/Fast-dLLM `v2/`): a Qwen2.5 body trained for
block diffusion (block-causal attention over `bd_size` 32 blocks), q/k/v biases, logits shifted like a causal LM
(row i - 1 predicts token i). The 1.5B model ties its LM head to the embedding (no `lm_head.weight`).

Samplers: presets `fastdllm_v2` (hub `generate`), `fastdllm_v2_batch` (`batch_sample`), `fastdllm_v2_vis`
(`mdm_sample_with_visualization`), see dllm_jax/presets_block.py.
"""

from dllm_jax.models.qwen_block import weight_table

FAMILY = "fastdllm_v2"
WEIGHT_TABLE = weight_table(qkv_bias=True, qk_norm=False)
DEFAULT_PRESET = "fastdllm_v2"  # `dllm-jax generate --model DIR` without --schedule
PRESETS = ("fastdllm_v2", "fastdllm_v2_batch", "fastdllm_v2_vis")  # made for this family (`dllm-jax presets`)
