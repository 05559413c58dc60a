"""LLaDA 2.x MoE family: golden logits and router top-k of the official hub code (fp32), the grouped expert
implementations against the dense all-experts reference, int8 experts, and the checkpoint reader's errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import dllm_jax
from dllm_jax import quant
from dllm_jax.models import llada2_moe

TOL = 1e-3  # golden README: sharp attention (QK-norm weights ~3), use 1e-3 absolute for this set


@pytest.fixture(scope="module")
def model(fixtures):
    return dllm_jax.load(str(fixtures / "llada2_tiny"))


@pytest.fixture(scope="module")
def gold(fixtures):
    return load_file(str(fixtures / "llada2_logits.safetensors"))


def test_config_maps_the_hub_config(model):
    c = model.cfg
    assert (c.family, c.n_layers, c.first_dense_layers, c.n_experts, c.n_experts_per_tok) == ("llada2_moe", 3, 1, 8, 2)
    assert (c.n_group, c.topk_group, c.routed_scaling, c.n_shared_experts, c.moe_hidden) == (4, 2, 2.5, 1, 32)
    assert (c.head_dim, c.rope_dim, c.n_kv_heads, c.mask_token_id, c.eos_token_id) == (16, 8, 2, 316, 312)
    assert model.params["moe"]["w_gate"].shape == (2, 8, 64, 32)  # experts stacked [Lm, E, D, F]
    assert model.params["moe"]["router"].dtype == jnp.float32


@pytest.mark.parametrize("key,ids,block,mode", [
    ("logits", "input_ids", 32, "hard"),  # LLaDA2.0 generate's mask (0 / -inf)
    ("logits_mask01", "input_ids", 32, "soft01"),  # LLaDA2.1 generate's 0/1 mask added as a bias
    ("logits_nomask", "input_ids", 0, "hard"),  # no mask: bidirectional
    ("logits_block16", "input_ids", 16, "hard"),
    ("logits_b2", "input_ids_b2", 32, "hard"),  # batch of 2
])
def test_golden_logits(model, gold, key, ids, block, mode):
    cfg = model.cfg.replace(block_causal=block, block_mask_mode=mode)
    logits, _ = llada2_moe.forward(model.params, cfg, jnp.asarray(gold[ids]))
    assert np.abs(np.asarray(logits) - gold[key]).max() < TOL


@pytest.mark.parametrize("impl", ["segment", "ragged", pytest.param("dense", marks=pytest.mark.slow),
                                  pytest.param("gather", marks=pytest.mark.slow)])
def test_router_topk_and_weights_per_layer(model, gold, impl):
    cfg = model.cfg.replace(block_causal=32, moe_impl=impl)
    logits, _, (rl, idx, w) = llada2_moe.forward_with_routing(model.params, cfg, jnp.asarray(gold["input_ids"]))
    assert np.abs(np.asarray(logits) - gold["logits"]).max() < TOL
    for j, layer in enumerate((1, 2)):
        np.testing.assert_array_equal(np.asarray(idx[j, 0]), gold[f"router_topk_idx_layer{layer}"])
        np.testing.assert_allclose(np.asarray(w[j, 0]), gold[f"router_topk_weight_layer{layer}"], atol=1e-4)
        np.testing.assert_allclose(np.asarray(rl[j, 0]), gold[f"router_logits_layer{layer}"], atol=1e-3)


def _toy_moe(E=16, k=4, groups=4, topk_group=2, seed=0):
    cfg = dllm_jax.ModelConfig(family="llada2_moe", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                               head_dim=8, mlp_hidden=48, rope_theta=1e4, norm_eps=1e-6, qkv_bias=False,
                               mask_token_id=63, eos_token_id=62, pad_token_id=62, max_seq_len=256, qk_norm=True,
                               rope_dim=4, n_experts=E, n_experts_per_tok=k, moe_hidden=16, n_shared_experts=1,
                               n_group=groups, topk_group=topk_group, routed_scaling=2.0, first_dense_layers=1)
    return cfg, llada2_moe.init_params(cfg, jax.random.key(seed), scale=0.2)


@pytest.mark.parametrize("quantized", [False, True])
def test_grouped_expert_impls_equal_dense_reference(quantized):
    from dllm_jax import quant

    cfg, params = _toy_moe()
    if quantized:
        params = quant.quantize_params(params, "int8")
        assert isinstance(params["moe"]["w_gate"], quant.QArray) and params["moe"]["w_gate"].scale.shape == (
            1, 16, 1, 16)
        assert not isinstance(params["moe"]["router"], quant.QArray)
    mp = jax.tree.map(lambda a: a[0], params["moe"])
    x = jax.random.normal(jax.random.key(1), (3, 7, cfg.d_model))

    def run(impl):
        c = cfg.replace(moe_impl=impl)
        return jax.jit(lambda mp, x: llada2_moe.moe_mlp(c, mp, x))(mp, x)

    ref = run("dense")
    for impl in ("gather", "segment", "ragged"):
        got = run(impl)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5, rtol=1e-5)


def test_group_limited_routing_only_picks_kept_groups():
    cfg, params = _toy_moe(E=16, k=3, groups=4, topk_group=1)
    h = jax.random.normal(jax.random.key(2), (50, cfg.d_model))
    idx, w, _ = llada2_moe.route(cfg, h, params["moe"]["router"][0], params["moe"]["expert_bias"][0])
    groups = np.asarray(idx) // 4
    assert (groups == groups[:, :1]).all()  # one group kept -> every selected expert in it
    np.testing.assert_allclose(np.asarray(w).sum(1), 2.0, rtol=1e-5)  # normalised, times routed_scaling


def test_int8_model_computes_with_its_dequantized_weights(model, gold):
    """int8 weight-only quantization reaches the stacked experts and the shared expert (the router stays float32),
    and the int8 forward equals the float forward on the dequantized weights (the tiny model is too sharp for an
    int8-vs-float logit bound to mean anything: one routing flip moves logits a lot)."""
    q = quant.quantize_model(model, "int8")
    for k in ("w_gate", "w_up", "w_down", "s_gate", "s_up", "s_down"):
        assert isinstance(q.params["moe"][k], quant.QArray), k
    assert isinstance(q.params["dense"]["w_up"], quant.QArray) and isinstance(q.params["layers"]["wq"], quant.QArray)
    assert not isinstance(q.params["moe"]["router"], quant.QArray)
    deq = jax.tree.map(quant.dequantize, q.params, is_leaf=quant.is_qarray)
    cfg = model.cfg.replace(block_causal=32)
    ids = jnp.asarray(gold["input_ids"])
    lq, _ = llada2_moe.forward(q.params, cfg, ids)
    ld, _ = llada2_moe.forward(deq, cfg, ids)
    np.testing.assert_allclose(np.asarray(lq), np.asarray(ld), atol=2e-3)
    assert quant.param_bytes(q.params)["linear"] < quant.param_bytes(model.params)["linear"] / 3


def test_window_forward_equals_full_forward(model, gold):
    """The cached forward contract (used by KV-cache policies): a block's window over the cache of the earlier
    blocks gives the full forward's logits for that block (block-causal mask)."""
    cfg = model.cfg.replace(block_causal=32)
    ids = jnp.asarray(gold["input_ids"])
    full, kv = llada2_moe.forward(model.params, cfg, ids)
    pos = jnp.arange(96, dtype=jnp.int32)[None]
    win, _ = llada2_moe.forward_window(model.params, cfg, ids[:, 64:], jnp.array([64], jnp.int32),
                                       jnp.ones((1, 32), bool), kv, pos, jnp.ones((1, 96), bool))
    np.testing.assert_allclose(np.asarray(win), np.asarray(full[:, 64:]), atol=TOL)


