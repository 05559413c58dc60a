"""dllm_jax.utils: persistent compilation cache, device facts, CI flag."""

import os
import subprocess
import sys
import textwrap

from dllm_jax import utils

SCRIPT = textwrap.dedent("""
    import os, sys
    from dllm_jax.utils import enable_compilation_cache
    path = enable_compilation_cache(sys.argv[1])
    import dllm_jax
    from dllm_jax.presets import make_schedule
    model = dllm_jax.load(sys.argv[2])
    sched = make_schedule("fastdllm", 8, model.cfg, block_length=8, threshold=0.9)
    out = dllm_jax.generate(model, [[1, 2, 3]], gen_length=8, schedule=sched)
    print("TOKENS", out.generated[0].tolist())
""")


def _run(cache, model, env):
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(cache), str(model)], env=env, capture_output=True,
                       text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    return [ln for ln in r.stdout.splitlines() if ln.startswith("TOKENS")]


def test_persistent_cache_is_written_and_reused(tmp_path, fixtures):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    cache = tmp_path / "xla"
    first = _run(cache, fixtures / "llada_tiny", env)
    entries = sorted(os.listdir(cache))
    assert any("generate" in e for e in entries), entries  # the generation program itself is cached
    second = _run(cache, fixtures / "llada_tiny", env)
    assert second == first
    assert sorted(os.listdir(cache)) == entries  # read back, nothing new compiled and written


def test_env_default_dir_and_ci_flag(monkeypatch, tmp_path):
    monkeypatch.setenv(utils.CACHE_ENV, str(tmp_path / "c"))
    assert utils.default_cache_dir() == str(tmp_path / "c")
    for v, want in (("1", True), ("true", True), ("0", False), ("", False)):
        monkeypatch.setenv(utils.CI_ENV, v)
        assert utils.is_ci() is want


def test_describe_devices_says_cpu():
    info = utils.accelerator_info()
    assert info["platform"] == "cpu" and not info["accelerator"]
    assert "Running on the CPU" in utils.describe_devices(info)
