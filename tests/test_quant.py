"""Weight-only int8 quantization (dllm_jax.quant): error bounds, logits vs float, generation, the converter's
--quantize round trip, sizes, sharding and bad values.

Measured on the golden tiny checkpoints (CPU, float32 compute, the golden `input_ids`; docs/quantization.md has the
full table): int8 logits differ from the PyTorch float32 golden logits by a relative L2 error of 0.041 (LLaDA) /
0.062 (Dream), about the same as running the model in bfloat16 (0.042 / 0.065); top-1 agreement 0.979 for both. The tiny models have
large random weights (std ~0.1-0.4 at d_model 64), so they are far more sensitive than real checkpoints.
"""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file

import dllm_jax
from convert import hf_to_flax
from dllm_jax import quant, sharding
from dllm_jax.checkpoint import abstract_params, save_converted
from dllm_jax.generate import generate
from dllm_jax.models import transformer
from dllm_jax.models.config import ModelConfig
from dllm_jax.presets import make_schedule

# int8 vs the golden float32 logits: relative L2 error and top-1 agreement bounds (measured 0.041/0.062, 0.979).
REL_L2_INT8 = 0.08
TOP1_INT8 = 0.95
# int8 is no worse than bfloat16 compute by more than this factor (measured 0.99 LLaDA, 0.96 Dream).
VS_BF16 = 1.25
# int8-all (also embedding + LM head): measured 0.063 / 0.078.
REL_L2_INT8_ALL = 0.12

IDS = np.array([[3, 17, 250, 296, 296, 42, 7, 290], [1, 2, 3, 4, 296, 296, 296, 9]], np.int32)


def _tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _rel_l2(out, ref):
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@pytest.fixture(params=["llada", "dream"])
def fam(request):
    return request.param


# ------------------------------------------------------------------------------------------------------- numerics

@pytest.mark.parametrize("shape,axis", [((3, 40, 24), -2), ((24, 40), -2), ((50, 16), -1)])
def test_quantize_error_bound_per_channel(shape, axis):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32)
    sshape = tuple(1 if i == axis % w.ndim else s for i, s in enumerate(shape))
    w *= np.exp(rng.uniform(-4, 3, sshape)).astype(np.float32)  # channel magnitudes over 3 decades
    zero = [slice(None)] * w.ndim
    zero[(axis - 1) % w.ndim] = 0  # one all-zero channel: scale 0, q 0, dequantized exactly 0
    w[tuple(zero)] = 0
    qa = quant.quantize_array(w, axis)
    q, scale = np.asarray(qa.q), np.asarray(qa.scale)
    assert q.dtype == np.int8 and q.shape == w.shape
    assert scale.dtype == np.float32 and scale.shape == sshape
    assert np.abs(q).max() <= 127 and q.min() >= -127
    amax = np.abs(w).max(axis=axis, keepdims=True)
    np.testing.assert_allclose(scale, amax / 127, rtol=1e-6)
    np.testing.assert_array_equal(np.abs(q).max(axis=axis, keepdims=True)[amax > 0], 127)  # full range used
    err = np.abs(np.asarray(qa.dequantize()) - w)
    # per channel: |w - q * scale| <= scale / 2 (+ float32 rounding of the product)
    assert np.all(err <= scale / 2 * (1 + 1e-5) + 1e-30)
    assert np.all(err[tuple(zero)] == 0)
    # the host (numpy, chunked) quantizer used by the streaming loader is bit-identical
    qn, sn = quant.quantize_np(w, axis, chunk_elems=64)
    np.testing.assert_array_equal(qn, q)
    np.testing.assert_array_equal(sn, scale)


def test_quantize_np_on_transposed_bf16_view_into_slots():
    rng = np.random.default_rng(1)
    hf = rng.standard_normal((48, 32)).astype(ml_dtypes.bfloat16)  # HF [out, in]
    q = np.zeros((2, 32, 48), np.int8)
    s = np.zeros((2, 1, 48), np.float32)
    quant.quantize_np(hf.T, -2, out=(q[1], s[1]), chunk_elems=100)
    ref = quant.quantize_array(jnp.asarray(hf.T), -2)
    np.testing.assert_array_equal(q[1], np.asarray(ref.q))
    np.testing.assert_array_equal(s[1], np.asarray(ref.scale))
    assert not q[0].any()
    with pytest.raises(quant.QuantError, match="do not match"):
        quant.quantize_np(hf.T, -2, out=(q[1], s[1, 0]))


