"""LocalLeap, dInfer hierarchical + vicinity cache, the entropy-elastic window and OSDT calibration."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dllm_jax.engine.context import Ctx
from dllm_jax.engine.dinfer import Hierarchical, run_ids
from dllm_jax.engine.elastic import EntropyElastic
from dllm_jax.engine.localleap import LocalLeap, dilate
from dllm_jax.engine.loop import make_loop
from dllm_jax.engine import osdt
from dllm_jax.presets import PresetError, make_schedule

G = importlib.import_module("dllm_jax.generate")
PROMPT = [11, 23, 5, 77, 100, 3, 42, 9]
CTX = Ctx(batch=1, prompt_len=2, gen_length=8, mask_id=0, eos_id=1, pad_id=1)


def test_dilate_and_localleap_rule():
    anchors = jnp.array([[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(np.asarray(dilate(anchors, 2))[0], [0, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    conf = jnp.array([[0.1, 0.8, 0.8, 0.95, 0.7, 0.8, 0.8, 0.5, 0.85, 0.2]], jnp.float32)
    cand = jnp.ones((1, 10), bool)
    commit, _ = LocalLeap(threshold=0.9, relaxed=0.75, radius=2).select({}, CTX, conf, cand, None)
    # anchor 3; within radius 2 and >= 0.75: 1, 2, 5; position 8 (0.85) is too far; position 4 (0.7) too low
    np.testing.assert_array_equal(np.asarray(commit)[0], [0, 1, 1, 1, 0, 1, 0, 0, 0, 0])


def test_hierarchical_runs():
    cand = jnp.array([[0, 1, 1, 1, 0, 0, 1, 1, 0, 1]], bool)
    np.testing.assert_array_equal(np.asarray(run_ids(cand))[0], [0, 1, 1, 1, 0, 0, 2, 2, 0, 3])
    conf = jnp.array([[0.99, 0.3, 0.5, 0.45, 0.0, 0.0, 0.35, 0.2, 0.0, 0.41]], jnp.float32)
    conf = jnp.where(cand, conf, -jnp.inf)
    commit, _ = Hierarchical(threshold=0.9, run_threshold=0.4).select({}, CTX, conf, cand, None)
    # run 1 best = pos 2 (0.5 > 0.4); run 2 best 0.35 < 0.4 -> none; run 3 = pos 9 (0.41); global argmax is pos 2
    np.testing.assert_array_equal(np.asarray(commit)[0], [0, 0, 1, 0, 0, 0, 0, 0, 0, 1])


def test_elastic_window_width():
    ctx = Ctx(batch=2, prompt_len=2, gen_length=10, mask_id=0, eos_id=1, pad_id=1)
    x = jnp.array([[5, 5, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0], [5, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], jnp.int32)
    conf = jnp.array([[0, 0, 0, .9, .9, .9, .9, .9, .9, .2, .9, .9],
                      [0, 0, .2, .2, .2, .2, .9, .9, .9, .9, .9, .9]], jnp.float32)
    win = EntropyElastic(budget=0.55, min_size=2, max_size=8)
    st = win.resolve(win.init(ctx, x), ctx, x, x, conf, jnp.ones(2, bool))
    # row 0: s=3, five 0.1's fit a 0.55 budget (0.5), the sixth would not -> width 5
    # row 1: s=2, the first 0.8 alone exceeds 0.55 -> min_size 2
    np.testing.assert_array_equal(np.asarray(st["s"]), [3, 2])
    np.testing.assert_array_equal(np.asarray(st["e"]), [8, 4])


def _step_and_check(model, sched, prompts, gen_length):
    """Run the loop from Python; committed tokens never change, it ends within max_nfe with no mask left."""
    ctx, x, valid, pos, keys = G.prepare(model, prompts, gen_length, sched)
    carry, cond, body = make_loop(model.params, model.cfg, sched, ctx, x, valid, pos, keys)
    body = jax.jit(body)
    prev = np.asarray(carry["x"])
    n = 0
    while bool(cond(carry)):
        carry = body(carry)
        cur = np.asarray(carry["x"])
        fixed = prev != model.cfg.mask_token_id
        assert np.array_equal(cur[fixed], prev[fixed]), "a committed token changed"
        prev = cur
        n += 1
    assert not np.asarray(carry["active"]).any(), "did not finish within its NFE bound"
    assert not (prev[:, ctx.prompt_len:] == model.cfg.mask_token_id).any()
    return prev, np.asarray(carry["nfe"])


NEW = [
    ("localleap", dict(block_length=8, threshold=0.9, relaxed=0.6, radius=2)),
    ("localleap", dict(block_length=8, threshold=0.8, cache="dual")),
    ("dinfer_hierarchical", dict(block_length=8, threshold=0.9, prefix_look=4, after_look=4)),
    ("dinfer_hierarchical", dict(block_length=8, threshold=0.9, prefix_look=4, after_look=4, refresh_every=2)),
    ("dinfer_credit", dict(block_length=8, threshold=0.6, prefix_look=4, after_look=4)),
    ("dinfer_credit", dict(block_length=8, threshold=0.6, cache="dual")),
    ("entropy_elastic", dict(budget=1.0, min_size=2, max_size=12)),
    ("entropy_elastic", dict(budget=0.5, min_size=2, max_size=12)),
    ("osdt", dict(thresholds=[0.7, 0.95], block_length=8)),
    ("d2f", dict(block_length=4, tau_add=0.25, tau_act=0.75, tau_conf=0.9)),
]


@pytest.mark.parametrize("preset,kw", NEW)
def test_properties_and_batch_invariance(llada_model, preset, kw):
    sched = make_schedule(preset, 16, llada_model.cfg, **kw)
    prompts = [PROMPT, PROMPT[3:]]
    x, nfe = _step_and_check(llada_model, sched, prompts, 16)
    assert (nfe <= 16 * 2 + 2).all()
    for b, p in enumerate(prompts):
        single = G.generate(llada_model, [p], gen_length=16, schedule=sched)
        np.testing.assert_array_equal(x[b, -16:], single.generated[0])
        assert single.nfe[0] == nfe[b]


def test_localleap_commits_more_than_plain_threshold(llada_model):
    th = make_schedule("fastdllm", 32, llada_model.cfg, block_length=8, threshold=0.9)
    ll = make_schedule("localleap", 32, llada_model.cfg, block_length=8, threshold=0.9, relaxed=0.5, radius=4)
    a = G.generate(llada_model, [PROMPT], gen_length=32, schedule=th)
    b = G.generate(llada_model, [PROMPT], gen_length=32, schedule=ll)
    assert b.nfe[0] <= a.nfe[0]


def test_osdt_uniform_thresholds_equal_fastdllm(llada_model):
    ref = make_schedule("fastdllm_dual", 32, llada_model.cfg, block_length=8, threshold=0.8)
    same = make_schedule("osdt", 32, llada_model.cfg, thresholds=[0.8] * 4, block_length=8, cache="dual")
    a = G.generate(llada_model, [PROMPT], gen_length=32, schedule=ref)
    b = G.generate(llada_model, [PROMPT], gen_length=32, schedule=same)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    assert a.nfe[0] == b.nfe[0]


def test_osdt_calibrate_save_load_reuse(llada_model, tmp_path):
    cal = osdt.calibrate(llada_model, PROMPT, 32, block_length=8, base_threshold=0.9, lo=0.5, hi=0.95)
    assert len(cal["thresholds"]) == 4 and sum(cal["committed_per_block"]) == 32
    assert all(0.5 <= t <= 0.95 for t in cal["thresholds"])
    path = str(tmp_path / "cal.json")
    osdt.save(cal, path)
    sched = make_schedule("osdt", 32, llada_model.cfg, calibration=path)
    out = G.generate(llada_model, [PROMPT], gen_length=32, schedule=sched)
    assert not (out.generated == llada_model.cfg.mask_token_id).any()
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not an OSDT calibration file"):
        make_schedule("osdt", 32, llada_model.cfg, calibration=str(bad))
    with pytest.raises(PresetError, match="needs thresholds"):
        make_schedule("osdt", 32, llada_model.cfg)
    with pytest.raises(PresetError, match="not both"):
        make_schedule("osdt", 32, llada_model.cfg, calibration=path, thresholds=[0.9] * 4)
    with pytest.raises(PresetError, match="differs from the calibration"):
        make_schedule("osdt", 32, llada_model.cfg, calibration=path, block_length=16)


@pytest.mark.parametrize("preset", ["dinfer_hierarchical", "dinfer_credit"])
@pytest.mark.parametrize("kw", [dict(prefix_look=-1), dict(after_look=-2), dict(refresh_every=-1)])
def test_dinfer_look_arguments_checked(llada_model, preset, kw):
    with pytest.raises(PresetError, match="must be >= 0"):
        make_schedule(preset, 16, llada_model.cfg, block_length=8, **kw)


def test_new_policy_argument_errors(llada_model):
    with pytest.raises(G.ScheduleError, match="relaxed"):
        G.generate(llada_model, [PROMPT], gen_length=16,
                   schedule=make_schedule("localleap", 16, llada_model.cfg, block_length=8, relaxed=0.95,
                                          threshold=0.9))
    for cache in ("dual", "prefix"):
        with pytest.raises(PresetError, match="without a KV cache"):
            make_schedule("entropy_elastic", 16, llada_model.cfg, cache=cache)
    with pytest.raises(G.ScheduleError, match="min_size"):
        G.generate(llada_model, [PROMPT], gen_length=16,
                   schedule=make_schedule("entropy_elastic", 16, llada_model.cfg, min_size=9, max_size=4))


def test_d2f_runs_blocks_in_parallel(llada_model):
    """With tau_add 0 every block is added at once: the trace shows windows wider than one block, and NFE drops
    below the one-block-at-a-time threshold schedule's."""
    sched = make_schedule("d2f", 32, llada_model.cfg, block_length=8, tau_add=0.0, tau_act=0.0, tau_conf=0.9)
    out = G.generate(llada_model, [PROMPT], gen_length=32, schedule=sched, trace=True)
    n = int(out.nfe[0])
    widths = out.trace["e"][:n, 0] - out.trace["s"][:n, 0]
    assert widths.max() > 8
    # one block is added per forward at most (the official pipeline's rule), even with tau_add = 0
    assert np.all(np.diff(out.trace["e"][:n, 0]) <= 8)
    base = make_schedule("fastdllm", 32, llada_model.cfg, block_length=8, threshold=0.9)
    assert n <= G.generate(llada_model, [PROMPT], gen_length=32, schedule=base).nfe[0]


