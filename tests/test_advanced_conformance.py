"""Advanced block schedulers (DSB, AdaBlock-dLLM, BlockBatch): golden cases token- and NFE-exact, plus properties.

By default a representative subset of each golden file runs (compilation dominates on 2 CPU cores); every case runs
under `-m slow`.
"""

import importlib
import json

import jax
import numpy as np
import pytest

from dllm_jax.conformance import run_cases
from dllm_jax.engine.loop import make_loop, results
from dllm_jax.presets import PresetError, make_schedule

G = importlib.import_module("dllm_jax.generate")

FILES = {
    "dsb_llada.json": "llada", "dsb_dream.json": "dream",
    "adablock_llada.json": "llada", "adablock_dream.json": "dream",
    "blockbatch_llada.json": "llada", "blockbatch_dream.json": "dream",
}

# representative subset: every preset / variant / quirk at least once (thresholds share compiled programs)
FAST = {
    "dsb_llada.json": ["dsb_nocache_const_g32_bl8_th0.9", "dsb_cache_const_g32_bl8_th0.9_pwl4_swl0",
                       "dsb_cache_greedy_g32_bl8_th0.9_pwl4_swl4"],
    "dsb_dream.json": ["dsb_dream_nocache_greedy_g32_bl8_th0.9", "dsb_dream_cache_const_g32_bl8_th0.9_pwl4"],
    "adablock_llada.json": ["adablock_prefix_g32_ib8_frequent_tau0.7", "adablock_dual_g32_ib8_frequent_tau0.1"],
    "adablock_dream.json": ["adablock_dream_nocache_g32_ib8_frequent_tau0.3",
                            "adablock_dream_dual_g32_ib8_frequent_tau0.3"],
    "blockbatch_llada.json": ["blockbatch_bulk_g32_bs4-8-16_th0.9_sync4_conf0.5_R16",
                              "blockbatch_bulk_g32_bs4-8-16_th0.9_sync8_conf0.5_R16_eos142",
                              "blockbatch_rms_g32_bs4-8-16_th0.9_eos115"],
    "blockbatch_dream.json": ["blockbatch_dream_g32_bs4-8-16_th0.9_sync8_R16",
                              "blockbatch_dream_g32_bs4-8-16_th0.9_sync8_R32_stopeos278"],
}

_ANSWER_KEYS = ("output", "nfe_counted", "nfe_returned", "forward_inputs", "forward_windows", "block_history",
                "nfe_history", "returned", "stats", "remaining_mask_tokens")


def _cases(fixtures, fname, ids=None):
    cases = json.loads((fixtures / fname).read_text())["cases"]
    if ids is not None:
        cases = [c for c in cases if c["id"] in ids]
        assert len(cases) == len(ids)
    return cases


def _check(model, cases):
    blind = [{k: v for k, v in c.items() if k not in _ANSWER_KEYS} for c in cases]
    res = run_cases(model, blind)
    bad = []
    for c, r in zip(cases, res):
        assert r["id"] == c["id"]
        assert "unsupported" not in r, (c["id"], r.get("unsupported"))
        if r["output"] != c["output"] or r["nfe"] != c["nfe_counted"]:
            bad.append((c["id"], r["nfe"], c["nfe_counted"]))
        if "nfe_returned" in r:
            assert r["nfe_returned"] == c["nfe_returned"], c["id"]
    assert not bad, f"not exact: {bad}"


@pytest.mark.parametrize("fname", sorted(FAST))
def test_golden_subset_exact(fixtures, llada_model, dream_model, fname):
    model = {"llada": llada_model, "dream": dream_model}[FILES[fname]]
    _check(model, _cases(fixtures, fname, FAST[fname]))


@pytest.mark.slow
@pytest.mark.parametrize("fname", sorted(FILES))
def test_golden_file_exact(fixtures, llada_model, dream_model, fname):
    model = {"llada": llada_model, "dream": dream_model}[FILES[fname]]
    _check(model, _cases(fixtures, fname))


# ---------------------------------------------------------------------------------------------------------------
# properties

PROMPT = [11, 23, 5, 77, 100, 3, 42, 9]
PROMPT2 = [7, 19, 250, 4, 61]

