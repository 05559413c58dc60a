from dllm_jax.models import dream, llada
from dllm_jax.models.config import ConfigError, ModelConfig, config_from_hf, read_hf_config  # noqa: F401

FAMILIES = {"llada": llada, "dream": dream}
