"""Pallas block-attention kernels (TPU and GPU, run in the Pallas interpreter on CPU) against the jnp reference,
plus the implementation-selection API and the benchmark's smoke mode.

Tolerances: float32 inputs agree with the reference within 1e-5 (abs and rel); bfloat16 inputs within
BF16_TOL = 2e-2 abs + 2e-2 rel (the kernels feed the *unnormalised* probabilities to the PV matmul in bf16, the
reference the normalised ones; outputs are O(1), where one bf16 ulp is 2^-8 to 2^-7).
"""

import functools
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_attention import api, pallas_gpu, pallas_mgpu, pallas_tpu, reference

# The Mosaic GPU kernel in the Mosaic GPU interpreter takes seconds per case: on a CPU its share of the sweeps below
# is marked slow (tests/test_kernels_mgpu.py keeps a fast interpreter check in the default suite); with
# DLLM_KERNEL_HW=1 (compiled on the GPU) it runs by default.
MGPU = pytest.param("pallas_mgpu", marks=() if os.environ.get("DLLM_KERNEL_HW") == "1" else pytest.mark.slow)
KERNELS = ("pallas_tpu", "pallas_gpu", MGPU)
F32_TOL = 1e-5
BF16_TOL = 2e-2


def make_case(B, T, S, H, K, D, offset, dtype, *, left_pad=(), dead_rows=(), valid_end=None, seed=0):
    """Random q/k/v; key_valid with a left-padding prefix per row (left_pad[b]), rows in `dead_rows` fully
    masked, keys at >= valid_end[b] (unused buffer tail) masked; queries at offset + arange(T)."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
               for shape in ((B, T, H, D), (B, S, K, D), (B, S, K, D)))
    pos = np.arange(S)
    kv = np.ones((B, S), bool)
    for b, n in enumerate(left_pad):
        kv[b, :n] = False
    for b in dead_rows:
        kv[b] = False
    if valid_end is not None:
        for b, e in enumerate(valid_end):
            kv[b, pos >= e] = False
    q_index = np.broadcast_to(offset + np.arange(T, dtype=np.int32), (B, T))
    return q, k, v, jnp.asarray(kv), jnp.asarray(q_index)


@functools.partial(jax.jit, static_argnames=("block_size", "scale"))
def ref_attention(q, k, v, key_valid, q_index, block_size=0, scale=None):
    return reference.block_attention(q, k, v, key_valid, q_index, block_size=block_size, scale=scale)


def check(out, want, dtype):
    assert out.shape == want.shape and out.dtype == want.dtype
    o = np.asarray(out.astype(jnp.float32))
    w = np.asarray(want.astype(jnp.float32))
    assert np.all(np.isfinite(o))
    tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
    np.testing.assert_allclose(o, w, atol=tol, rtol=tol)


# (B, T, S, H, K, D, block_size, offset, dtype, mask kwargs): a representative sweep, not the cross product.
# S is never a multiple of the kernels' key tiles except in the last aligned cases; G = H / K is 1 or 4.
CASES = [
    # decode-like single query, MHA, D=64, one left-padded row
    pytest.param(1, 1, 200, 4, 4, 64, 0, 150, jnp.float32, dict(left_pad=(7,)), id="T1-mha-d64"),
    # window of 32 in the middle of a 300-key cache, GQA 4, block-causal, D=128, second row fully masked
    pytest.param(2, 32, 300, 8, 2, 128, 32, 100, jnp.float32, dict(left_pad=(5,), dead_rows=(1,)),
                 id="T32-gqa4-causal-d128-deadrow"),
    # batch 4, window 64 from the start, GQA 4, block-causal 16, left padding longer than a block
    # (queries of the first blocks see no key at all -> zero rows), unused tail
    pytest.param(4, 64, 700, 4, 1, 64, 16, 0, jnp.float32,
                 dict(left_pad=(0, 20, 3, 40), valid_end=(700, 650, 64, 700)), id="B4-T64-gqa4-causal-d64"),
    # odd window, odd cache length, MHA, D=128, block-causal 8
    pytest.param(3, 17, 513, 8, 8, 128, 8, 400, jnp.float32, dict(left_pad=(0, 9, 130)), id="T17-S513-causal8"),
    # window ending exactly at the end of the cache, bidirectional, GQA 4, D=64
    pytest.param(2, 48, 256, 8, 2, 64, 0, 208, jnp.float32, dict(left_pad=(11, 0)), id="T48-aligned-bidir"),
    # full-sequence forward (T == S), block-causal with a left-padded row
    pytest.param(2, 40, 40, 4, 1, 64, 8, 0, jnp.float32, dict(left_pad=(0, 13)), id="full-T40-causal"),
    # bf16
    pytest.param(2, 32, 300, 8, 2, 128, 32, 100, jnp.bfloat16, dict(left_pad=(5,), dead_rows=(1,)),
                 id="bf16-T32-gqa4-causal-d128"),
    pytest.param(3, 64, 1000, 4, 4, 64, 0, 500, jnp.bfloat16, dict(left_pad=(0, 100, 999)),
                 id="bf16-T64-mha-d64-bidir"),
]


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("B,T,S,H,K,D,block_size,offset,dtype,masks", CASES)
def test_kernel_matches_reference(kernel_interpret, impl, B, T, S, H, K, D, block_size, offset, dtype, masks):
    interp = kernel_interpret(impl)
    q, k, v, kv, qi = make_case(B, T, S, H, K, D, offset, dtype, **masks)
    want = ref_attention(q, k, v, kv, qi, block_size=block_size)
    fn = jax.jit(lambda *a: api.block_attention(*a, block_size=block_size, implementation=impl, interpret=interp))
    out = fn(q, k, v, kv, qi)
    check(out, want, dtype)
    for b in masks.get("dead_rows", ()):
        assert np.all(np.asarray(out[b].astype(jnp.float32)) == 0.0)


@pytest.mark.parametrize("impl", KERNELS)
def test_small_tiles_many_query_and_key_tiles(kernel_interpret, impl):
    """Small tiles: several query tiles with different block-causal horizons, several key tiles, a valid key range
    in the middle of the buffer (the [lo, hi) tile skipping on both sides), custom scale."""
    B, T, S, H, K, D = 2, 40, 700, 4, 1, 64
    q, k, v, kv, qi = make_case(B, T, S, H, K, D, 300, jnp.float32, left_pad=(150, 290), valid_end=(600, 700))
    want = ref_attention(q, k, v, kv, qi, block_size=16, scale=0.05)
    interp = kernel_interpret(impl)
    if impl == "pallas_tpu":
        fn = pallas_tpu.make(interpret=interp, block_q=16, block_k=128)
    elif impl == "pallas_mgpu":
        fn = pallas_mgpu.make(interpret=interp, block_k=64)     # query tiles are always 64 rows
    else:
        fn = pallas_gpu.make(interpret=interp, block_q=16, block_k=32)
    out = jax.jit(lambda *a: fn(*a, block_size=16, scale=0.05))(q, k, v, kv, qi)
    check(out, want, jnp.float32)


def test_tpu_kernel_in_tpu_faithful_interpreter():
    """The Mosaic-faithful interpreter (simulated DMAs/VMEM, out-of-bounds checks) on a GQA block-causal case."""
    from jax.experimental.pallas import tpu as pltpu

    q, k, v, kv, qi = make_case(2, 32, 300, 8, 2, 128, 100, jnp.float32, left_pad=(5,), dead_rows=(1,))
    out = pallas_tpu.block_attention(q, k, v, kv, qi, block_size=32, interpret=pltpu.InterpretParams())
    check(out, ref_attention(q, k, v, kv, qi, block_size=32), jnp.float32)


@pytest.mark.parametrize("impl", KERNELS)
def test_zero_rows_and_no_nan(kernel_interpret, impl):
    """A row with every key masked, and queries whose block-causal horizon ends before the first valid key,
    give exact zeros in every kernel."""
    q, k, v, kv, qi = make_case(2, 16, 128, 2, 2, 64, 0, jnp.float32, left_pad=(40,), dead_rows=(1,))
    out = np.asarray(api.block_attention(q, k, v, kv, qi, block_size=8, implementation=impl,
                                         interpret=kernel_interpret(impl)))
    assert np.all(np.isfinite(out))
    assert np.all(out[1] == 0.0)          # dead row
    assert np.all(out[0, :16] == 0.0)     # queries 0..15 -> blocks 0, 1 end at key 16 < 40


def test_tile_choice():
    assert pallas_tpu.choose_tiles(1, 300, jnp.float32) == (8, 8, 384, 384)
    assert pallas_tpu.choose_tiles(1, 640, jnp.float32) == (8, 8, 128, 640)
    assert pallas_tpu.choose_tiles(1, 1100, jnp.float32) == (8, 8, 512, 1536)
    assert pallas_tpu.choose_tiles(32, 4096, jnp.bfloat16) == (32, 32, 512, 4096)
    assert pallas_tpu.choose_tiles(4096, 4096, jnp.bfloat16) == (128, 4096, 512, 4096)
    assert pallas_tpu.choose_tiles(17, 513, jnp.bfloat16)[:2] == (32, 32)
    assert pallas_gpu.choose_tiles(1, 300) == (16, 16, 64, 320)
    assert pallas_gpu.choose_tiles(32, 4096) == (32, 32, 64, 4096)
    with pytest.raises(ValueError, match="powers of two"):
        pallas_gpu.choose_tiles(32, 256, block_q=48)
    q, k, v, kv, qi = make_case(1, 4, 64, 2, 2, 48, 0, jnp.float32)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        pallas_gpu.block_attention(q, k, v, kv, qi, interpret=True)


# --- the real-backend lowering (Pallas -> Mosaic TPU / Triton IR) runs in Python, so it is checked here too ---

LOWER_SHAPES = [
    pytest.param(1, 32, 4096, 32, 32, 128, 0, jnp.bfloat16, id="llada8b-window32"),
    pytest.param(2, 256, 256, 32, 32, 128, 32, jnp.bfloat16, id="llada8b-full-causal"),
    pytest.param(2, 1, 300, 8, 2, 64, 16, jnp.float32, id="gqa4-d64-f32"),
]


@pytest.mark.parametrize("impl,platform", [("pallas_tpu", "tpu"), ("pallas_gpu", "cuda"), ("pallas_mgpu", "cuda")])
@pytest.mark.parametrize("B,T,S,H,K,D,block_size,dtype", LOWER_SHAPES)
def test_kernel_lowers_for_real_backend(impl, platform, B, T, S, H, K, D, block_size, dtype):
    mod = {"pallas_tpu": pallas_tpu, "pallas_gpu": pallas_gpu, "pallas_mgpu": pallas_mgpu}[impl]
    sd = jax.ShapeDtypeStruct
    args = (sd((B, T, H, D), dtype), sd((B, S, K, D), dtype), sd((B, S, K, D), dtype), sd((B, S), jnp.bool_),
            sd((B, T), jnp.int32))
    fn = jax.jit(lambda *a: mod.block_attention(*a, block_size=block_size))
    text = fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert {"pallas_tpu": "tpu_custom_call", "pallas_gpu": "triton", "pallas_mgpu": "mosaic_gpu"}[impl] in text


# --- implementation selection ---

@pytest.fixture
def fresh_api(monkeypatch):
    monkeypatch.setattr(api, "_cache", {})
    monkeypatch.setattr(api, "_warned", set())
    return api


@pytest.fixture
def cpu_backend():
    """The API tests below describe a CPU-only machine (what resolves, what falls back); on an accelerator
    (benchmarks/accelerator_session.sh) they are skipped with this reason, the compiled-kernel tests run instead."""
    if jax.default_backend() != "cpu":
        pytest.skip(f"describes a CPU-only machine; this backend is {jax.default_backend()}")


def test_api_reference_and_unknown(fresh_api, cpu_backend):
    assert fresh_api.resolve("reference") is reference.block_attention
    with pytest.raises(ValueError, match="unknown attention implementation"):
        fresh_api.resolve("flash")
    assert set(fresh_api.available_implementations()) == {"reference", "pallas_tpu", "pallas_gpu", "pallas_mgpu",
                                                          "auto"}
    assert fresh_api.runnable_implementations() == ("reference", "auto")
    assert fresh_api.runnable_implementations(interpret=True) == ("reference", "pallas_tpu", "pallas_gpu",
                                                                  "pallas_mgpu", "auto")


@pytest.mark.parametrize("impl,hw", [("pallas_tpu", "TPU"), ("pallas_gpu", "GPU"), ("pallas_mgpu", "GPU")])
def test_api_named_kernel_unavailable_raises(fresh_api, cpu_backend, impl, hw):
    with pytest.raises(fresh_api.KernelUnavailableError, match=f"needs a {hw}.*interpret=True"):
        fresh_api.resolve(impl)
    q, k, v, kv, qi = make_case(1, 2, 16, 2, 2, 64, 0, jnp.float32)
    with pytest.raises(fresh_api.KernelUnavailableError):
        fresh_api.block_attention(q, k, v, kv, qi, implementation=impl)


def test_api_resolved_callable_is_cached(fresh_api):
    a = fresh_api.resolve("pallas_tpu", interpret=True)
    assert fresh_api.resolve("pallas_tpu", interpret=True) is a
    assert fresh_api.resolve("pallas_gpu", interpret=True) is not a
    m = fresh_api.resolve("pallas_mgpu", interpret=True)
    assert m.func is pallas_mgpu.block_attention and fresh_api.resolve("pallas_mgpu", interpret=True) is m


def test_api_auto_on_cpu_falls_back_with_one_warning(fresh_api, cpu_backend):
    with pytest.warns(RuntimeWarning, match="no Pallas kernel for backend 'cpu'"):
        fn = fresh_api.resolve("auto")
    assert fn is reference.block_attention
    fresh_api._cache.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # the same reason is not warned twice
        assert fresh_api.resolve("auto") is reference.block_attention


def test_api_auto_picks_kernel_when_probe_passes(fresh_api, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    q, k, v, kv, qi = make_case(1, 8, 64, 2, 1, 64, 4, jnp.float32, left_pad=(3,))

    @jax.jit
    def f(*a):   # resolution (and its eager probe) happens while this jit is being traced
        return fresh_api.block_attention(*a, block_size=8, implementation="auto", interpret=True)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = f(q, k, v, kv, qi)
    assert fresh_api._cache[("auto", True, "tpu")].func is pallas_tpu.block_attention
    check(out, ref_attention(q, k, v, kv, qi, block_size=8), jnp.float32)


def test_api_auto_falls_back_when_probe_fails(fresh_api, cpu_backend, monkeypatch):
    # Pretend to be on a GPU: both kernels resolve, but compiling them for real fails on this CPU: Mosaic GPU is
    # tried first, then Triton, then the reference, each failure with its own warning.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.warns(RuntimeWarning) as record:
        fn = fresh_api.resolve("auto")
    assert fn is reference.block_attention
    msgs = [str(w.message) for w in record]
    assert any(m.startswith("attention 'auto': pallas_mgpu unavailable") and m.endswith("trying pallas_gpu")
               for m in msgs), msgs
    assert any(m.startswith("attention 'auto': pallas_gpu unavailable") and m.endswith("using the jnp reference")
               for m in msgs), msgs


def test_api_auto_on_gpu_prefers_mosaic_then_triton(fresh_api, monkeypatch):
    """The GPU order: pallas_mgpu when its probe passes; pallas_gpu when only pallas_mgpu's fails (probes stubbed)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(fresh_api, "_probe", lambda fn: None)
    assert fresh_api.resolve("auto").func is pallas_mgpu.block_attention

    def probe(fn):
        if fn.func is pallas_mgpu.block_attention:
            raise RuntimeError("no Mosaic GPU here")

    fresh_api._cache.clear()
    monkeypatch.setattr(fresh_api, "_probe", probe)
    with pytest.warns(RuntimeWarning, match="pallas_mgpu unavailable .*no Mosaic GPU here.*trying pallas_gpu"):
        assert fresh_api.resolve("auto").func is pallas_gpu.block_attention


