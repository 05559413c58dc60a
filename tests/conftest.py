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

        from pallas_kernels.block_attention.api import required_backend

        need = required_backend(impl)
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
    """Drop every compiled program (dllm-jax's program caches and JAX's own) after each test module. One pytest worker
    compiles several hundred XLA:CPU programs, each mapping dozens to hundreds of memory regions; kept alive, they
    reached Linux's 65,530 maps per process and XLA's compiler aborted the worker (CI, stop 22). Each module compiles
    its own programs anyway."""
    yield
    import gc

    import jax

    from dllm_jax.programs import clear_program_caches

    clear_program_caches()
    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True, scope="session")
def _shared_compilation_cache(tmp_path_factory):
    """JAX's persistent compilation cache in one directory for the whole run, shared by the xdist workers: a program
    that another module or the other worker already compiled (the modules drop their programs, see above) is read
    back instead of compiled again. DLLM_JAX_TEST_XLA_CACHE=0 turns it off (every program compiled, as before)."""
    if os.environ.get("DLLM_JAX_TEST_XLA_CACHE", "1") == "0":
        yield None
        return
    from dllm_jax.utils import enable_compilation_cache

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    yield enable_compilation_cache(str(root / "xla_cache"), min_compile_time_s=0.0)
