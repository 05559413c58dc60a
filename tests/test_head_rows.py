"""The LM head only where a schedule reads (`Schedule.head_rows="masked"`, the default: the still-masked rows of the
window where every decision reads masked positions only, else "window": the window's rows) gives the same tokens and
NFE as the head over every position ("all", the reference codes' work), for the windows that declare the bound, with
left-padded rows of different prompt lengths, for the shifted-logits family (Dream) and through a prefix-cache window
wider than the block; and the cache keeps rotated keys (a cached window forward equals the full forward)."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dllm_jax.engine.loop import Schedule, _masked_head_stats, _span_rows, head_masked, head_span, masked_head_widths
from dllm_jax.engine.sampling import TokenSampler, token_stats
from dllm_jax.models import transformer
from dllm_jax.presets import make_schedule

G = importlib.import_module("dllm_jax.generate")
PROMPTS = [[11, 23, 5, 77, 100, 3, 42, 9], [7, 8, 9, 10, 12]]
GEN = 32

# (fixture, preset, kwargs, masked rows only?): AdaBlock's resolve reads predicted delimiters at filled positions,
# dInfer's credit rule processes every computed row's logits: window rows there; Dream's shifted rows (position p
# reads row p - 1, a slice's first position its own row) are picked by the positions they serve
CASES = [
    ("llada_model", "llada", dict(steps=32, block_length=8), True),
    ("llada_model", "fastdllm", dict(block_length=8, threshold=0.5), True),
    ("llada_model", "fastdllm_prefix", dict(block_length=8, threshold=0.5), True),
    ("llada_model", "fastdllm_dual", dict(block_length=8, threshold=0.5), True),
    ("llada_model", "entropy_elastic", dict(), True),
    ("llada_model", "adablock", dict(), False),
    ("llada_model", "dinfer_credit", dict(), False),
    ("dream_model", "dream", dict(steps=32), True),
    ("dream_model", "fastdllm_dream_prefix", dict(block_length=8, threshold=0.5), True),
    ("dream_model", "fastdllm_dream_dual", dict(block_length=8, threshold=0.5), True),
]


def _run(model, sched):
    out = G.generate(model, PROMPTS, gen_length=GEN, schedule=sched)
    return np.asarray(out.sequences), np.asarray(out.nfe)


@pytest.mark.parametrize("fixture,preset,kw,masked", CASES, ids=[c[1] for c in CASES])
def test_head_rows_window_equals_all(request, fixture, preset, kw, masked):
    model = request.getfixturevalue(fixture)
    sched = make_schedule(preset, GEN, model.cfg, **kw)
    assert sched.head_rows == "masked" and head_masked(sched, model.cfg) is masked
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


def test_masked_head_stats_equal_the_window_head_at_masked_rows(llada_model):
    """The masked-rows head: at every masked row the token and confidence of the head over all rows, for rows with
    0, 1, some and all rows masked (each count picks another compiled width); other rows keep their token at -inf."""
    cfg, params = llada_model.cfg, llada_model.params
    Wh, mask = 16, cfg.mask_token_id
    assert masked_head_widths(Wh) == (2, 4, 8, 16) and masked_head_widths(3) == (1, 2, 3)
    sched = Schedule(window=None, accept=None, sampler=TokenSampler())
    ctx = type("C", (), {"mask_id": mask})()
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(4, Wh, cfg.d_model)), jnp.float32)
    ref_x0, ref_conf = token_stats(sched.sampler, transformer.head_rows(params, cfg, h))
    for counts in ([0, 1, 0, 2], [3, 0, 5, 1], [16, 2, 9, 0], [7, 8, 8, 1]):
        rows = np.full((4, Wh), 5, np.int32)
        for b, n in enumerate(counts):
            rows[b, rng.choice(Wh, n, replace=False)] = mask
        x0, conf = _masked_head_stats(params, cfg, sched, ctx, h, jnp.asarray(rows))
        x0, conf = np.asarray(x0), np.asarray(conf)
        m = rows == mask
        np.testing.assert_array_equal(x0[m], np.asarray(ref_x0)[m])
        # equal up to float32 rounding: XLA:CPU's matmul blocks differently for another row count (1e-6 relative)
        np.testing.assert_allclose(conf[m], np.asarray(ref_conf)[m], rtol=2e-5, atol=1e-6)
        computed = np.isfinite(conf)
        K = min(w for w in masked_head_widths(Wh) if w >= max(counts))  # the smallest width holding every row
        assert (computed.sum(1) == K).all(), (counts, computed.sum(1))
        np.testing.assert_array_equal(x0[~computed], rows[~computed])


def test_unknown_head_rows_is_a_clear_error(llada_model):
    sched = make_schedule("fastdllm", GEN, llada_model.cfg, block_length=8).replace(head_rows="rows")
    with pytest.raises(ValueError, match="head_rows='rows': expected one of"):
        G.generate(llada_model, PROMPTS, gen_length=GEN, schedule=sched)


def test_vocab_argmax_and_row_dot_match_the_plain_reductions():
    import jax.numpy as jnp
    import numpy as np

    from dllm_jax.engine.sampling import row_dot, vocab_argmax

    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, size=(3, 7, 50)).astype(np.float32)  # many ties: the first maximum must win
    x[0, 0] = -np.inf  # a row of -inf: index 0, as argmax
    x[1, 2, 10:] = np.inf
    assert np.array_equal(np.asarray(vocab_argmax(jnp.asarray(x))), np.argmax(x, axis=-1))
    a, b = rng.random((2, 5, 300)).astype(np.float32), rng.random((2, 5, 300)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(row_dot(jnp.asarray(a), jnp.asarray(b))), (a * b).sum(-1), rtol=1e-5)


# Block diffusion (Fast-dLLM v2, SDAR): every read is a candidate of the current sub-block (or the next block's first
# position), so the head runs on the sub-block's rows (+1 for v2's shifted logits) of each block forward
BLOCK_CASES = [
    ("fastdllm_v2_tiny", "fastdllm_v2", dict(small_block_size=8), [[11, 23, 5, 77, 100, 3, 42, 9] * 5], "left"),
    ("fastdllm_v2_tiny", "fastdllm_v2", dict(small_block_size=4, use_block_cache=True),
     [[11, 23, 5, 77, 100, 3, 42, 9] * 5], "left"),
    ("fastdllm_v2_tiny", "fastdllm_v2_batch", dict(small_block_size=8), [[11, 23, 5] * 12, [7, 8, 9, 10] * 7],
     "right_masked"),
    ("sdar_tiny", "sdar", dict(block_length=8), [[11, 23, 5, 77, 100, 3, 42, 9, 6, 5]], "left"),
]


@pytest.mark.parametrize("ckpt,preset,kw,prompts,layout", BLOCK_CASES,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(BLOCK_CASES)])
def test_block_diffusion_head_on_the_sub_block_equals_all(fixtures, ckpt, preset, kw, prompts, layout):
    import dllm_jax
    from dllm_jax.engine.block_runner import generate_blocks
    from dllm_jax.engine.context import Ctx

    model = dllm_jax.load(str(fixtures / ckpt))
    sched = make_schedule(preset, 48, model.cfg, **kw)
    win = sched.window
    ctx = Ctx(batch=1, prompt_len=40, gen_length=48, mask_id=model.cfg.mask_token_id, eos_id=model.cfg.eos_token_id,
              pad_id=model.cfg.pad_token_id)
    span = head_span(sched, ctx, {"s": jnp.zeros((1,), jnp.int32)})
    assert span is not None and span[1] == win._sbs(), (preset, span)
    if win.sub_block and win.sub_block < win.block_size:  # v2: narrower than the block forward (SDAR: the block)
        assert span[1] < win.max_width(ctx)
    fast = generate_blocks(model, prompts, schedule=sched, layout=layout)
    ref = generate_blocks(model, prompts, schedule=sched.replace(head_rows="all"), layout=layout)
    assert [s.tolist() for s in fast.sequences] == [s.tolist() for s in ref.sequences]
    assert fast.nfe == ref.nfe and fast.nfe > 3
