"""The denoising loop: jitted while_loop == Python loop, bucketing, batch invariance, validation, EOS stop."""

import importlib

import jax
import numpy as np
import pytest

from dllm_jax.engine.loop import make_loop, results
from dllm_jax.presets import PresetError, make_schedule

G = importlib.import_module("dllm_jax.generate")  # the module (dllm_jax.generate is also the function)
PROMPT = [11, 23, 5, 77, 100, 3, 42, 9]


def _python_loop(model, sched, prompt, gen_length):
    ctx, x, valid, pos, keys = G.prepare(model, [prompt], gen_length, sched, bucket=False)
    carry, cond, body = make_loop(model.params, model.cfg, sched, ctx, x, valid, pos, keys)
    body_j = jax.jit(body)
    n = 0
    while bool(cond(carry)):
        carry = body_j(carry)
        n += 1
    return jax.tree.map(np.asarray, results(carry)), n


@pytest.mark.parametrize("preset,kw", [
    ("llada", dict(steps=16, block_length=8)),
    ("fastdllm_dual", dict(block_length=8, threshold=0.7)),
])
def test_while_loop_equals_python_loop(llada_model, preset, kw):
    sched = make_schedule(preset, 16, llada_model.cfg, **kw)
    out = G.generate(llada_model, [PROMPT], gen_length=16, schedule=sched, bucket=False)
    ref, n = _python_loop(llada_model, sched, PROMPT, 16)
    np.testing.assert_array_equal(out.sequences, ref["x"])
    np.testing.assert_array_equal(out.nfe, ref["nfe"])
    assert out.loop_iterations == n


def test_same_bucket_does_not_recompile(llada_model):
    sched = make_schedule("fastdllm", 16, llada_model.cfg, block_length=8, threshold=0.9)
    G.generate(llada_model, [PROMPT], gen_length=16, schedule=sched)
    before = G.compile_count()
    G.generate(llada_model, [PROMPT[:5] + [7, 7, 7, 7, 7, 7]], gen_length=16, schedule=sched)  # same bucket (<=32)
    G.generate(llada_model, [PROMPT[:3]], gen_length=16, schedule=sched)
    assert G.compile_count() == before
    G.generate(llada_model, [PROMPT * 5], gen_length=16, schedule=sched)  # 40 tokens: next bucket
    assert G.compile_count() == before + 1


def test_compiled_programs_are_bounded(llada_model, monkeypatch):
    """The process keeps at most $DLLM_JAX_MAX_PROGRAMS compiled generation programs (least recently used evicted;
    XLA:CPU programs map memory regions, and a process may hold only 65,530); an evicted one recompiles, same tokens."""
    from dllm_jax.programs import ProgramCache, clear_program_caches

    clear_program_caches()
    monkeypatch.setenv("DLLM_JAX_MAX_PROGRAMS", "2")
    scheds = [make_schedule("fastdllm", g, llada_model.cfg, block_length=8, threshold=0.9) for g in (8, 16, 24)]
    outs = [G.generate(llada_model, [PROMPT], gen_length=s.gen_length, schedule=s) for s in scheds]
    assert len(G._COMPILED) == 2 and G._COMPILED.evictions >= 1
    before = G.compile_count()
    G.generate(llada_model, [PROMPT], gen_length=24, schedule=scheds[2])  # most recent: kept
    assert G.compile_count() == before
    again = G.generate(llada_model, [PROMPT], gen_length=8, schedule=scheds[0])  # evicted: compiled again
    assert G.compile_count() == before + 1 and len(G._COMPILED) == 2
    np.testing.assert_array_equal(again.sequences, outs[0].sequences)
    c = ProgramCache("t", maxsize=2)
    for k in "abc":
        c.put(k, k)
    assert c.get("a") is None and c.get("b") == "b" and len(c) == 2
    c.put("d", "d")  # "b" was used last, so "c" goes
    assert "c" not in c and "b" in c
    monkeypatch.setenv("DLLM_JAX_MAX_PROGRAMS", "0")
    with pytest.raises(ValueError, match="DLLM_JAX_MAX_PROGRAMS must be a positive integer"):
        ProgramCache("u").put("a", "a")