def test_d2f_block_causal_mode_matches_growing_sequence(llada_model):
    """Under block-causal attention a block never sees a later one, so the first blocks of a generation do not
    depend on how many blocks follow (the official pipeline grows the sequence block by block)."""
    bc = llada_model.with_block_causal(8)
    kw = dict(block_length=8, tau_add=0.5, tau_act=0.5, tau_conf=0.6, attention="block_causal", eos_early_stop=False)
    short = G.generate(bc, [PROMPT], gen_length=16, schedule=make_schedule("d2f", 16, bc.cfg, **kw))
    long = G.generate(bc, [PROMPT], gen_length=32, schedule=make_schedule("d2f", 32, bc.cfg, **kw))
    assert short.prompt_len == long.prompt_len
    np.testing.assert_array_equal(long.generated[0, :16], short.generated[0])
    assert not (long.generated == llada_model.cfg.mask_token_id).any()
    # the mode must match the model's attention
    with pytest.raises(PresetError, match="with_block_causal"):
        make_schedule("d2f", 16, llada_model.cfg, **kw)
    with pytest.raises(PresetError, match="attention='block_causal'"):
        make_schedule("d2f", 16, bc.cfg, block_length=8)
    with pytest.raises(G.ScheduleError, match="multiple of block_length"):
        bc24 = llada_model.with_block_causal(24)
        G.generate(bc24, [PROMPT], gen_length=48,
                   schedule=make_schedule("d2f", 48, bc24.cfg, **{**kw, "block_length": 24}))


