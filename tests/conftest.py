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
def kernel_interpret():
    """`kernel_interpret(impl)` -> the `interpret=` value for a Pallas kernel test: True (the Pallas interpreter, any
    backend) unless DLLM_KERNEL_HW=1, which compiles the kernels for the attached accelerator instead (run with
    JAX_PLATFORMS=cuda or tpu; benchmarks/accelerator_session.sh). In that mode the kernel for other hardware is
    skipped, with the reason."""
    hw = os.environ.get("DLLM_KERNEL_HW") == "1"

    def choose(impl):
        if not hw:
            return True
        import jax

        need = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}[impl]
        if jax.default_backend() != need:
            pytest.skip(f"DLLM_KERNEL_HW=1: {impl} needs a {need.upper()}; this backend is {jax.default_backend()}")
        return False

    return choose


@pytest.fixture(scope="session")
def llada_model():
    import dllm_jax

    return dllm_jax.load(str(FIXTURES / "llada_tiny"))


@pytest.fixture(scope="session")
def dream_model():
    import dllm_jax

    return dllm_jax.load(str(FIXTURES / "dream_tiny"))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled executables after each test module. One pytest process compiles several hundred XLA:CPU
    programs; keeping them all alive is not needed (each module compiles its own), and XLA:CPU's compiler crashed
    (segfault) twice late in long single-process runs on this 2-core machine."""
    yield
    import jax

    jax.clear_caches()
