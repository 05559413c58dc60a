"""LLaDA 2.x `generate` (LLaDA2.0 and LLaDA2.1 hub code) through the conformance tool: token- and NFE-exact against
the golden cases; rows of a batch equal their batch-of-one runs; a (data, expert, model) mesh of 2x4 fake CPU devices
equals one device; bad input is one clear error or warning."""

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

import dllm_jax
from dllm_jax import sharding
from dllm_jax.conformance import compare, run_cases
from dllm_jax.presets import PresetError, make_schedule
from dllm_jax.presets_llada2 import generate_llada2

# one case per quirk / path (the whole file runs under -m slow)
SUBSET = (
    "gen20_p40_g64_bl32_s32_th0.9",  # threshold, fallback top-k
    "gen20_p40_g64_bl16_s32_th0.9",  # steps > block_length: ones then zeros
    "gen20_p40_g96_bl32_s4_th0.9_eos153_early",  # LLaDA2.0 early-stop return (prompt included)
    "gen20_p40_g96_bl32_s32_th0.9_eos153_early_eosinprompt",  # ... searched from position 0: a prompt prefix
    "gen20_p40_g96_bl32_s8_th0.7_eos153",  # stop after a block holding eos, without eos_early_stop
    "gen21_p40_g64_bl32_th0.7_eth0.5_mps16_ntt1",  # M2T + T2T editing, 0/1 mask bias
    "gen21_p40_g64_bl32_th0.7_eth0.5_mps0_ntt1",  # no post steps
    "gen21_p40_g96_bl32_th0.7_eth0.5_mps16_ntt1_eos153_early",  # LLaDA2.1 eos_early_stop
)


@pytest.fixture(scope="module")
def model(fixtures):
    return dllm_jax.load(str(fixtures / "llada2_tiny"))


@pytest.fixture(scope="module")
def cases(fixtures):
    return json.loads((fixtures / "llada2_generate.json").read_text())["cases"]


def _blind(cases):  # the tool must not see the answers
    return [{k: v for k, v in c.items() if k in ("id", "code", "args", "prompt")} for c in cases]


def _run_exact(model, cases):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # block lengths 8 / 16: the untrained-block warning
        res = run_cases(model, _blind(cases))
    bad = [(c["id"], r.get("unsupported"), r.get("nfe"), c["nfe_counted"]) for c, r in zip(cases, res)
           if compare(c, r) != "match"]
    assert not bad, f"not exact: {bad}"
    return res


def test_golden_subset_token_and_nfe_exact(model, cases):
    sel = [c for c in cases if c["id"] in SUBSET]
    assert len(sel) == len(SUBSET)
    res = _run_exact(model, sel)
    assert {r["preset"] for r in res} == {"llada2", "llada21"}


@pytest.mark.slow
def test_golden_file_all_cases_exact(model, cases):
    """All 55 cases (34 LLaDA2.0, 21 LLaDA2.1): ~6 min on 2 loaded cores."""
    _run_exact(model, cases)