def _dinfer_credit_reference(model, prompt, gen_length, block_length, threshold, alpha=0.7, boost=0.2, decay=0.8):
    """dInfer's BlockWise loop with CreditThresholdParallelDecoder, no cache, written densely in numpy: one full
    forward per step, a dense [block, V] credit matrix per block (decayed after the block's first decode), fused
    logits logits + alpha log(1 + C), then the threshold rule on the fused probabilities (+ the most confident)."""
    mask = model.cfg.mask_token_id
    x = np.array(list(prompt) + [mask] * gen_length)
    P, nfe = len(prompt), 0
    for b0 in range(P, P + gen_length, block_length):
        blk = slice(b0, b0 + block_length)
        mat, it = None, 0
        while (x[blk] == mask).any():
            logits = np.asarray(model.logits(x[None]))[0, blk].astype(np.float64)
            nfe += 1
            m = x[blk] == mask
            mat = np.zeros_like(logits) if mat is None else mat * (decay if it > 0 else 1.0)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            top = probs.argmax(-1)
            mat[np.arange(len(top)), top] += np.where(m, probs.max(-1) ** boost, 0.0)
            fused = logits + alpha * np.log1p(mat)
            fp = np.exp(fused - fused.max(-1, keepdims=True))
            fp /= fp.sum(-1, keepdims=True)
            x0, conf = fused.argmax(-1), fp.max(-1)
            conf = np.where(m, conf, -np.inf)
            take = m & ((conf >= threshold) | (np.arange(len(conf)) == conf.argmax()))
            x[blk] = np.where(take, x0, x[blk])
            it += 1
    return x[P:], nfe


