"""Efficiency benchmark: outputs of the quick preset's core, the analytic cost model, trace replay, the AR and
block-diffusion baselines (cached == recompute), and OOM handling."""

import json

import jax
import numpy as np
import pytest

from dllm_jax import bench
from dllm_jax.engine.ar import ar_config, ar_schedule, block_config, block_diffusion_schedule
from dllm_jax.engine.replay import replay_schedule
from dllm_jax.generate import generate
from dllm_jax.model import Model
from dllm_jax.models import transformer
from dllm_jax.models.config import ModelConfig
from dllm_jax.presets import make_schedule

PEAK = {"flops": 1e10, "bw": 1e10, "dtype": "float32"}


def _prompts(n, length, seed=0, hi=280):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, hi, length).tolist() for _ in range(n)]


def _small_cfg(**kw):
    d = dict(family="llada", vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=16,
             mlp_hidden=64, rope_theta=1e4, norm_eps=1e-5, qkv_bias=False, mask_token_id=63, eos_token_id=62,
             pad_token_id=62, max_seq_len=512)
    d.update(kw)
    return ModelConfig(**d)


def test_quick_core_writes_json_markdown_png(tmp_path, fixtures):
    out = tmp_path / "bench"
    rc = bench.main(["--preset", "quick", "--model", str(fixtures / "llada_tiny"), "--gen-lengths", "16", "--batch-sizes", "1", "--prompts", "12",
                     "--schedules", "dual_threshold,ar", "--block-length", "16", "--repeats", "1",
                     "--project", "100m", "--no-progress", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "bench.json").read_text())
    assert [p["method"] for p in res["points"]] == ["dual_threshold", "ar"]
    for p in res["points"]:
        assert p["status"] == "ok" and p["tok_s"] > 0 and p["flops_total"] > 0 and p["nfe_source"] == "native"
        assert p["tokens"] == 16 and p["tpf"] == pytest.approx(16 / p["nfe_mean"])
    ar = res["points"][1]
    assert ar["nfe"] == [16] and ar["iteration_kinds"] == {"full": 1, "window": 15, "mixed": 0}
    assert ar["window_width"] == 1 and ar["attention"] == "causal"
    assert res["projections"]["100m"][0]["bound_tok_s"]["H100 SXM"] > 0
    md = (out / "summary.md").read_text()
    assert "Counting" in md and "| ar |" in md and "Roofline bounds for 100m" in md
    assert len(res["plots"]) == 3
    for f in res["plots"]:
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_forward_flops_and_bytes_by_hand():
    cfg = _small_cfg(vocab_size=10, d_model=8, n_heads=2, n_kv_heads=1, head_dim=4, mlp_hidden=16)
    B, T, S = 3, 5, 7
    # per token per layer: q (8x8) + k, v (8x4 each) + o (8x8) + gate, up, down (8x16 each) multiply-adds
    lin = 2 * (64 + 32 + 32 + 64 + 3 * 128)  # 1152
    attn = 4 * T * S * 2 * 4  # QK^T and PV over 2 heads of 4
    head = T * 2 * 8 * 10
    c = bench.forward_cost(cfg, B, T, S, wbytes=4)
    assert c.flops == B * (2 * (T * lin + attn) + head) == 43680
    # weights without the embedding table: 2 x (592 per layer: 576 matmul + 16 norm) + final norm 8 + lm head 80
    weights = (2 * 592 + 8 + 80) * 4
    emb_rows = B * T * 8 * 4
    kv = 2 * B * 2 * 1 * 4 * (T + S) * 4  # layers x rows x (K, V) x kv heads x head_dim x (written + read) x bytes
    logits = B * T * 10 * 4
    assert c.bytes == weights + emb_rows + kv + logits == 8472
    assert bench.param_count(cfg) == 2 * 592 + 8 + 2 * 80


def test_forward_flops_match_xla_cost_analysis():
    cfg = _small_cfg(vocab_size=256, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, mlp_hidden=128)
    params = transformer.init_params(cfg, jax.random.key(0))
    tok = jax.numpy.zeros((2, 48), jax.numpy.int32)
    ca = jax.jit(lambda p, t: transformer.forward(p, cfg, t)).lower(params, tok).compile().cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    if not ca or "flops" not in ca:
        pytest.skip("no XLA cost analysis on this backend")
    ours = bench.forward_cost(cfg, 2, 48, 48).flops
    assert 0.9 < ca["flops"] / ours < 1.1  # XLA also counts elementwise ops; matmuls dominate


