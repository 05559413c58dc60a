"""End to end: generate with each Pallas kernel (interpret mode) gives the reference's tokens on golden checkpoints."""

import json
import os
import subprocess
import sys

import pytest

# pallas_mgpu in the Mosaic GPU interpreter: every layer of every step is an interpreted kernel call (minutes on a
# CPU), so slow there; compiled on the GPU (DLLM_KERNEL_HW=1) it runs by default.
MGPU = pytest.param("pallas_mgpu", marks=() if os.environ.get("DLLM_KERNEL_HW") == "1" else pytest.mark.slow)

_CHILD = """
import json, sys
import dllm_jax
from dllm_jax.conformance import run_cases
ckpt, impl, interpret, case = sys.argv[1], sys.argv[2], sys.argv[3] == "1", json.loads(sys.argv[4])
model = dllm_jax.load(ckpt).with_attention(impl, interpret=interpret)
r = run_cases(model, [case])[0]
print(json.dumps({"output": r["output"], "nfe": r["nfe"]}))
"""


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu", MGPU])
@pytest.mark.parametrize("fam,fname,case_id", [
    ("llada", "fastdllm_llada.json", "fastdllm_generate_with_dual_cache_g32_bl8_s32_th0.9"),
    ("dream", "fastdllm_dream.json", "fastdllm_dream_prefixcache_confidence_threshold_g32_bl8_s32_th0.5"),
])
def test_generate_with_kernel_matches_golden(kernel_interpret, fixtures, impl, fam, fname, case_id):
    """Run in a fresh process: in a long-lived xdist worker (after other modules' programs) XLA:CPU's compiler
    segfaulted on these interpreted-kernel programs twice in full runs (they pass in a fresh process every time)."""
    interpret = kernel_interpret(impl)
    case = next(c for c in json.loads((fixtures / fname).read_text())["cases"] if c["id"] == case_id)
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    r = subprocess.run([sys.executable, "-c", _CHILD, str(fixtures / f"{fam}_tiny"), impl, "1" if interpret else "0",
                        json.dumps(case)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["output"] == case["output"] and res["nfe"] == case["nfe_counted"]


def test_named_kernel_unavailable_on_cpu_is_a_clear_error(llada_model):
    import jax

    if jax.default_backend() != "cpu":
        pytest.skip("checks the error on a CPU-only machine")
    from pallas_kernels.block_attention.api import KernelUnavailableError

    with pytest.raises(KernelUnavailableError, match="needs a"):
        llada_model.with_attention("pallas_gpu")
    with pytest.raises(ValueError, match="unknown attention implementation"):
        llada_model.with_attention("flash3")


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu", MGPU])
def test_d2f_block_causal_pipeline_cache_with_kernel(kernel_interpret, llada_model, impl):
    """Block-causal attention with the prompt as one block (clamped query indices) and D2F's cached windows give the
    reference implementation's tokens and NFE through each kernel."""
    import importlib

    import numpy as np

    from dllm_jax.presets import make_schedule

    G = importlib.import_module("dllm_jax.generate")
    prompts = [[31, 8, 250, 64, 2, 19, 88, 140, 7, 7, 53, 120, 36, 9, 211, 45, 3], [5, 6, 7]]
    bc = llada_model.with_block_causal(8)
    sched = make_schedule("d2f", 24, bc.cfg, block_length=8, tau_add=0.3, tau_act=0.6, tau_conf=0.5,
                          attention="block_causal", cache="pipeline", span_blocks=2)
    want = G.generate(bc, prompts, gen_length=24, schedule=sched)
    got = G.generate(bc.with_attention(impl, interpret=kernel_interpret(impl)), prompts, gen_length=24, schedule=sched)
    np.testing.assert_array_equal(got.generated, want.generated)
    np.testing.assert_array_equal(got.nfe, want.nfe)