# ------------------------------------------------------------------------------------ checkpoint reader errors

def _bad_checkpoint(fixtures, tmp_path, edit_tensors=None, edit_config=None):
    src = tmp_path / "bad"
    shutil.copytree(fixtures / "llada2_tiny", src)
    if edit_tensors:
        t = load_file(str(src / "model.safetensors"))
        edit_tensors(t)
        save_file(t, str(src / "model.safetensors"))
    if edit_config:
        c = json.loads((src / "config.json").read_text())
        edit_config(c)
        (src / "config.json").write_text(json.dumps(c))
    return src


def _drop_experts(t):
    for k in [k for k in t if ".mlp.experts." in k]:
        del t[k]


def _drop_one_expert(t):
    for k in [k for k in t if ".mlp.experts.7." in k]:
        del t[k]


def _bad_bias(t):
    t["model.layers.2.mlp.gate.expert_bias"] = np.zeros((7,), np.float32)


def _fewer_experts_in_config(c):
    c.update(num_experts=4, n_group=2, topk_group=1)


BAD = {
    "experts_missing": (_drop_experts, None, "missing 48 expert tensor(s): config.json says num_experts=8"),
    "one_expert_missing": (_drop_one_expert, None, "but layer 1 has 7 of them"),
    "wrong_expert_count": (None, _fewer_experts_in_config, "has 8 experts in layer 1"),
    "router_bias_shape": (_bad_bias, None, "router bias model.layers.2.mlp.gate.expert_bias in model.safetensors "
                                           "has shape (7,), expected (8,) = (num_experts,)"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_moe_checkpoint_one_clear_error_nothing_written(fixtures, tmp_path, kind):
    from convert.hf_to_flax import main as convert_main
    from dllm_jax.hf_weights import CheckpointError

    edit_t, edit_c, msg = BAD[kind]
    src = _bad_checkpoint(fixtures, tmp_path, edit_t, edit_c)
    with pytest.raises(CheckpointError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        dllm_jax.load(str(src))
    out = tmp_path / "out" / "conv"
    assert convert_main([str(src), str(out), "--no-progress"]) == 2
    assert not (tmp_path / "out").exists()


def test_convert_then_restore_equals_hf_load_and_int8_converts(fixtures, tmp_path, model, gold):
    from convert.hf_to_flax import main as convert_main

    cfg = model.cfg.replace(block_causal=32)
    ids = jnp.asarray(gold["input_ids"])
    ref, _ = llada2_moe.forward(model.params, cfg, ids)
    assert convert_main([str(fixtures / "llada2_tiny"), str(tmp_path / "f32"), "--no-progress"]) == 0
    m2 = dllm_jax.load(str(tmp_path / "f32"))
    assert m2.cfg == model.cfg
    got, _ = llada2_moe.forward(m2.params, cfg, ids)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    assert convert_main([str(fixtures / "llada2_tiny"), str(tmp_path / "q8"), "--quantize", "int8",
                         "--no-progress"]) == 0
    m3 = dllm_jax.load(str(tmp_path / "q8"))
    mq = dllm_jax.load(str(fixtures / "llada2_tiny"), quantize="int8")
    assert isinstance(m3.params["moe"]["w_gate"], quant.QArray)
    for a, b in zip(jax.tree.leaves(m3.params), jax.tree.leaves(mq.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # streamed int8 == quantized after loading


# ------------------------------------------------------------------------------------------------------ sharding

def test_moe_sharding_rules_expert_and_tensor_parallel(model):
    from jax.sharding import PartitionSpec as P

    from dllm_jax import sharding

    mesh = sharding.make_moe_mesh(1, 2, 4)
    sp = sharding.shard_params(model.params, model.cfg, mesh)
    assert sp["moe"]["w_gate"].sharding.spec == P(None, "expert", None, "model")  # EP x TP inside each expert
    assert sp["moe"]["w_down"].sharding.spec == P(None, "expert", "model")
    assert sp["moe"]["s_down"].sharding.spec == P(None, "model")  # shared expert: row parallel
    assert sp["moe"]["router"].sharding.spec == P() and sp["moe"]["expert_bias"].sharding.spec == P()
    assert sp["layers"]["wq"].sharding.spec == P(None, None, "model")
    assert sharding.describe(model.cfg, mesh)["expert"] == "expert"
    # a 2-axis mesh has no expert axis: the experts are replicated there, TP still applies
    sp2 = sharding.shard_params(model.params, model.cfg, sharding.make_mesh(2, 4))
    assert sp2["moe"]["w_gate"].sharding.spec == P(None, None, None, "model")
    assert sharding.mesh_from_spec("data=1,expert=2,model=4").shape == {"data": 1, "expert": 2, "model": 4}


@pytest.mark.parametrize("quantize", [pytest.param(None, marks=pytest.mark.slow), "int8"])
def test_sharded_restore_lands_in_the_expert_layout(fixtures, tmp_path, model, gold, quantize):
    from convert.hf_to_flax import main as convert_main
    from dllm_jax import sharding

    args = [str(fixtures / "llada2_tiny"), str(tmp_path / "c"), "--no-progress"]
    assert convert_main(args + (["--quantize", quantize] if quantize else [])) == 0
    mesh = sharding.make_moe_mesh(1, 2, 4)
    restored = dllm_jax.load(str(tmp_path / "c"), mesh=mesh)
    expected = quant.param_shardings(model.cfg, mesh, quantize)
    got = jax.tree.map(lambda a: a.sharding, restored.params)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, g, e in zip(jax.tree.leaves(restored.params), jax.tree.leaves(got), jax.tree.leaves(expected)):
        assert g.mesh == mesh and g.is_equivalent_to(e, a.ndim)
    w = restored.params["moe"]["w_gate"]
    w = w.q if quantize else w
    assert w.sharding.spec == sharding.spec_for(("layers", "expert", "embed", "moe_mlp"), w.shape, model.cfg, mesh)
    assert len(w.addressable_shards) == 8 and w.addressable_shards[0].data.shape == (2, 4, 64, 8)
    cfg = model.cfg.replace(block_causal=32)
    ref, _ = llada2_moe.forward(model.params if not quantize else quant.quantize_params(model.params, quantize),
                                cfg, jnp.asarray(gold["input_ids"]))
    got_l, _ = llada2_moe.forward(restored.params, cfg, jnp.asarray(gold["input_ids"]))
    np.testing.assert_allclose(np.asarray(got_l), np.asarray(ref), atol=TOL)


# ------------------------------------------------------------------------------------ FLOPs: top-k, not E

def _moe_flops(E, k, impl, tokens=64):
    cfg, _ = _toy_moe(E=E, k=k, groups=4, topk_group=4)
    cfg = cfg.replace(moe_impl=impl)
    mp = jax.tree.map(lambda a: a[0], llada2_moe.init_params(cfg, jax.random.key(0))["moe"])
    x = jnp.ones((1, tokens, cfg.d_model), jnp.float32)
    c = jax.jit(lambda mp, x: llada2_moe.moe_mlp(cfg, mp, x)).lower(mp, x).compile()
    ca = c.cost_analysis()
    return float((ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"])


@pytest.mark.parametrize("impl", ["segment", pytest.param("gather", marks=pytest.mark.slow)])
def test_compiled_flops_grow_with_topk_not_with_experts(impl):
    """XLA's cost analysis of the compiled MoE block: 4x the experts at the same top-k adds only the router's
    E-proportional FLOPs (N x D x E), doubling top-k roughly doubles the routed part; the dense reference grows
    with E."""
    base = _moe_flops(16, 2, impl)
    more_experts = _moe_flops(64, 2, impl)
    router_extra = 2 * 64 * 32 * (64 - 16)  # tokens x d_model x extra experts, 2 flops per MAC
    assert more_experts - base <= 1.1 * router_extra + 0.02 * base
    assert _moe_flops(16, 4, impl) > 1.5 * base
    assert _moe_flops(64, 2, "dense") > 3 * _moe_flops(16, 2, "dense")
