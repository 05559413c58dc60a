"""`compose`: any window x acceptance x cache by name. The named presets are special cases (same tokens, same
NFE), and every sensible combination runs to the end: no mask left, within its forward bound, per-row batch
invariance."""

import importlib
import itertools

import numpy as np
import pytest

from dllm_jax import presets
from dllm_jax.presets import PresetError, make_schedule

G = importlib.import_module("dllm_jax.generate")
PROMPTS = [[11, 23, 5, 77, 100, 3, 42, 9], [7, 19, 250, 4, 61]]
GEN = 32


def _gen(model, sched, prompts=PROMPTS):
    return G.generate(model, prompts, gen_length=GEN, schedule=sched)


@pytest.mark.parametrize("compose_kw,preset,preset_kw", [
    (dict(window="fixed", accept="threshold", cache="dual", block_length=8, threshold=0.5),
     "fastdllm_dual", dict(block_length=8, threshold=0.5)),
    (dict(window="fixed", accept="quota", cache="prefix", block_length=8, steps=16),
     "fastdllm_prefix", dict(block_length=8, steps=16)),
    (dict(window="sliding", accept="threshold", cache="dsb", block_length=8, threshold=0.5, prefix_window=4),
     "dsb_cache", dict(block_length=8, threshold=0.5, prefix_window=4)),
    (dict(window="fixed", accept="hierarchical", cache="vicinity", block_length=8),
     "dinfer_hierarchical", dict(block_length=8)),
    (dict(window="adablock", accept="threshold", cache="dual", block_length=8, delimiter_ids=(5,),
          delimiter_threshold=0.0), "adablock_dual", dict(init_block_length=8, delimiter_ids=(5,),
                                                          delimiter_threshold=0.0)),
    (dict(window="d2f", accept="d2f", cache="pipeline", block_length=8, tau_add=0.3, tau_act=0.6, tau_conf=0.7,
          span_blocks=2), "d2f", dict(block_length=8, tau_add=0.3, tau_act=0.6, tau_conf=0.7, cache="pipeline",
                                      span_blocks=2)),
])
def test_named_presets_are_compositions(llada_model, compose_kw, preset, preset_kw):
    a = _gen(llada_model, make_schedule("compose", GEN, llada_model.cfg, **compose_kw))
    b = _gen(llada_model, make_schedule(preset, GEN, llada_model.cfg, **preset_kw))
    np.testing.assert_array_equal(a.sequences, b.sequences)
    np.testing.assert_array_equal(a.nfe, b.nfe)


def _combos():
    for w, ok in presets._COMPOSE_OK.items():
        for acc in presets._COMPOSE_ACCEPTS:
            if (acc == "quota" and w != "fixed") or (acc == "d2f" and w not in ("fixed", "d2f")):
                continue
            for c in ok:
                yield w, acc, c


ALL = list(_combos())
# the default suite runs one combination per (window, cache) pair and every acceptance rule once; all under `slow`
_seen, QUICK = set(), []
for i, (w, acc, c) in enumerate(ALL):
    if (w, c) not in _seen or acc not in {a for _, a, _ in QUICK}:
        _seen.add((w, c))
        QUICK.append((w, acc, c))


def _kw(w, acc):
    kw = dict(window=w, accept=acc, block_length=8, threshold=0.6, delimiter_ids=(5,), delimiter_threshold=0.2,
              min_size=2, max_size=16, relaxed=0.4, prefix_window=4, prefix_look=4, after_look=4)
    if acc == "factor":
        kw.update(factor=1.0)
    return kw


def _check_combo(model, w, acc, c):
    sched = make_schedule("compose", GEN, model.cfg, cache=c, **_kw(w, acc))
    out = _gen(model, sched)
    assert not out.unfinished.any()
    assert not np.any(out.generated == model.cfg.mask_token_id), (w, acc, c)
    assert np.all(out.nfe >= 1) and np.all(out.nfe <= 2 * GEN + 8)
    for r, p in enumerate(PROMPTS):  # decisions are per row: a row alone decodes the same tokens
        one = _gen(model, sched, [p])
        np.testing.assert_array_equal(one.generated[0], out.generated[r])
        assert int(one.nfe[0]) == int(out.nfe[r])


@pytest.mark.parametrize("w,acc,c", QUICK)
def test_compositions_run(llada_model, w, acc, c):
    _check_combo(llada_model, w, acc, c)


@pytest.mark.slow
@pytest.mark.parametrize("w,acc,c", [x for x in ALL if x not in QUICK])
def test_all_compositions_run(llada_model, w, acc, c):
    _check_combo(llada_model, w, acc, c)


@pytest.mark.parametrize("kw,msg", [
    (dict(window="sliding", cache="dual"), "works with cache in"),
    (dict(window="elastic", cache="dsb"), "works with cache in"),
    (dict(window="sliding", accept="quota"), "needs window='fixed'"),
    (dict(window="diagonal"), "window must be one of"),
    (dict(accept="factor"), "needs factor"),
    (dict(block_length=7), "divisible"),
    (dict(accept="localleap", threshold=0.5, relaxed=0.8), "relaxed"),
    (dict(window="elastic", cache="pipeline"), "works with cache in"),
    (dict(cache="pipeline", span_blocks=0), "span_blocks"),
    (dict(window="sliding", accept="d2f"), "needs window='d2f' or 'fixed'"),
    (dict(window="d2f", cache="dual"), "works with cache in"),
])
def test_compose_rejects_nonsense(llada_model, kw, msg):
    with pytest.raises(PresetError, match=msg):
        make_schedule("compose", GEN, llada_model.cfg, **kw)


def test_every_window_accept_cache_name_is_covered():
    ws, accs, cs = zip(*ALL)
    assert set(ws) == set(presets._COMPOSE_WINDOWS)
    assert set(accs) == set(presets._COMPOSE_ACCEPTS)
    assert set(cs) == set(presets._COMPOSE_CACHES)
    assert len(ALL) == len(set(ALL)) == sum(1 for _ in itertools.chain(ALL))


@pytest.mark.parametrize("w", ["fixed", "sliding", "adablock", "d2f"])
def test_pipeline_cache_is_exact_on_block_causal_models(llada_model, w):
    """D2F's finished-prefix cache under any window whose start only moves forward: on a block-causal model the cached
    run decodes the same tokens with the same NFE as full forwards, and most of its forwards are cached windows."""
    bc = llada_model.with_block_causal(8)
    # D2F's pipeline spans several blocks at once (tau_add 0.1): its span covers the 32 generated positions
    kw = {**_kw(w, "threshold"), "block_length": 16 if w == "sliding" else 8, "span_blocks": 4 if w == "d2f" else 2}
    ref = _gen(bc, make_schedule("compose", GEN, bc.cfg, cache="none", **kw))
    sched = make_schedule("compose", GEN, bc.cfg, cache="pipeline", **kw)
    assert sched.cache.align == 8
    out = G.generate(bc, PROMPTS, gen_length=GEN, schedule=sched, bucket=True, trace=True)
    np.testing.assert_array_equal(out.generated, ref.generated)
    np.testing.assert_array_equal(out.nfe, ref.nfe)
    full = np.asarray(out.trace["full"])
    assert sum(int(full[: out.nfe[r], r].sum()) for r in range(len(PROMPTS))) < int(out.nfe.sum()) / 2
