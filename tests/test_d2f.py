"""D2F against a plain re-implementation of the official pipeline.

The reference below follows the official D2F inference (zhijie-group/Discrete-Diffusion-Forcing, see
docs/schedulers.md): the sequence GROWS block by block (no masked suffix), every forward is a dense forward with D2F's
attention mask (`create_full_block_attention_mask`: the prompt is one block that sees only itself, each generated block
sees the prompt, the earlier blocks and itself), blocks are added at tau_add, fully activated at tau_act, decoded at
tau_conf, and after an EOS no block is added and the run ends when the added blocks are complete. The engine instead
runs a fixed canvas with block-causal attention (`with_block_causal`), optionally with D2F's KV cache of the finished
prefix; both must give the same tokens and the same number of forwards.
"""

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dllm_jax.models import transformer as T
from dllm_jax.presets import PresetError, make_schedule

G = importlib.import_module("dllm_jax.generate")
PROMPTS = [[11, 23, 5, 77, 100, 3, 42, 9], [5, 6, 7], [200, 17, 17, 4, 90],
           # 20 tokens: the prompt spans several attention blocks, so treating it as one block matters
           [31, 8, 250, 64, 2, 19, 88, 140, 7, 7, 53, 120, 36, 9, 211, 45, 3, 170, 26, 99]]


def d2f_mask(prompt_len, total, block):
    """D2F's dense attention mask [total, total] (True = may attend)."""
    blk = np.where(np.arange(total) < prompt_len, -1, (np.arange(total) - prompt_len) // block)
    return blk[:, None] >= blk[None, :]


def dense_forward(model, ids, allowed_TxT):
    """Logits [T, V] of the model on one unpadded sequence under an explicit attention mask (plain jnp, layer by
    layer; no kernels, no cache). Compiled once per 32-token bucket: the sequence is padded at the end with keys no
    real query may see (a padded query sees only itself), so the real rows are those of the unpadded sequence."""
    n = len(ids)
    N = -(-n // 32) * 32
    allowed = np.eye(N, dtype=bool)
    allowed[:n, :n] = np.asarray(allowed_TxT, bool)
    padded = np.zeros((1, N), np.int32)
    padded[0, :n] = ids
    return np.asarray(_dense_forward(model.params, model.cfg, jnp.asarray(padded), jnp.asarray(allowed))[0, :n])


@functools.partial(jax.jit, static_argnames="cfg")
def _dense_forward(params, cfg, ids_1xN, allowed_NxN):
    n = ids_1xN.shape[1]
    pos = jnp.arange(n, dtype=jnp.int32)[None]
    cos, sin = T.rope_tables(pos, cfg.head_dim, cfg.rope_theta)
    x = T._embed(params, ids_1xN)
    rep = cfg.n_heads // cfg.n_kv_heads
    for li in range(cfg.n_layers):
        lp = jax.tree.map(lambda a: a[li], params["layers"])
        h = T.rms_norm(x, lp["attn_norm"], cfg.norm_eps)
        q, k, v = T._qkv(cfg, lp, h)
        q, k = T.apply_rope(q, cos, sin), T.apply_rope(k, cos, sin)
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32)) * cfg.head_dim ** -0.5
        p = jax.nn.softmax(jnp.where(allowed_NxN[None, None], s, -jnp.inf), axis=-1)
        o = jnp.einsum("bhts,bshd->bthd", p, v.astype(jnp.float32)).astype(x.dtype)
        x = x + T._proj(o.reshape(1, n, -1), lp["wo"])
        x = x + T._mlp(cfg, lp, x)
    return T._head(params, cfg, x)