def test_conformance_cli(fixtures, tmp_path, cases):
    src = tmp_path / "cases.json"
    src.write_text(json.dumps({"cases": _blind([c for c in cases if c["id"] == SUBSET[0]])}))
    out = tmp_path / "out.json"
    r = subprocess.run([sys.executable, "-m", "dllm_jax.conformance", "--checkpoint", str(fixtures / "llada2_tiny"),
                        "--cases", str(src), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())["cases"][0]
    want = next(c for c in cases if c["id"] == SUBSET[0])
    assert got["output"] == want["output"] and got["nfe"] == want["nfe_counted"]


def _sched(model, case):
    a = dict(case["args"])
    a.pop("mask_id")
    g = a.pop("gen_length")
    name = "llada21" if case["function"] == "generate_21" else "llada2"
    return make_schedule(name, g, model.cfg, **a)


@pytest.mark.parametrize("cid,mesh_shape", [("gen20_p40_g64_bl32_s32_th0.9", (1, 2, 4)),
                                            ("gen21_p40_g64_bl32_th0.7_eth0.5_mps2_ntt1", (2, 2, 2))])
def test_batch_rows_and_2x4_expert_mesh_equal_single(model, cases, cid, mesh_shape):
    """Rows of different prompt lengths (left-padded) each equal their batch-of-one run; the ("data", "expert",
    "model") mesh gives the same tokens and NFE as one device."""
    case = next(c for c in cases if c["id"] == cid)
    sched = _sched(model, case)
    p = case["prompt"][0]
    prompts = [p, p[7:]]
    ref = generate_llada2(model, prompts, schedule=sched)
    assert ref.sequences[0].tolist() == case["output"][0] and ref.nfe[0] == case["nfe_counted"]
    alone = generate_llada2(model, [p[7:]], schedule=sched)
    assert np.array_equal(alone.sequences[0], ref.sequences[1]) and alone.nfe[0] == ref.nfe[1]
    out = generate_llada2(model, prompts, schedule=sched, mesh=sharding.make_moe_mesh(*mesh_shape))
    assert all(np.array_equal(a, b) for a, b in zip(out.sequences, ref.sequences))
    assert out.nfe == ref.nfe


def test_block_cache_option_same_tokens(model, cases):
    """cache='block' (finished-block KV cache; not the official recompute) decodes the same tokens for LLaDA2.0
    (its mask is block-causal, so cached K/V are exact); it makes a prefill and a store forward per block."""
    case = next(c for c in cases if c["id"] == "gen20_p40_g64_bl32_s32_th0.9")
    a = dict(case["args"])
    a.pop("mask_id")
    g = a.pop("gen_length")
    out = generate_llada2(model, case["prompt"], schedule=make_schedule("llada2", g, model.cfg, cache="block", **a))
    assert out.sequences[0].tolist() == case["output"][0]


def test_generate_api_and_default_preset(model):
    from dllm_jax.cli import default_schedule
    from dllm_jax.generate import generate

    assert default_schedule(model.cfg) == "llada2"
    out = generate(model, [[5, 9, 11, 40]], gen_length=32,
                   schedule=make_schedule("llada2", 32, model.cfg, threshold=0.9))
    assert out.nfe[0] > 0 and not (out.generated[:, :28] == model.cfg.mask_token_id).any()


def test_bad_input_clear_errors(model, llada_model):
    with pytest.raises(PresetError, match="temperature"):
        make_schedule("llada21", 32, model.cfg, temperature=0.7)
    with pytest.raises(PresetError, match="num_to_transfer"):
        make_schedule("llada21", 32, model.cfg, num_to_transfer=0)
    with pytest.raises(PresetError, match="threshold"):
        make_schedule("llada2", 32, model.cfg, threshold=1.5)
    with pytest.warns(UserWarning, match="trained with blocks of 32"):
        make_schedule("llada2", 32, model.cfg, block_length=16)
    with pytest.raises(PresetError, match="LLaDA 2.x model"):
        generate_llada2(llada_model, [[1, 2, 3]], schedule=make_schedule("llada2", 32, model.cfg))
    res = run_cases(llada_model, [{"id": "x", "code": "inclusionAI/LLaDA2.0-mini hub modeling_llada2_moe.py::"
                                   "LLaDA2MoeModelLM.generate", "args": {"gen_length": 32}, "prompt": [[1, 2]]}])
    assert "llada2_moe" in res[0]["unsupported"]
    res = run_cases(model, [{"id": "y", "code": "inclusionAI/LLaDA2.1-mini hub modeling_llada2_moe.py::"
                             "LLaDA2MoeModelLM.generate", "args": {"gen_length": 32}, "prompt": [[1, 2], [3, 4]]}])
    assert "batch-1" in res[0]["unsupported"]