@pytest.mark.parametrize("preset,kw", [
    ("llada", dict(steps=16, block_length=8)),
    ("fastdllm", dict(block_length=8, threshold=0.8)),
    ("fastdllm_prefix", dict(block_length=8, threshold=0.8)),
    ("fastdllm_dual", dict(block_length=8, threshold=0.8)),
])
def test_batch_rows_equal_single_rows(llada_model, preset, kw):
    sched = make_schedule(preset, 16, llada_model.cfg, **kw)
    prompts = [PROMPT, PROMPT[2:7], [200, 201, 202, 5, 6, 7, 8, 9, 10, 11, 12]]
    batch = G.generate(llada_model, prompts, gen_length=16, schedule=sched)
    for b, p in enumerate(prompts):
        single = G.generate(llada_model, [p], gen_length=16, schedule=sched)
        np.testing.assert_array_equal(batch.generated[b], single.generated[0])
        assert batch.nfe[b] == single.nfe[0]


def test_dream_rows_equal_single_rows_with_per_row_quota(dream_model):
    sched = make_schedule("dream", 16, dream_model.cfg, steps=8, alg="entropy", batch_mean_quota=False)
    prompts = [PROMPT, PROMPT[1:4]]
    batch = G.generate(dream_model, prompts, gen_length=16, schedule=sched)
    for b, p in enumerate(prompts):
        single = G.generate(dream_model, [p], gen_length=16, schedule=sched)
        np.testing.assert_array_equal(batch.generated[b], single.generated[0])


@pytest.mark.parametrize("preset,kw,msg", [
    ("llada", dict(steps=16, block_length=5), "divisible by block_length"),
    ("llada", dict(steps=3, block_length=8), "multiple of the number of blocks"),
    ("fastdllm", dict(block_length=8, threshold=1.5), "threshold must lie in (0, 1]"),
    ("fastdllm", dict(block_length=8, threshold=0.0), "threshold must lie in (0, 1]"),
    ("nope", dict(), "unknown preset 'nope'"),
    ("dream", dict(alg="bogus"), "unknown Dream alg"),
])
def test_invalid_schedule_arguments(llada_model, preset, kw, msg):
    with pytest.raises(PresetError) as e:
        make_schedule(preset, 16, llada_model.cfg, **kw)
    assert msg in str(e.value)


def test_invalid_generate_arguments_fail_before_compiling(llada_model):
    sched = make_schedule("llada", 16, llada_model.cfg, steps=16, block_length=8)
    before = G.compile_count()
    with pytest.raises(G.ScheduleError, match="outside the vocabulary"):
        G.generate(llada_model, [[1, 2, 999]], gen_length=16, schedule=sched)
    bad_mask = llada_model.with_attention("reference")
    bad_mask.cfg = bad_mask.cfg.replace(mask_token_id=10_000)
    with pytest.raises(G.ScheduleError, match="mask id 10000 lies outside"):
        G.generate(bad_mask, [[1, 2]], gen_length=16, schedule=sched)
    short = llada_model.with_attention("reference")
    short.cfg = short.cfg.replace(max_seq_len=20)
    with pytest.raises(G.ScheduleError, match="exceeds the model's maximum length 20"):
        G.generate(short, [PROMPT], gen_length=16, schedule=sched, bucket=False)
    with pytest.raises(G.ScheduleError, match="built for gen_length 16"):
        G.generate(llada_model, [PROMPT], gen_length=24, schedule=sched)
    assert G.compile_count() == before