@pytest.mark.parametrize("prompt,threshold", [(PROMPT, 0.5), (PROMPT[2:], 0.7)])
def test_dinfer_credit_matches_dense_reference(llada_model, prompt, threshold):
    sched = make_schedule("dinfer_credit", 32, llada_model.cfg, block_length=8, threshold=threshold, cache="none")
    out = G.generate(llada_model, [prompt], gen_length=32, schedule=sched, bucket=False)
    ref, nfe = _dinfer_credit_reference(llada_model, prompt, 32, 8, threshold)
    np.testing.assert_array_equal(out.generated[0], ref)
    assert int(out.nfe[0]) == nfe
    # credit matters here: without it (alpha 0 = Fast-dLLM threshold) the decode differs
    plain = make_schedule("fastdllm", 32, llada_model.cfg, block_length=8, threshold=threshold)
    base = G.generate(llada_model, [prompt], gen_length=32, schedule=plain, bucket=False)
    zero = G.generate(llada_model, [prompt], gen_length=32, bucket=False, schedule=make_schedule(
        "dinfer_credit", 32, llada_model.cfg, block_length=8, threshold=threshold, cache="none", alpha=0.0))
    np.testing.assert_array_equal(zero.generated, base.generated)
    assert int(zero.nfe[0]) == int(base.nfe[0])


def test_credit_sparse_slots_equal_dense_and_count_overflow():
    from dllm_jax.engine.dinfer import CreditThreshold

    ctx = Ctx(batch=2, prompt_len=0, gen_length=6, mask_id=0, eos_id=1, pad_id=1)
    rng = np.random.default_rng(0)
    V = 5
    for slots, expect_overflow in ((6, False), (1, True)):
        acc = CreditThreshold(threshold=0.9, slots=slots)
        st = acc.logit_state_init(ctx)
        dense = np.zeros((2, 6, V))
        upd = np.ones((2, 6), bool)
        for _ in range(6):
            logits = rng.normal(size=(2, 6, V)).astype(np.float32) * 2
            fused, st = acc.process_logits(st, ctx, jnp.asarray(logits), jnp.asarray(upd), jnp.ones((2, 6), bool))
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            dense *= 0.8
            idx = p.argmax(-1)
            np.put_along_axis(dense, idx[..., None], np.take_along_axis(dense, idx[..., None], -1)
                              + (p.max(-1) ** 0.2)[..., None], -1)
            if not expect_overflow:
                np.testing.assert_allclose(np.asarray(fused), logits + 0.7 * np.log1p(dense), rtol=1e-5, atol=1e-5)
        assert (int(np.asarray(st["overflow"]).sum()) > 0) == expect_overflow


@pytest.mark.parametrize("kw,msg", [
    (dict(threshold=0.0), "threshold in"), (dict(alpha=-0.1), "alpha >= 0"), (dict(boost=-1.0), "boost >= 0"),
    (dict(decay=1.5), "decay in"), (dict(cache="diagonal"), "cache must be one of"),
])
def test_dinfer_credit_bad_arguments(llada_model, kw, msg):
    with pytest.raises(PresetError, match=msg):
        make_schedule("dinfer_credit", 16, llada_model.cfg, block_length=8, **kw)


def test_dinfer_credit_refuses_shifted_models(dream_model):
    with pytest.raises(PresetError, match="no logit shift"):
        make_schedule("dinfer_credit", 16, dream_model.cfg, block_length=8)


def test_with_block_causal_rejects_negative(llada_model):
    with pytest.raises(ValueError, match="block_length must be >= 0"):
        llada_model.with_block_causal(-1)