def test_iteration_kinds_and_run_costs():
    trace = {"full": np.array([[True, True], [False, True], [False, False], [True, False]])}
    kinds = bench.iteration_kinds(trace, np.array([4, 3]), 4, has_cache=True)
    # it 0 both refresh: full; it 1 rows disagree: both forwards; it 2 window; it 3 only live row 0 refreshes: full
    assert kinds == {"full": 2, "window": 1, "mixed": 1}
    cfg = _small_cfg()
    c = bench.run_costs(cfg, 2, 40, 8, {"full": 1, "window": 2, "mixed": 1})
    f, w = bench.forward_cost(cfg, 2, 40, 40), bench.forward_cost(cfg, 2, 8, 40)
    assert c["total"].flops == 2 * f.flops + 3 * w.flops


def test_head_rows_and_window_widths_in_the_cost_model():
    cfg = _small_cfg(vocab_size=10, d_model=8, n_heads=2, n_kv_heads=1, head_dim=4, mlp_hidden=16)
    full, part = bench.forward_cost(cfg, 3, 5, 7), bench.forward_cost(cfg, 3, 5, 7, head_rows=2)
    assert full.flops - part.flops == 3 * 3 * 2 * 8 * 10  # 3 rows of 3 fewer head rows
    assert full.bytes - part.bytes == 3 * 3 * 10 * 4  # and their float32 logits
    # a prefix cache over widths (16, 32): iterations whose live rows all have s >= L - 16 take 16 rows
    trace = {"full": np.array([[True, True], [False, False], [False, False], [False, False]]),
             "s": np.array([[8, 8], [8, 24], [24, 24], [24, 30]])}
    w = bench.mean_window_width(trace, np.array([4, 3]), 4, (16, 32), 40)
    # it 1: needs 32; it 2: both rows need 16; it 3: only row 0 is live (s 24) -> 16
    assert w == (32 + 16 + 16) / 3
    assert bench.mean_window_width(trace, np.array([4, 3]), 4, (32,), 40) == 32.0


def test_head_width_follows_the_schedule(llada_model):
    from dllm_jax.engine.context import Ctx
    from dllm_jax.engine.loop import head_width
    from dllm_jax.presets import make_schedule

    cfg = llada_model.cfg
    ctx = Ctx(batch=1, prompt_len=32, gen_length=32, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id,
              pad_id=cfg.pad_token_id)
    sched = make_schedule("fastdllm", 32, cfg, block_length=8)
    assert head_width(sched, cfg, ctx, 64) == 8
    assert head_width(sched.replace(head_rows="all"), cfg, ctx, 64) == 64
    assert head_width(make_schedule("llada", 32, cfg, steps=32, block_length=8, temperature=0.5), cfg, ctx, 64) == 64


@pytest.mark.parametrize("preset,kw", [
    ("fastdllm_dual", dict(block_length=8, threshold=0.7)),
    ("fastdllm", dict(block_length=8, threshold=0.7)),
])
def test_trace_replay_reproduces_recorded_nfe(llada_model, preset, kw):
    sched = make_schedule(preset, 32, llada_model.cfg, **kw)
    rec = generate(llada_model, _prompts(2, 20), gen_length=32, schedule=sched, trace=True)
    assert len(set(rec.nfe.tolist())) > 1 or rec.nfe[0] < 32  # a real parallel pattern, not one token per step
    cfg = _small_cfg()
    rand = Model(cfg, transformer.init_params(cfg, jax.random.key(1)))
    rep_sched = replay_schedule(sched, rec.trace, rec.nfe)
    rep = generate(rand, _prompts(3, 20, seed=5, hi=60), gen_length=32, schedule=rep_sched, trace=True)
    np.testing.assert_array_equal(rep.nfe, [rec.nfe[0], rec.nfe[1], rec.nfe[0]])
    for b, r in ((0, 0), (1, 1), (2, 0)):
        n = int(rec.nfe[r])
        np.testing.assert_array_equal(rep.trace["n"][:n, b], rec.trace["n"][:n, r])
        np.testing.assert_array_equal(rep.trace["full"][:n, b], rec.trace["full"][:n, r])
    assert not rep.unfinished.any()


def test_bench_replays_threshold_on_random_weights(llada_model):
    cfg = _small_cfg()
    b = bench.Bench(model=Model(cfg, transformer.init_params(cfg, jax.random.key(2))), weights="random:test",
                    random_weights=True, peak_name="test", peak=PEAK, repeats=1, replay_model=llada_model,
                    replay_label="tiny", replay_rows=2)
    m = bench.make_method("dual_threshold", block_length=8)
    p = b.point(m, 16, "short", 10, 2)
    trace, nfe = b._recorded(m, 16, 10)
    assert p["status"] == "ok" and p["nfe_source"].startswith("replay of tiny")
    assert p["nfe"] == [int(v) for v in nfe[:2]]
    v = b.point(bench.make_method("vanilla", block_length=8), 16, "short", 10, 1)
    assert v["nfe_source"] == "native" and v["nfe"] == [16]