def test_int8_forward_equals_float_forward_of_dequantized_weights(fam, request):
    """Scale-after-matmul is exact: the int8 model == the float model whose weights are q * scale (fp32 rounding)."""
    model = request.getfixturevalue(f"{fam}_model")
    qp = quant.quantize_params(model.params, "int8-all")
    deq = jax.tree.map(quant.dequantize, qp, is_leaf=quant.is_qarray)
    ids = jnp.asarray(IDS)
    a, cache_a = transformer.forward(qp, model.cfg, ids)
    b, cache_b = transformer.forward(deq, model.cfg, ids)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=0)
    # cached window path (forward_window) too
    B, L = ids.shape
    pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    args = (ids[:, 2:6], jnp.full((B,), 2, jnp.int32), jnp.ones((B, 4), bool))
    wa, _ = transformer.forward_window(qp, model.cfg, *args, cache_a, pos, jnp.ones((B, L), bool))
    wb, _ = transformer.forward_window(deq, model.cfg, *args, cache_b, pos, jnp.ones((B, L), bool))
    np.testing.assert_allclose(np.asarray(wa), np.asarray(wb), atol=2e-4, rtol=0)


def test_int8_logits_vs_fp32_golden(fixtures, fam, request):
    g = load_file(str(fixtures / f"{fam}_logits.safetensors"))
    path = str(fixtures / f"{fam}_tiny")
    ref = g["logits"]
    fp32 = np.asarray(request.getfixturevalue(f"{fam}_model").logits(g["input_ids"]))
    bf16 = np.asarray(dllm_jax.load(path, dtype="bfloat16").logits(g["input_ids"]))
    m8 = dllm_jax.load(path, quantize="int8")
    assert isinstance(m8.params["layers"]["wq"], quant.QArray) and not isinstance(m8.params["embed"], quant.QArray)
    int8 = np.asarray(m8.logits(g["input_ids"]))
    int8_all = np.asarray(dllm_jax.load(path, quantize="int8-all").logits(g["input_ids"]))
    assert _rel_l2(fp32, ref) < 1e-5
    assert 0 < _rel_l2(int8, ref) < REL_L2_INT8
    assert _rel_l2(int8, ref) < VS_BF16 * _rel_l2(bf16, ref)
    assert (int8.argmax(-1) == ref.argmax(-1)).mean() >= TOP1_INT8
    assert _rel_l2(int8_all, ref) < REL_L2_INT8_ALL
    # bf16 compute with int8 weights stays close to bf16 compute
    int8_bf16 = np.asarray(dllm_jax.load(path, dtype="bfloat16", quantize="int8").logits(g["input_ids"]))
    assert _rel_l2(int8_bf16, ref) < 2 * REL_L2_INT8


def test_quantize_at_load_equals_quantize_model(fixtures, fam, request):
    """Streaming host quantization (numpy, per tensor) == quantizing the loaded float model (jax), bit for bit."""
    model = request.getfixturevalue(f"{fam}_model")
    for mode in ("int8", "int8-all"):
        streamed = dllm_jax.load(str(fixtures / f"{fam}_tiny"), quantize=mode)
        _tree_equal(streamed.params, dllm_jax.quant.quantize_model(model, mode).params)
    assert quant.quantize_model(streamed, "int8") is streamed  # already covered: no-op
    assert quant.quantization_of(streamed.params) == quant.MODES["int8-all"]
    assert quant.quantization_of(model.params) is None


