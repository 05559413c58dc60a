import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import pathlib  # noqa: E402

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures():
    return FIXTURES


@pytest.fixture(scope="session")
def llada_model():
    import dllm_jax

    return dllm_jax.load(str(FIXTURES / "llada_tiny"))


@pytest.fixture(scope="session")
def dream_model():
    import dllm_jax

    return dllm_jax.load(str(FIXTURES / "dream_tiny"))
