"""Multi-device: data / tensor / mixed meshes give the single-device outputs; sharded restore; mesh and batch errors.

Runs on the 8 fake CPU devices of conftest.py. Tensor parallelism changes the order of the partial sums in the
row-parallel matmuls (wo, w_down) and the vocab reductions, so logits agree to float32 rounding and the generated
tokens / NFE are compared exactly.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import dllm_jax
from dllm_jax import sharding
from dllm_jax.checkpoint import save_converted
from dllm_jax.generate import generate
from dllm_jax.presets import make_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = [11, 23, 5, 77, 100, 3, 42, 9, 200, 17]
PROMPTS8 = [BASE[: 3 + (3 * i) % 8] if i % 2 else BASE[i % 4:] for i in range(8)]  # varied lengths: left padding
GEN = 16

MESHES = {
    "data8x1": lambda: sharding.make_mesh(8, 1),
    "model1x4": lambda: sharding.make_mesh(1, 4, devices=jax.devices()[:4]),
    "mixed2x4": lambda: sharding.make_mesh(2, 4),
}

CASES = [
    ("llada", "llada", dict(steps=16, block_length=8)),
    ("llada", "fastdllm", dict(block_length=8, threshold=0.8)),
    ("llada", "fastdllm_prefix", dict(block_length=8, threshold=0.8)),
    ("llada", "fastdllm_dual", dict(block_length=8, threshold=0.8)),
    ("dream", "dream", dict(steps=16)),
    ("dream", "fastdllm_dream_threshold", dict(steps=16, threshold=0.8)),
    ("dream", "fastdllm_dream_dual", dict(block_length=8, threshold=0.8)),
]

_REF = {}


def _single(model, family, preset, kw):
    key = (family, preset)
    if key not in _REF:
        sched = make_schedule(preset, GEN, model.cfg, **kw)
        _REF[key] = generate(model, PROMPTS8, gen_length=GEN, schedule=sched)
    return _REF[key]


def test_fake_devices():
    assert len(jax.devices()) == 8


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("family,preset,kw", CASES, ids=[c[1] for c in CASES])
def test_mesh_matches_single_device(request, family, preset, kw, mesh_name):
    model = request.getfixturevalue(f"{family}_model")
    ref = _single(model, family, preset, kw)
    mesh = MESHES[mesh_name]()
    sched = make_schedule(preset, GEN, model.cfg, **kw)
    out = generate(model, PROMPTS8, gen_length=GEN, schedule=sched, mesh=mesh)
    np.testing.assert_array_equal(out.sequences, ref.sequences)
    np.testing.assert_array_equal(out.nfe, ref.nfe)
    assert out.loop_iterations == ref.loop_iterations
    assert not out.unfinished.any()


# every other policy family on the mixed mesh (BlockBatch's rows are branches of one request: no mesh support)
ADVANCED = [
    ("dsb_cache", dict(block_length=8, threshold=0.7, prefix_window=4)),
    ("adablock_dual", dict(init_block_length=8, threshold=0.7, delimiter_ids=(5,), delimiter_threshold=0.2)),
    ("dinfer_credit", dict(block_length=8, threshold=0.7, prefix_look=4, after_look=4)),
    ("d2f", dict(block_length=8, tau_add=0.3, tau_act=0.6, tau_conf=0.7)),
    ("entropy_elastic", dict(min_size=2, max_size=12)),
    ("localleap", dict(block_length=8, cache="dual")),
    ("compose", dict(window="sliding", accept="hierarchical", cache="dsb", block_length=8, prefix_window=4)),
]


@pytest.mark.parametrize("preset,kw", ADVANCED, ids=[a[0] for a in ADVANCED])
def test_advanced_schedules_on_a_mesh(llada_model, preset, kw):
    sched = make_schedule(preset, GEN, llada_model.cfg, **kw)
    ref = generate(llada_model, PROMPTS8, gen_length=GEN, schedule=sched)
    out = generate(llada_model, PROMPTS8, gen_length=GEN, schedule=sched, mesh=MESHES["mixed2x4"]())
    np.testing.assert_array_equal(out.sequences, ref.sequences)
    np.testing.assert_array_equal(out.nfe, ref.nfe)


def test_kv_cache_stays_sharded_in_the_loop(llada_model):
    """The compiled 2x4 dual-cache program only ever holds the per-device KV block [L, B/2, S, K/4, hd]."""
    import importlib

    G = importlib.import_module("dllm_jax.generate")
    kw = dict(block_length=8, threshold=0.8)
    generate(llada_model, PROMPTS8, gen_length=GEN, schedule=make_schedule("fastdllm_dual", GEN, llada_model.cfg,
                                                                           **kw), mesh=MESHES["mixed2x4"]())
    L, K, hd, S = llada_model.cfg.n_layers, llada_model.cfg.n_kv_heads, llada_model.cfg.head_dim, 32 + GEN
    local = f"f32[{L},{8 // 2},{S},{K // 4},{hd}]"
    assert any(local in c.as_text() for c in G._COMPILED.values())


def test_placement_and_kv_rules(llada_model, dream_model):
    mesh = sharding.make_mesh(2, 4)
    params, (x, valid, pos, keys) = sharding.place_for_generate(
        llada_model, mesh, tuple(np.zeros((8, 4), t) for t in (np.int32, bool, np.int32)) + (
            jax.vmap(jax.random.key)(np.arange(8, dtype=np.uint32)),))
    assert x.sharding.spec == P("data") and keys.sharding.spec == P("data")
    lay = params["layers"]
    assert lay["wq"].sharding.spec == P(None, None, "model")  # column parallel, 4 heads / 4
    assert lay["wo"].sharding.spec == P(None, "model")  # row parallel
    assert lay["w_down"].sharding.spec == P(None, "model")
    assert params["embed"].sharding.spec == P("model")  # vocab 300 / 4
    assert sharding.kv_sharding(llada_model.cfg, mesh, 8, 48).spec == P(None, "data", None, "model")
    # Dream tiny: 2 KV heads do not divide model=4 -> wk/wv and the KV cache fall back to replication over model
    d = sharding.describe(dream_model.cfg, mesh)
    assert d["heads"] == "model" and d["kv_heads"].startswith("replicated (2 not divisible")
    assert sharding.kv_sharding(dream_model.cfg, mesh, 8, 48).spec == P(None, "data")
    # vocab 300 does not divide model=8 -> replicated
    assert sharding.spec_for(("vocab", "embed"), (300, 64), llada_model.cfg, sharding.make_mesh(1, 8)) == P()


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_sharded_restore_converted(request, tmp_path, family):
    model = request.getfixturevalue(f"{family}_model")
    dst = tmp_path / "conv"
    dst.mkdir()
    save_converted(str(dst), model.cfg, model.params)
    mesh = sharding.make_mesh(2, 4)
    restored = dllm_jax.load(str(dst), mesh=mesh)
    expected = sharding.param_shardings(model.cfg, mesh)
    got = jax.tree.map(lambda a: a.sharding, restored.params)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        assert isinstance(g, NamedSharding) and g.mesh == mesh
        assert g.is_equivalent_to(e, 3)
    lay = restored.params["layers"]
    assert lay["w_gate"].sharding.spec == P(None, None, "model")
    if family == "dream":
        assert lay["bq"].sharding.spec == P(None, "model")
        assert lay["wk"].sharding.spec == P()  # 2 KV heads on model=4: replicated fallback
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = np.array([BASE, BASE[::-1]], np.int32)
    np.testing.assert_allclose(np.asarray(restored.logits(ids)), np.asarray(model.logits(ids)), rtol=1e-5, atol=1e-4)


def test_batch_not_divisible_by_data_axis(llada_model):
    sched = make_schedule("llada", GEN, llada_model.cfg, steps=16, block_length=8)
    with pytest.raises(sharding.ShardingError, match=r"batch size 3 is not divisible by the mesh's data axis \(8\)"):
        generate(llada_model, PROMPTS8[:3], gen_length=GEN, schedule=sched, mesh=sharding.make_mesh(8, 1))


@pytest.mark.parametrize("spec,msg", [
    ("data=3,model=4", r"= 12 devices, but 8 device"),
    ("data=16", r"= 16 devices, but 8 device"),
    ("batch=8", r"unknown mesh axis 'batch'"),
    ("data:2,model=4", r"bad mesh spec"),
    ("data=2;model=4", r"bad mesh spec"),
    ("data=2,data=4", r"given twice"),
    ("data=0,model=8", r"positive size"),
    ("data=-1,model=-1", r"at most one"),
    ("data=-1,model=3", r"cannot infer"),
    ("", r"non-empty"),
])
def test_bad_mesh_spec(spec, msg):
    with pytest.raises(sharding.ShardingError, match=msg):
        sharding.mesh_from_spec(spec)


def test_mesh_spec_ok():
    m = sharding.mesh_from_spec("data=2,model=4")
    assert m.axis_names == ("data", "model") and m.shape == {"data": 2, "model": 4}
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
    assert sharding.mesh_from_spec("model=-1").shape == {"data": 1, "model": 8}
    assert sharding.mesh_from_spec("data=1,model=2", allow_subset=True).size == 2


def test_cli_generate_with_mesh(llada_model):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    cmd = [sys.executable, "-m", "dllm_jax.cli", "generate", "--model", os.path.join(ROOT, "tests/fixtures/llada_tiny"),
           "--ids", "1,2,3", "--gen-length", "8", "--schedule", "llada", "--steps", "8", "--block-length", "8",
           "--mesh", "data=1,model=2"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    toks = r.stdout.split()
    sched = make_schedule("llada", 8, llada_model.cfg, steps=8, block_length=8)
    ref = generate(llada_model, [[1, 2, 3]], gen_length=8, schedule=sched)
    assert toks == [str(int(t)) for t in ref.generated[0]]
    assert "using 2 of 8 devices" in r.stderr