# --- model integration and benchmark smoke run ---

@pytest.mark.parametrize("impl", KERNELS)
def test_model_forward_with_kernel(kernel_interpret, llada_model, impl):
    """The tiny LLaDA forward (left-padded batch) gives the same logits through either kernel."""
    from dllm_jax.models import transformer

    cfg = llada_model.cfg
    ids = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.vocab_size)
    valid = jnp.arange(24)[None, :] >= jnp.array([[0], [5]])
    want, _ = transformer.forward(llada_model.params, cfg, ids, None, valid)
    got, _ = transformer.forward(llada_model.params, cfg.replace(attention_impl=impl), ids, None, valid,
                                 interpret=kernel_interpret(impl))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)


def test_benchmark_quick_smoke(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    try:
        import bench_attention
    finally:
        sys.path.pop(0)
    out = tmp_path / "attention.md"
    rows = bench_attention.main(["--quick", "--out", str(out)])
    assert {r["impl"] for r in rows} == {"reference", "pallas_tpu", "pallas_gpu", "pallas_mgpu", "sdpa_xla"}
    # the jax.nn.dot_product_attention baseline gets the same (block-causal, padded) masks as the reference
    assert all(r["err"] < 2e-2 for r in rows if r["impl"] == "sdpa_xla")
    assert all("sec" in r for r in rows), [r.get("error") for r in rows]
    assert all(r["err"] < BF16_TOL for r in rows if r["impl"] != "reference")
    text = out.read_text()
    assert "| shape | impl | ms | TFLOP/s" in text and "pallas_gpu" in text and "pallas_mgpu" in text