def official_d2f(model, prompt, gen_length, block, tau_add, tau_act, tau_conf):
    """The official pipeline on a growing sequence, one dense forward per step. Returns (generated ids, NFE);
    positions never added are returned as EOS."""
    mask_id, eos = model.cfg.mask_token_id, model.cfg.eos_token_id
    p = len(prompt)
    x = list(prompt)
    n_blocks, nfe, eos_seen = 0, 0, False

    def ratio(b):
        seg = x[p + b * block: p + (b + 1) * block]
        return sum(t != mask_id for t in seg) / block

    while True:
        last = 1.0 if n_blocks == 0 else ratio(n_blocks - 1)
        if last >= tau_add and not eos_seen and n_blocks < gen_length // block:
            x += [mask_id] * block
            n_blocks += 1
        if mask_id not in x:
            break
        probs = np.asarray(jax.nn.softmax(dense_forward(model, x, d2f_mask(p, len(x), block)), axis=-1))
        if model.cfg.logit_shift:  # Dream: position i is predicted by row i - 1
            probs = np.concatenate([probs[:1], probs[:-1]])
        nfe += 1
        conf, pred = np.asarray(probs.max(-1)), np.asarray(probs.argmax(-1))
        new = list(x)
        for b in range(n_blocks):
            lo = p + b * block
            cand = [i for i in range(lo, lo + block) if x[i] == mask_id]
            if not cand:
                continue
            full = b == 0 or ratio(b - 1) >= tau_act or all(x[j] != mask_id for j in range(p, lo))
            pick = [i for i in cand if conf[i] > tau_conf]
            if not pick and full:
                pick = [max(cand, key=lambda i: (conf[i], -i))]
            for i in pick:
                new[i] = int(pred[i])
        x = new
        eos_seen = eos in x[p:]
    gen = x[p:] + [eos] * (gen_length - (len(x) - p))
    return np.asarray(gen), nfe


def _with_common_eos(model, preset):
    """The model with its EOS id moved to a token it often predicts, so that runs decode EOS early."""
    out = G.generate(model, PROMPTS, gen_length=32, schedule=make_schedule(preset, 32, model.cfg))
    vals, counts = np.unique(out.generated, return_counts=True)
    common = int(vals[np.argmax(counts)])
    return dataclasses.replace(model, cfg=model.cfg.replace(eos_token_id=common))


@pytest.fixture(scope="module")
def eos_model(llada_model):
    return _with_common_eos(llada_model, "fastdllm")


@pytest.fixture(scope="module")
def eos_dream(dream_model):
    return _with_common_eos(dream_model, "fastdllm_dream_threshold")


def test_whole_prompt_block_causal_forward_matches_d2f_mask(llada_model):
    """with_block_causal(bl): the forward (full and cached window) equals a dense forward under D2F's mask."""
    bl, P, n = 8, 32, 3
    bc = llada_model.with_block_causal(bl)
    assert bc.cfg.block_causal_prompt and not llada_model.with_block_causal(bl, whole_prompt=False).cfg \
        .block_causal_prompt
    prompt = PROMPTS[0] + PROMPTS[2]  # 13 tokens: spans two blocks of 8
    ids = [7] * (P - len(prompt)) + prompt + [llada_model.cfg.mask_token_id] * (n * bl)
    ids[P + 2], ids[P + 9] = 40, 41
    valid = np.arange(len(ids)) >= P - len(prompt)
    pos = np.maximum(np.cumsum(valid) - 1, 0)
    got = np.asarray(bc.logits([ids], attention_mask=[valid], positions=[pos], prefix_len=P))[0]
    want = dense_forward(llada_model, ids[P - len(prompt):], d2f_mask(len(prompt), len(prompt) + n * bl, bl))
    np.testing.assert_allclose(got[P - len(prompt):], want, atol=1e-4, rtol=1e-4)
    # without the prompt length the prompt is split into blocks, which is a different function
    split = np.asarray(bc.logits([ids], attention_mask=[valid], positions=[pos]))[0]
    assert np.abs(split[P - len(prompt):] - want).max() > 1e-3
    # a cached window forward over blocks 1.. on the K/V of a full forward gives the same rows
    ids_j = jnp.asarray([ids], jnp.int32)
    _, kv = T.forward(bc.params, bc.cfg, ids_j, jnp.asarray([pos]), jnp.asarray([valid]), prefix_len=P)
    w0, W = P + bl - 1, 2 * bl + 1
    logits_w, _ = T.forward_window(bc.params, bc.cfg, ids_j[:, w0:w0 + W], jnp.asarray([w0]),
                                   jnp.arange(W)[None] >= 1, kv, jnp.asarray([pos]), jnp.asarray([valid]),
                                   prefix_len=P)
    np.testing.assert_allclose(np.asarray(logits_w)[0], got[w0:w0 + W], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw", [
    dict(block_length=8, tau_add=0.5, tau_act=0.5, tau_conf=0.6),
    dict(block_length=8, tau_add=0.1, tau_act=0.9, tau_conf=0.3),
    dict(block_length=16, tau_add=0.25, tau_act=0.95, tau_conf=0.9),
])
def test_d2f_block_causal_matches_official_pipeline(eos_model, kw):
    """Tokens and NFE of every prompt equal the official growing-sequence pipeline, without and with the KV cache
    (the cache with a span too short for the pipeline falls back to full forwards and must still agree)."""
    bl, gen_length = kw["block_length"], 48
    bc = eos_model.with_block_causal(bl)
    want = [official_d2f(eos_model, p, gen_length, bl, kw["tau_add"], kw["tau_act"], kw["tau_conf"])
            for p in PROMPTS]
    eos = eos_model.cfg.eos_token_id
    assert any(eos in g[:-bl] for g, _ in want), "the test needs runs that end at an EOS before the last block"
    windowed = 0
    for cache, span in [("none", 3), ("pipeline", 3), ("pipeline", 1)]:
        sched = make_schedule("d2f", gen_length, bc.cfg, attention="block_causal", cache=cache, span_blocks=span,
                              **kw)
        out = G.generate(bc, PROMPTS, gen_length=gen_length, schedule=sched, trace=True)
        for r, (gen, nfe) in enumerate(want):
            np.testing.assert_array_equal(out.generated[r], gen, err_msg=f"cache={cache} span={span} row {r}")
            assert out.nfe[r] == nfe, (cache, span, r, out.nfe[r], nfe)
        full = np.asarray(out.trace["full"])
        n_full = [int(full[: out.nfe[r], r].sum()) for r in range(len(PROMPTS))]
        if cache == "none":
            assert n_full == list(out.nfe)
        elif span == 3:
            windowed = sum(int(out.nfe[r]) - n_full[r] for r in range(len(PROMPTS)))
    assert windowed > 0, "the cached runs must actually use cached window forwards"