PER_ROW = [
    ("dsb", dict(block_length=4, max_block_length=4, threshold=0.7)),
    ("dsb", dict(block_length=4, max_block_length=-1, threshold=0.7)),
    ("dsb_cache", dict(block_length=4, max_block_length=-1, threshold=0.7, prefix_window=2, suffix_window=2)),
    ("dsb_cache", dict(block_length=4, max_block_length=4, threshold=0.7, prefix_window=3)),
    ("adablock", dict(init_block_length=4, delimiter_ids=[28, 115, 193, 242], delimiter_threshold=0.2)),
    ("adablock_prefix", dict(init_block_length=4, delimiter_ids=[28, 115, 193, 242], delimiter_threshold=0.2)),
    ("adablock_dual", dict(init_block_length=4, delimiter_ids=[28, 115, 193, 242], delimiter_threshold=0.2)),
]
DREAM_PER_ROW = [
    ("dsb_dream_cache", dict(block_length=4, max_block_length=-1, threshold=0.7, prefix_window=2)),
    ("adablock_dream_dual", dict(block_length=4, delimiter_ids=[156, 116, 24, 161], delimiter_threshold=0.2)),
]
# by default the cached variants (the most state) run; the rest under -m slow
_DEFAULT = {2, 6, 7}
PROPS = [pytest.param(*pk, marks=() if i in _DEFAULT else pytest.mark.slow)
         for i, pk in enumerate(PER_ROW + DREAM_PER_ROW)]


def _stepwise(model, sched, prompts, gen_length):
    """Run the loop body step by step (the same body the while_loop runs) and return every canvas."""
    ctx, x, valid, pos, keys = G.prepare(model, prompts, gen_length, sched, bucket=False)
    carry, cond, body = make_loop(model.params, model.cfg, sched, ctx, x, valid, pos, keys)
    body_j = jax.jit(body)
    xs = [np.asarray(carry["x"])]
    while bool(cond(carry)):
        carry = body_j(carry)
        xs.append(np.asarray(carry["x"]))
    return ctx, xs, jax.tree.map(np.asarray, results(carry))


@pytest.mark.parametrize("preset,kw", PROPS)
def test_terminates_no_mask_and_commits_are_final(llada_model, dream_model, preset, kw):
    model = dream_model if "dream" in preset else llada_model
    gen = 16
    sched = make_schedule(preset, gen, model.cfg, **kw)
    ctx, xs, res = _stepwise(model, sched, [PROMPT], gen)
    assert not res["unfinished"].any()
    # threshold rules commit >= 1 token per forward, so a run needs at most gen_length forwards
    assert 1 <= int(res["nfe"][0]) <= gen
    assert not (xs[-1][:, ctx.prompt_len:] == ctx.mask_id).any()
    for a, b in zip(xs, xs[1:]):
        changed = a != b
        # only masked positions change, and only to non-mask tokens
        assert (a[changed] == ctx.mask_id).all() and (b[changed] != ctx.mask_id).all()


@pytest.mark.parametrize("preset,kw", PROPS)
def test_batch_rows_equal_single_rows(llada_model, dream_model, preset, kw):
    model = dream_model if "dream" in preset else llada_model
    sched = make_schedule(preset, 16, model.cfg, **kw)
    both = G.generate(model, [PROMPT, PROMPT2], gen_length=16, schedule=sched)
    for b, p in enumerate((PROMPT, PROMPT2)):
        one = G.generate(model, [p], gen_length=16, schedule=sched)
        np.testing.assert_array_equal(both.sequences[b], one.sequences[0])
        assert both.nfe[b] == one.nfe[0]


def test_adablock_block_lengths_follow_delimiters(llada_model):
    """tau = inf gives fixed blocks; a low tau with frequent delimiters gives variable blocks (trace windows)."""
    fixed = make_schedule("adablock", 16, llada_model.cfg, init_block_length=4, delimiter_ids=[28, 115, 193, 242],
                          delimiter_threshold="inf")
    out = G.generate(llada_model, [PROMPT], gen_length=16, schedule=fixed, bucket=False, trace=True)
    n = int(out.nfe[0])
    spans = {(int(s), int(e)) for s, e in zip(out.trace["s"][:n, 0], out.trace["e"][:n, 0])}
    assert all((e - s) == 4 and (s - out.prompt_len) % 4 == 0 for s, e in spans)