@pytest.mark.parametrize("family,preset,kw", [
    ("llada", "llada", dict(steps=16, block_length=8)),  # uncached
    ("llada", "fastdllm_dual", dict(block_length=8, threshold=0.8)),  # dual KV cache
    ("dream", "fastdllm_dream_prefix", dict(block_length=8, threshold=0.8)),  # prefix KV cache
])
def test_generate_int8(fixtures, family, preset, kw):
    model = dllm_jax.load(str(fixtures / f"{family}_tiny"), quantize="int8-all" if family == "dream" else "int8")
    sched = make_schedule(preset, 16, model.cfg, **kw)
    out = generate(model, [[11, 23, 5, 77], [100, 3, 42, 9, 200, 17]], gen_length=16, schedule=sched)
    assert out.generated.shape == (2, 16)
    assert not out.unfinished.any() and (out.nfe > 0).all()
    assert ((out.generated >= 0) & (out.generated < model.cfg.vocab_size)).all()
    assert not (out.generated == model.cfg.mask_token_id).any()


# ------------------------------------------------------------------------------------------------ checkpoints

def _run_convert(argv, capsys):
    rc = hf_to_flax.main([str(a) for a in argv] + ["--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("mode", ["int8", "int8-all"])
def test_convert_quantize_round_trip(fixtures, tmp_path, capsys, fam, mode):
    src = fixtures / f"{fam}_tiny"
    dst = tmp_path / "conv"
    rc, out, err = _run_convert([src, dst, "--quantize", mode], capsys)
    assert rc == 0, err
    assert mode in out
    meta = json.loads((dst / "dllm_jax_config.json").read_text())
    assert meta["quantization"]["method"] == "int8" and meta["quantization"]["mode"] == mode
    assert meta["quantization"]["embed"] == meta["quantization"]["lm_head"] == (mode == "int8-all")
    at_load = dllm_jax.load(str(src), quantize=mode)
    for q in (None, mode, "int8"):  # a quantized checkpoint restores as int8 whatever `quantize` asks
        restored = dllm_jax.load(str(dst), quantize=q)
        _tree_equal(restored.params, at_load.params)
    np.testing.assert_array_equal(np.asarray(restored.logits(IDS)), np.asarray(at_load.logits(IDS)))
    # bf16 compute dtype: the float leaves are stored bf16, the int8 leaves and scales are unchanged
    rc, _, err = _run_convert([src, tmp_path / "bf", "--quantize", mode, "--dtype", "bfloat16"], capsys)
    assert rc == 0, err
    rb = dllm_jax.load(str(tmp_path / "bf"), dtype="bfloat16")
    _tree_equal(rb.params, dllm_jax.load(str(src), dtype="bfloat16", quantize=mode).params)
    assert rb.params["layers"]["wq"].dtype == jnp.bfloat16 and rb.params["final_norm"].dtype == jnp.bfloat16


def test_load_float_converted_with_quantize(fixtures, tmp_path, fam, request):
    model = request.getfixturevalue(f"{fam}_model")
    dst = tmp_path / "f32"
    dst.mkdir()
    save_converted(str(dst), model.cfg, model.params)
    _tree_equal(dllm_jax.load(str(dst), quantize="int8").params, quant.quantize_model(model, "int8").params)
    # an int8 checkpoint asked for int8-all quantizes the remaining leaves at load
    d8 = tmp_path / "i8"
    d8.mkdir()
    save_converted(str(d8), model.cfg, quant.quantize_params(model.params, "int8"))
    assert json.loads((d8 / "dllm_jax_config.json").read_text())["quantization"]["mode"] == "int8"
    _tree_equal(dllm_jax.load(str(d8), quantize="int8-all").params, quant.quantize_model(model, "int8-all").params)


def test_host_side_quantization_path(fixtures, tmp_path, monkeypatch, llada_model):
    """The accelerator path of restore_converted (float leaves restored on the host CPU, quantized there, then
    placed), forced on CPU: same params as quantizing directly, with and without a mesh."""
    from dllm_jax import checkpoint

    dst = tmp_path / "f32"
    dst.mkdir()
    save_converted(str(dst), llada_model.cfg, llada_model.params)
    monkeypatch.setattr(checkpoint, "_host_device", lambda: jax.devices("cpu")[0])
    want = quant.quantize_model(llada_model, "int8").params
    _tree_equal(dllm_jax.load(str(dst), quantize="int8").params, want)
    mesh = sharding.make_mesh(2, 4)
    placed = dllm_jax.load(str(dst), quantize="int8", mesh=mesh)
    _tree_equal(placed.params, want)
    assert placed.params["layers"]["wq"].q.sharding.spec == P(None, None, "model")


def test_abstract_params_quantized(llada_model):
    t = abstract_params(llada_model.cfg, jnp.bfloat16, quantization="int8")
    wq = t["layers"]["wq"]
    assert isinstance(wq, quant.QArray) and wq.dtype == jnp.bfloat16
    assert wq.q.dtype == jnp.int8 and wq.q.shape == (2, 64, 64)
    assert wq.scale.dtype == jnp.float32 and wq.scale.shape == (2, 1, 64)
    assert t["embed"].dtype == jnp.bfloat16 and not isinstance(t["lm_head"], quant.QArray)
    t = abstract_params(llada_model.cfg, jnp.float32, quantization="int8-all")
    assert t["embed"].scale.shape == (300, 1) and t["lm_head"].scale.shape == (1, 300)


# ---------------------------------------------------------------------------------------------------- sizes

def _big(family):
    if family == "llada":  # LLaDA-8B
        return ModelConfig(family="llada", vocab_size=126464, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                           head_dim=128, mlp_hidden=12288, rope_theta=5e5, norm_eps=1e-5, qkv_bias=False,
                           mask_token_id=126336, eos_token_id=126081, pad_token_id=126081, max_seq_len=4096)
    return ModelConfig(family="dream", vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                       head_dim=128, mlp_hidden=18944, rope_theta=1e6, norm_eps=1e-6, qkv_bias=True,
                       mask_token_id=151666, eos_token_id=151643, pad_token_id=151643, max_seq_len=4096,
                       logit_shift=True)


def test_param_bytes_shrink_4x(fam, request):
    model = request.getfixturevalue(f"{fam}_model")
    f = quant.param_bytes(model.params)
    q = quant.param_bytes(quant.quantize_params(model.params, "int8"))
    qa = quant.param_bytes(quant.quantize_params(model.params, "int8-all"))
    # tiny model (d_model 64): the float32 scales cost 4 bytes per 64 int8 values -> ratio ~3.76
    assert 3.7 < f["linear"] / q["linear"] <= 4
    assert q["embed_head"] == f["embed_head"] and 3.7 < f["embed_head"] / qa["embed_head"] <= 4
    # real sizes from shapes only (no weights): ~4x vs float32 (2x vs bfloat16) for the linear weights
    cfg = _big(fam)
    f32 = quant.param_bytes(abstract_params(cfg, jnp.float32))
    bf = quant.param_bytes(abstract_params(cfg, jnp.bfloat16))
    i8 = quant.param_bytes(abstract_params(cfg, jnp.bfloat16, quantization="int8"))
    i8a = quant.param_bytes(abstract_params(cfg, jnp.bfloat16, quantization="int8-all"))
    assert 3.99 < f32["linear"] / i8["linear"] <= 4 and 1.99 < bf["linear"] / i8["linear"] <= 2
    assert i8a["total"] < i8["total"] < 0.6 * bf["total"]
    assert i8["total"] < 16e9 * 0.7  # an 8B model's int8 weights leave room on a 16 GB chip


# -------------------------------------------------------------------------------------------------- sharding

def test_quantized_leaves_shard_like_float(fixtures, tmp_path, fam, request):
    model = request.getfixturevalue(f"{fam}_model")
    mesh = sharding.make_mesh(2, 4)
    qp = quant.quantize_params(model.params, "int8-all")
    placed = sharding.shard_params(qp, model.cfg, mesh)
    fl = sharding.shard_params(model.params, model.cfg, mesh)
    for k in quant.LINEAR:
        assert placed["layers"][k].q.sharding.spec == fl["layers"][k].sharding.spec
    assert placed["embed"].q.sharding.spec == fl["embed"].sharding.spec == P("model")  # vocab 300 / 4
    assert placed["embed"].scale.sharding.spec == P("model")  # per-row scales follow the vocab
    assert placed["lm_head"].scale.sharding.spec == P(None, "model")  # per-column scales along the vocab
    assert placed["layers"]["w_gate"].scale.sharding.spec == P(None, None, "model")  # column parallel
    assert placed["layers"]["wo"].scale.sharding.spec == P()  # row parallel: the output axis is replicated
    # quant.param_shardings (the restore target) agrees with the placement rules
    expected = quant.param_shardings(model.cfg, mesh, "int8-all")
    for a, e in zip(jax.tree.leaves(placed), jax.tree.leaves(expected)):
        assert a.sharding.is_equivalent_to(e, a.ndim)
    # a quantized converted checkpoint restores straight onto those shardings, and generates like one device
    dst = tmp_path / "q"
    dst.mkdir()
    save_converted(str(dst), model.cfg, qp)
    restored = dllm_jax.load(str(dst), mesh=mesh)
    for a, e in zip(jax.tree.leaves(restored.params), jax.tree.leaves(expected)):
        assert a.sharding.is_equivalent_to(e, a.ndim)
    _tree_equal(restored.params, qp)
    prompts = [[11, 23, 5, 77, 100][: 2 + i % 4] for i in range(8)]
    sched = make_schedule("llada" if fam == "llada" else "dream", 16, model.cfg, steps=16)
    single = generate(dllm_jax.Model(model.cfg, qp), prompts, gen_length=16, schedule=sched)
    multi = generate(restored, prompts, gen_length=16, schedule=sched, mesh=mesh)
    np.testing.assert_array_equal(multi.sequences, single.sequences)


# ---------------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("bad", ["int4", "fp8", 8, "INT9", True])
def test_bad_quantize_value(fixtures, bad):
    with pytest.raises(quant.QuantError, match=r"unknown quantize=.*expected None, one of \['int8', 'int8-all'\]"):
        dllm_jax.load(str(fixtures / "llada_tiny"), quantize=bad)
    with pytest.raises(ValueError):
        quant.resolve(bad)


def test_quantize_aliases():
    assert quant.resolve("INT8") == quant.resolve("int8") == quant.QuantConfig()
    assert quant.resolve("int8_all") == quant.QuantConfig(embed=True, lm_head=True)
    assert quant.resolve(None) is None and quant.resolve("none") is None
    cfg = quant.QuantConfig(embed=True)
    assert quant.resolve(cfg) is cfg and cfg.name == "int8+embed"
    assert quant.QuantConfig.from_meta(cfg.to_meta()) == cfg
    with pytest.raises(quant.QuantError, match="unknown quantization method 'int4'"):
        quant.QuantConfig(method="int4")


def test_convert_bad_quantize(fixtures, tmp_path, capsys):
    dst = tmp_path / "x"
    rc, _, err = _run_convert([fixtures / "llada_tiny", dst, "--quantize", "int4"], capsys)
    assert rc == 2 and "argument --quantize: invalid choice: 'int4'" in err and "Traceback" not in err
    assert not dst.exists()
    with pytest.raises(hf_to_flax.ConvertError, match="unknown quantize='int4'"):
        hf_to_flax.convert(str(fixtures / "llada_tiny"), str(dst), quantize="int4")
    assert not dst.exists()


def test_cli_generate_quantize(fixtures, llada_model, capsys):
    from dllm_jax import cli

    argv = ["generate", "--model", str(fixtures / "llada_tiny"), "--ids", "1,2,3", "--gen-length", "8", "--schedule",
            "llada", "--steps", "8", "--block-length", "8"]
    assert cli.main(argv + ["--quantize", "int8"]) == 0
    toks = capsys.readouterr().out.split()
    sched = make_schedule("llada", 8, llada_model.cfg, steps=8, block_length=8)
    ref = generate(quant.quantize_model(llada_model, "int8"), [[1, 2, 3]], gen_length=8, schedule=sched)
    assert toks == [str(int(t)) for t in ref.generated[0]]
    with pytest.raises(SystemExit):
        cli.main(argv + ["--quantize", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err