def test_d2f_dream_block_causal_matches_official_pipeline(eos_dream):
    """Dream (shifted logits: position i from row i - 1; a cached window starts one row before the boundary for it)."""
    kw = dict(block_length=8, tau_add=0.3, tau_act=0.6, tau_conf=0.5)
    bc = eos_dream.with_block_causal(8)
    want = [official_d2f(eos_dream, p, 48, 8, kw["tau_add"], kw["tau_act"], kw["tau_conf"]) for p in PROMPTS]
    for cache in ("none", "pipeline"):
        sched = make_schedule("d2f", 48, bc.cfg, attention="block_causal", cache=cache, span_blocks=3, **kw)
        out = G.generate(bc, PROMPTS, gen_length=48, schedule=sched)
        for r, (gen, nfe) in enumerate(want):
            np.testing.assert_array_equal(out.generated[r], gen, err_msg=f"cache={cache} row {r}")
            assert out.nfe[r] == nfe


def test_d2f_pipeline_cache_bidirectional_and_batch_invariance(llada_model):
    """Under bidirectional attention the cache is an approximation: it still finishes every row, uses far fewer full
    forwards, and a row decodes the same alone as in a batch."""
    kw = dict(block_length=8, tau_add=0.3, tau_act=0.6, tau_conf=0.7, cache="pipeline", span_blocks=3)
    sched = make_schedule("d2f", 32, llada_model.cfg, **kw)
    out = G.generate(llada_model, PROMPTS, gen_length=32, schedule=sched, trace=True)
    assert not (out.generated == llada_model.cfg.mask_token_id).any()
    full = np.asarray(out.trace["full"])
    assert all(full[: out.nfe[r], r].sum() < out.nfe[r] / 2 for r in range(len(PROMPTS)))
    alone = G.generate(llada_model, [PROMPTS[1]], gen_length=32, schedule=sched)
    np.testing.assert_array_equal(alone.generated[0], out.generated[1])
    assert alone.nfe[0] == out.nfe[1]


def test_d2f_cache_arguments_checked(llada_model):
    with pytest.raises(PresetError, match="cache must be"):
        make_schedule("d2f", 32, llada_model.cfg, block_length=8, cache="dual")
    for bad in (0, 1.5, True):
        with pytest.raises(PresetError, match="span_blocks"):
            make_schedule("d2f", 32, llada_model.cfg, block_length=8, cache="pipeline", span_blocks=bad)