@pytest.mark.parametrize("preset,kw,msg", [
    ("dsb", dict(threshold=None), "threshold"),
    ("dsb", dict(max_block_length=0), "max_block_length"),
    ("dsb_cache", dict(prefix_window=-1), "prefix_window"),
    ("dsb_dream", dict(alg="entropy"), "confidence_threshold"),
    ("adablock", dict(delimiter_threshold="high"), "delimiter_threshold"),
    ("adablock", dict(init_block_length=0), "init_block_length"),
])
def test_invalid_arguments(llada_model, preset, kw, msg):
    with pytest.raises(PresetError, match=msg):
        make_schedule(preset, 16, llada_model.cfg, **kw)


# ---------------------------------------------------------------------------------------------------------------
# BlockBatch: cross-row policies

BB = [("blockbatch", dict(block_sizes=[4, 8, 16], sync_threshold=2, refresh_block_size=8)),
      ("blockbatch_rms", dict(block_sizes=[4, 8, 16])),
      ("blockbatch_dream", dict(block_sizes=[4, 8, 16], sync_threshold=2, refresh_block_size=8))]


@pytest.mark.parametrize("preset,kw", [pytest.param(*BB[0]), pytest.param(*BB[1], marks=pytest.mark.slow),
                                       pytest.param(*BB[2])])
def test_blockbatch_steps(llada_model, dream_model, preset, kw):
    """Every step: a decoded token changes only when its row became a copy of another row of the request (leader
    sync / final winner); the run ends within the NFE bound with the winner's row in every row."""
    model = dream_model if "dream" in preset else llada_model
    gen = 16
    sched = make_schedule(preset, gen, model.cfg, eos_token_id=-1, **kw)
    N = sched.window.rows_per_request
    ctx, xs, res = _stepwise(model, sched, [PROMPT] * N, gen)
    assert not res["unfinished"].any() and 1 <= int(res["nfe"][0]) <= 4 * gen + 8
    M = ctx.mask_id
    for a, b in zip(xs, xs[1:]):
        for r in range(N):
            changed = (a[r] != M) & (a[r] != b[r])
            if changed.any():
                assert any((b[r] == b[q]).all() for q in range(N) if q != r), "a committed token changed"
    final = xs[-1]
    assert (final == final[0]).all()  # every row holds the request's output
    assert not (final[0, ctx.prompt_len:] == M).any()


def test_blockbatch_requests_are_independent(llada_model):
    """Two requests in one batch (two row groups) give each request's single-request result."""
    from dllm_jax.engine.blockbatch import generate_branches

    sched = make_schedule("blockbatch", 16, llada_model.cfg, block_sizes=[4, 8], sync_threshold=2,
                          refresh_block_size=8)
    both = generate_branches(llada_model, [PROMPT, PROMPT2], gen_length=16, schedule=sched, bucket=True)
    for i, p in enumerate((PROMPT, PROMPT2)):
        one = generate_branches(llada_model, [p], gen_length=16, schedule=sched, bucket=True)
        np.testing.assert_array_equal(both.sequences[i], one.sequences[0])
        assert (both.nfe[i], both.nfe_returned[i], both.winner[i]) == (one.nfe[0], one.nfe_returned[0],
                                                                         one.winner[0])


@pytest.mark.parametrize("kw,msg", [
    (dict(block_sizes=[4, 5]), "divisible"),
    (dict(block_sizes=[4, 4]), "distinct"),
    (dict(block_sizes=[4, 8], temperature=0.5), "greedy"),
    (dict(block_sizes=[4, 8], sync_threshold=-1), "sync_threshold"),
])
def test_blockbatch_invalid_arguments(llada_model, kw, msg):
    with pytest.raises(PresetError, match=msg):
        make_schedule("blockbatch", 16, llada_model.cfg, **kw)


def test_generate_runs_blockbatch_through_its_runner(llada_model):
    from dllm_jax.engine.blockbatch import generate_branches

    sched = make_schedule("blockbatch", 16, llada_model.cfg, block_sizes=[4, 8])
    out = G.generate(llada_model, [PROMPT, PROMPT2], gen_length=16, schedule=sched)
    ref = generate_branches(llada_model, [PROMPT, PROMPT2], gen_length=16, schedule=sched, bucket=True)
    assert out.sequences.shape == (2, ref.prompt_len + 16)
    for r in range(2):
        np.testing.assert_array_equal(out.sequences[r, :len(ref.sequences[r])], ref.sequences[r])
    assert out.nfe.tolist() == ref.nfe and not out.unfinished.any()
    with pytest.raises(G.ScheduleError, match="trace="):
        G.generate(llada_model, [PROMPT], gen_length=16, schedule=sched, trace=True)
