"""The Pallas Mosaic GPU kernel (`pallas_mgpu`) on a CPU: numerics in the Mosaic GPU interpreter and the lowering
for CUDA.

* Interpreter: `interpret=True` maps to the Mosaic GPU interpreter (`plgpu.InterpretParams`, in jax 0.10 the private
  `InterpretGPUParams`), which simulates SMEM, the TMA copies, the barriers and wgmma on the CPU. Small shapes; the
  full sweep of tests/test_kernels.py runs this kernel too but is marked slow on a CPU (minutes in the
  interpreter). With DLLM_KERNEL_HW=1 on a GPU the same tests compile the kernel instead.
* Lowering: `jit(...).trace(...).lower(lowering_platforms=("cuda",))` runs Pallas -> Mosaic GPU in Python, which
  is where wgmma tile shapes, swizzles, TMA box ranks and the SMEM budget are checked. It does not prove the PTX
  compilation or a run on a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_attention import pallas_mgpu
from test_kernels import check, make_case, ref_attention


@pytest.fixture
def interp(kernel_interpret):
    value = kernel_interpret("pallas_mgpu")
    if value:
        try:
            pallas_mgpu.interpret_params(True)
        except NotImplementedError as e:
            pytest.skip(f"no Mosaic GPU interpreter in this jax: {e}")
    return value


# (B, T, S, H, K, D, block_size, offset, dtype, mask kwargs); each case a few seconds in the interpreter
CASES = [
    # no mask, MHA, bidirectional, T and S exact tile multiples
    pytest.param(1, 64, 128, 2, 2, 64, 0, 0, jnp.bfloat16, dict(), id="bf16-nomask-mha"),
    # float32 (bf16x6 wgmmas, single-buffered K/V), GQA 4, block-causal, left padding, a fully masked row, T=17
    # (padded to 64)
    pytest.param(2, 17, 130, 4, 1, 64, 8, 100, jnp.float32, dict(left_pad=(9,), dead_rows=(1,)),
                 id="f32-gqa4-causal-leftpad-deadrow-T17"),
    # head_dim 16 (padded to 64), GQA 2, block-causal from position 0 with a left pad longer than two blocks
    # (those queries see no key: zeros), unused tail, three key tiles with a skipped tail
    pytest.param(2, 20, 150, 4, 2, 16, 8, 0, jnp.bfloat16, dict(left_pad=(0, 30), valid_end=(150, 90)),
                 id="bf16-gqa2-causal-d16-tail"),
]


@pytest.mark.parametrize("B,T,S,H,K,D,block_size,offset,dtype,masks", CASES)
def test_mgpu_matches_reference(interp, B, T, S, H, K, D, block_size, offset, dtype, masks):
    q, k, v, kv, qi = make_case(B, T, S, H, K, D, offset, dtype, **masks)
    want = ref_attention(q, k, v, kv, qi, block_size=block_size)
    out = pallas_mgpu.block_attention(q, k, v, kv, qi, block_size=block_size, interpret=interp)
    check(out, want, dtype)
    o = np.asarray(out.astype(jnp.float32))
    for b in masks.get("dead_rows", ()):
        assert np.all(o[b] == 0.0)
    pad = masks.get("left_pad", (0,))[-1]
    if block_size and offset == 0 and pad >= 2 * block_size:   # queries whose horizon ends before the first key
        assert np.all(o[-1, :pad // block_size * block_size] == 0.0)


def test_mgpu_key_tile_128_and_custom_scale(interp):
    """128-key tiles, several query tiles (T=80 -> two), a valid range in the middle of the buffer."""
    q, k, v, kv, qi = make_case(1, 80, 300, 2, 1, 64, 150, jnp.bfloat16, left_pad=(140,), valid_end=(280,))
    want = ref_attention(q, k, v, kv, qi, block_size=16, scale=0.05)
    out = pallas_mgpu.make(interpret=interp, block_k=128)(q, k, v, kv, qi, block_size=16, scale=0.05)
    check(out, want, jnp.bfloat16)


def test_mgpu_tile_choice_and_errors():
    assert pallas_mgpu.choose_tiles(1, 300) == (64, 64, 64, 320)
    assert pallas_mgpu.choose_tiles(32, 4096, 128) == (64, 64, 128, 4096)
    assert pallas_mgpu.choose_tiles(100, 40, 128) == (64, 128, 64, 64)
    with pytest.raises(ValueError, match="64 or 128"):
        pallas_mgpu.choose_tiles(32, 256, 32)
    with pytest.raises(ValueError, match="float32"):
        pallas_mgpu.choose_tiles(32, 256, 128, jnp.float32)
    assert pallas_mgpu.interpret_params(False) is None
    q, k, v, kv, qi = make_case(1, 4, 64, 2, 2, 64, 0, jnp.float32)
    with pytest.raises(ValueError, match="block-causal attention needs query indices"):
        pallas_mgpu.block_attention(q, k, v, kv, None, block_size=8, interpret=True)


# --- the Mosaic GPU lowering for CUDA, on this CPU ---

LOWER_SHAPES = [
    # the api probe's shape (B=2, T=16, S=256, H=4, K=2, D=128) and its window-32 sibling
    pytest.param(2, 16, 256, 4, 2, 128, 32, jnp.bfloat16, 64, id="probe-T16"),
    pytest.param(2, 32, 256, 4, 2, 128, 32, jnp.bfloat16, 64, id="probe-T32"),
    # LLaDA-8B-like cached window: 32 queries over 1024 keys, 32 heads, 32 kv heads
    pytest.param(1, 32, 1024, 32, 32, 128, 0, jnp.bfloat16, 64, id="llada8b-window32"),
    pytest.param(1, 32, 1024, 32, 32, 128, 0, jnp.bfloat16, 128, id="llada8b-window32-bk128"),
    # engine window widths 64..128 (padded to multiples of 64), block-causal
    pytest.param(2, 96, 1024, 32, 32, 128, 32, jnp.bfloat16, 64, id="window96-causal"),
    pytest.param(2, 128, 4096, 32, 8, 128, 32, jnp.bfloat16, 128, id="window128-gqa4-S4096"),
    pytest.param(2, 256, 256, 32, 32, 128, 32, jnp.bfloat16, 128, id="full-causal"),
    pytest.param(2, 32, 1024, 32, 32, 128, 32, jnp.float32, 64, id="f32-window32"),
    pytest.param(2, 1, 300, 8, 2, 64, 16, jnp.float16, 64, id="f16-T1-d64"),
]


@pytest.mark.parametrize("B,T,S,H,K,D,block_size,dtype,block_k", LOWER_SHAPES)
def test_mgpu_lowers_for_cuda(B, T, S, H, K, D, block_size, dtype, block_k):
    sd = jax.ShapeDtypeStruct
    args = (sd((B, T, H, D), dtype), sd((B, S, K, D), dtype), sd((B, S, K, D), dtype), sd((B, S), jnp.bool_),
            sd((B, T), jnp.int32))
    fn = jax.jit(lambda *a: pallas_mgpu.block_attention(*a, block_size=block_size, block_k=block_k))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_mgpu_lowering_rejects_oversized_smem(monkeypatch):
    """The SMEM budget is checked at lowering: float32 with 128-key tiles would need ~320 KiB of the 227 KiB;
    choose_tiles refuses it up front, and forcing it past choose_tiles fails in the lowering (so the CPU lowering
    checks above do check the budget)."""
    sd = jax.ShapeDtypeStruct
    args = (sd((1, 32, 4, 128), jnp.float32), sd((1, 256, 4, 128), jnp.float32),
            sd((1, 256, 4, 128), jnp.float32), sd((1, 256), jnp.bool_), sd((1, 32), jnp.int32))
    monkeypatch.setattr(pallas_mgpu, "choose_tiles", lambda T, S, block_k, dtype: (64, 64, 128, 256))
    fn = jax.jit(lambda *a: pallas_mgpu.block_attention(*a, block_k=128))
    with pytest.raises(ValueError, match="shared memory"):
        fn.trace(*args).lower(lowering_platforms=("cuda",))

