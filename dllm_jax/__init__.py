"""dllm-jax: diffusion-LLM inference (LLaDA, Dream) in JAX with composable block schedulers."""

from dllm_jax.model import Model, load  # noqa: F401
from dllm_jax.models.config import ModelConfig  # noqa: F401
from dllm_jax.generate import GenerateOutput, generate  # noqa: F401,E402
from dllm_jax.presets import PRESETS, make_schedule  # noqa: F401,E402
