"""The LM head only where a schedule reads (`Schedule.head_rows="window"`, the default) gives the same tokens and NFE
as the head over every position ("all", the reference codes' work), for the windows that declare the bound, with
left-padded rows of different prompt lengths, for the shifted-logits family (Dream) and through a prefix-cache window
wider than the block; and the cache keeps rotated keys (a cached window forward equals the full forward)."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dllm_jax.engine.loop import _span_rows, head_span
from dllm_jax.models import transformer
from dllm_jax.presets import make_schedule

G = importlib.import_module("dllm_jax.generate")
PROMPTS = [[11, 23, 5, 77, 100, 3, 42, 9], [7, 8, 9, 10, 12]]
GEN = 32

CASES = [
    ("llada_model", "llada", dict(steps=32, block_length=8)),
    ("llada_model", "fastdllm", dict(block_length=8, threshold=0.5)),
    ("llada_model", "fastdllm_prefix", dict(block_length=8, threshold=0.5)),
    ("llada_model", "fastdllm_dual", dict(block_length=8, threshold=0.5)),
    ("llada_model", "entropy_elastic", dict()),
    ("llada_model", "adablock", dict()),
    ("llada_model", "dinfer_credit", dict()),
    ("dream_model", "dream", dict(steps=32)),
    ("dream_model", "fastdllm_dream_prefix", dict(block_length=8, threshold=0.5)),
    ("dream_model", "fastdllm_dream_dual", dict(block_length=8, threshold=0.5)),
]


def _run(model, sched):
    out = G.generate(model, PROMPTS, gen_length=GEN, schedule=sched)
    return np.asarray(out.sequences), np.asarray(out.nfe)


@pytest.mark.parametrize("fixture,preset,kw", CASES, ids=[c[1] for c in CASES])
def test_head_rows_window_equals_all(request, fixture, preset, kw):
    model = request.getfixturevalue(fixture)
    sched = make_schedule(preset, GEN, model.cfg, **kw)
    assert sched.head_rows == "window"
    # the fast path is really taken: a span narrower than the canvas
    ctx, x, *_ = G.prepare(model, PROMPTS, GEN, sched)
    w = sched.window.init(ctx, x)
    span = head_span(sched, ctx, w)
    assert span is not None, f"{preset}: no head span (the LM head would run on the whole canvas)"
    a, Wh = _span_rows(model.cfg, span, jnp.zeros((ctx.batch,), jnp.int32), ctx.total_len)
    assert Wh is not None and Wh < ctx.total_len
    fast = _run(model, sched)
    ref = _run(model, sched.replace(head_rows="all"))
    np.testing.assert_array_equal(fast[0], ref[0])
    np.testing.assert_array_equal(fast[1], ref[1])


def test_no_span_where_reads_are_unbounded(llada_model):
    # random draws are shaped by the rows computed; DSB's cache widens candidates; BlockBatch reads every row
    for preset, kw in [("llada", dict(steps=32, block_length=8, temperature=0.5)), ("dsb_cache", {}),
                       ("blockbatch", {})]:
        sched = make_schedule(preset, GEN, llada_model.cfg, **kw)
        prompts = [PROMPTS[0]] * 4 if preset == "blockbatch" else PROMPTS  # one row per BlockBatch branch
        ctx, x, *_ = G.prepare(llada_model, prompts, GEN, sched)
        assert head_span(sched, ctx, sched.window.init(ctx, x)) is None, preset


def test_cache_holds_rotated_keys_and_window_forward_matches_full(llada_model):
    cfg, params = llada_model.cfg, llada_model.params
    B, T = 2, 24
    tokens = jax.random.randint(jax.random.key(1), (B, T), 3, cfg.vocab_size - 1)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)) + jnp.asarray([[0], [5]], jnp.int32)
    valid = jnp.ones((B, T), bool)
    logits, kv = transformer.forward(params, cfg, tokens, pos, valid)
    # layer 0's cached keys are the projected keys rotated at their positions
    h = transformer.rms_norm(transformer._embed(params, tokens), params["layers"]["attn_norm"][0], cfg.norm_eps)
    lp0 = jax.tree.map(lambda a: a[0], params["layers"])
    _, k_raw, _ = transformer._qkv(cfg, lp0, h)
    np.testing.assert_allclose(np.asarray(kv["k"][0]), np.asarray(transformer.rope(k_raw, pos, cfg)), atol=1e-5, rtol=1e-5)
    # a window forward over cached rotated keys recomputes rows [8, 16) exactly as the full forward did
    W, start = 8, jnp.asarray([8, 8], jnp.int32)
    win_logits, kv2 = transformer.forward_window(params, cfg, tokens[:, 8:16], start, jnp.ones((B, W), bool), kv,
                                                 pos, valid)
    np.testing.assert_allclose(np.asarray(win_logits), np.asarray(logits[:, 8:16]), atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(kv2["k"]), np.asarray(kv["k"]), atol=1e-5, rtol=1e-5)
    # head rows: the logits of rows [3, 7) of each row only
    part, _ = transformer.forward(params, cfg, tokens, pos, valid, head_start=jnp.asarray([3, 10], jnp.int32),
                                  head_width=4)
    assert part.shape == (B, 4, cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(part[0]), np.asarray(logits[0, 3:7]), atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(part[1]), np.asarray(logits[1, 10:14]), atol=2e-4, rtol=1e-4)