def test_eos_early_stop(llada_model):
    """A row stops once its text has an EOS with no mask before it: the rest is EOS and NFE drops.
    (As the golden BlockBatch cases do, the EOS id is overridden to a token this random model emits.)"""
    eos = 57
    model = type(llada_model)(llada_model.cfg.replace(eos_token_id=eos), llada_model.params)
    base = make_schedule("llada", 32, model.cfg, steps=32, block_length=8)
    full = G.generate(model, [PROMPT], gen_length=32, schedule=base)
    stop = G.generate(model, [PROMPT], gen_length=32, schedule=base.replace(eos_early_stop=True))
    first = int(np.argmax(full.generated[0] == eos))
    assert (full.generated[0] == eos).any() and first < 24
    n = int(stop.gen_lengths[0])
    assert n == first and np.all(stop.generated[0, n:] == eos)
    assert stop.nfe[0] < full.nfe[0]
    np.testing.assert_array_equal(stop.generated[0, :n], full.generated[0, :n])


def test_temperature_sampling_is_seeded_and_per_row(llada_model):
    sched = make_schedule("llada", 16, llada_model.cfg, steps=16, block_length=8, temperature=1.0)
    a = G.generate(llada_model, [PROMPT], gen_length=16, schedule=sched, seed=3)
    b = G.generate(llada_model, [PROMPT], gen_length=16, schedule=sched, seed=3)
    c = G.generate(llada_model, [PROMPT], gen_length=16, schedule=sched, seed=4)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    assert not np.array_equal(a.sequences, c.sequences)
    batch = G.generate(llada_model, [PROMPT[:4], PROMPT], gen_length=16, schedule=sched, seed=[9, 3])
    np.testing.assert_array_equal(batch.generated[1], a.generated[0])
    greedy = make_schedule("llada", 16, llada_model.cfg, steps=16, block_length=8)
    g1 = G.generate(llada_model, [PROMPT], gen_length=16, schedule=greedy, seed=1)
    g2 = G.generate(llada_model, [PROMPT], gen_length=16, schedule=greedy, seed=2)
    np.testing.assert_array_equal(g1.sequences, g2.sequences)


def test_trace_records_each_forward(llada_model):
    sched = make_schedule("fastdllm_dual", 16, llada_model.cfg, block_length=8, threshold=0.9)
    out = G.generate(llada_model, [PROMPT], gen_length=16, schedule=sched, trace=True, bucket=False)
    n = int(out.nfe[0])
    tr = out.trace
    assert tr["full"][:n, 0].sum() == 2  # one refresh per block
    assert tr["n"][:n, 0].sum() == 16  # every generated token committed exactly once
    assert np.all(tr["n"][n:, 0] == 0)


def test_eos_penalty_variants(llada_model):
    cfg = llada_model.cfg.replace(extra=(("eot_token_id", 291),))
    for kw in (dict(logits_eos_inf=True), dict(confidence_eos_eot_inf=True),
               dict(confidence_eos_eot_inf=True, eos_fix=True)):
        s = make_schedule("llada", 16, cfg, steps=16, block_length=8, **kw)
        out = G.generate(llada_model, [PROMPT], gen_length=16, schedule=s)
        assert not (out.generated == cfg.mask_token_id).any()
    s = make_schedule("llada", 16, cfg, steps=16, block_length=8, logits_eos_inf=True)
    out = G.generate(llada_model, [PROMPT], gen_length=16, schedule=s)
    assert not (out.generated == cfg.eos_token_id).any()
    with pytest.raises(PresetError):
        make_schedule("llada", 16, cfg, steps=16, block_length=8, logits_eos_inf=True, confidence_eos_eot_inf=True)


def test_threshold_sweep_shares_one_program(llada_model):
    """Thresholds are traced parameters: a sweep compiles once and each value still gives its own result."""
    outs = []
    before = G.compile_count()
    for th in (0.3, 0.6, 0.95):
        s = make_schedule("fastdllm", 16, llada_model.cfg, block_length=8, threshold=th)
        outs.append(G.generate(llada_model, [PROMPT], gen_length=16, schedule=s))
    assert G.compile_count() <= before + 1
    assert outs[0].nfe[0] < outs[2].nfe[0]