def test_ar_kv_cache_equals_full_recompute(llada_model):
    m = Model(ar_config(llada_model.cfg), llada_model.params)
    prompts = _prompts(2, 17)
    cached = generate(m, prompts, gen_length=24, schedule=ar_schedule(24))
    full = generate(m, prompts, gen_length=24, schedule=ar_schedule(24, cache=False))
    np.testing.assert_array_equal(cached.sequences, full.sequences)
    np.testing.assert_array_equal(cached.nfe, [24, 24])


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_block_kv_cache_equals_full_recompute(llada_model, threshold):
    m = Model(block_config(llada_model.cfg, 8), llada_model.params)
    prompts = _prompts(2, 20)
    cached = generate(m, prompts, gen_length=32, schedule=block_diffusion_schedule(32, 8, threshold=threshold))
    full = generate(m, prompts, gen_length=32,
                    schedule=block_diffusion_schedule(32, 8, threshold=threshold, cache=False))
    np.testing.assert_array_equal(cached.sequences, full.sequences)
    np.testing.assert_array_equal(cached.nfe, full.nfe + 3)  # one clean-K/V forward per block but the last
    if threshold is None:
        np.testing.assert_array_equal(full.nfe, [32, 32])


def test_oom_is_recorded_and_larger_batches_skipped(llada_model, monkeypatch):
    real = bench._generate

    def fake(model, prompts, gen_length, schedule):
        if len(prompts) >= 2:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes.")
        return real(model, prompts, gen_length, schedule)

    monkeypatch.setattr(bench, "_generate", fake)
    b = bench.Bench(model=llada_model, weights="checkpoint:tiny", random_weights=False, peak_name="test",
                    peak=PEAK, repeats=1)
    methods = {"ar": bench.make_method("ar")}
    pts = bench.run_grid(b, bench.grid([16], ["short"], [1, 2, 4], ["ar"]), methods, {"short": 10},
                         progress=False)
    assert [(p["batch"], p["status"]) for p in pts] == [(1, "ok"), (2, "oom"), (4, "skipped")]
    assert "RESOURCE_EXHAUSTED" in pts[1]["error"]
    md = bench.markdown({"machine": {"name": "t", "platform": "cpu", "device_count": 1, "jax": "x"},
                         "peak": PEAK, "peak_name": "t", "weights": "w", "params": 1e6, "dtype": "float32",
                         "schedules": ["ar"], "block_length": 32, "threshold": 0.9, "grid": "product", "repeats": 1,
                         "nfe_note": "native", "wall_s": 1.0, "points": pts})
    assert "**oom**" in md and "**skipped**" in md

    monkeypatch.setattr(bench, "_generate", lambda *a: pytest.fail("a predicted OOM must not run"))
    b.mem_limit = 1.0
    p = b.point(methods["ar"], 16, "short", 10, 1)
    assert p["status"] == "oom" and p["error"].startswith("predicted")


def test_grid_star_and_errors():
    g = bench.grid([64, 128, 256], ["short", "long"], [4, 1], ["ar"], kind="star")
    batches = {(p, gl): bs for p, gl, _, bs in g}
    assert batches[("short", 128)] == [1, 4] and batches[("long", 128)] == [1] and batches[("short", 64)] == [1]
    with pytest.raises(ValueError, match="unknown schedule"):
        bench.make_method("nope")
    with pytest.raises(ValueError, match="unknown shape"):
        bench.shape_config("nope")
    assert 80e6 < bench.param_count(bench.shape_config("100m")) < 120e6
    assert 7.5e9 < bench.param_count(bench.shape_config("llada-8b")) < 8.5e9


def test_task_prompts_for_the_embedded_model():
    from dllm_jax.tokenizer import CharTokenizer

    rows = bench.make_prompts(None, 3, 40, 0, source="tasks")
    assert rows == bench.make_prompts(None, 3, 40, 0, source="tasks") and len(rows) == 3
    tok = CharTokenizer()
    assert all(r[:2] == [tok.bos_id, tok.vocab["<|user|>"]] and len(r) <= 64 for r in rows)
    assert tok.decode(rows[0], skip_special_tokens=True).startswith("Sort the digits: ")
    with pytest.raises(ValueError, match="do not fit"):
        bench.task_prompts(2, 8, 0)
