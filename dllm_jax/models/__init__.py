from dllm_jax.models import dream, fastdllm_v2, llada, llada2_moe, sdar
from dllm_jax.models.config import ConfigError, ModelConfig, config_from_hf, read_hf_config  # noqa: F401

FAMILIES = {"llada": llada, "dream": dream, "llada2_moe": llada2_moe, "fastdllm_v2": fastdllm_v2,
            "sdar": sdar}
