"""Fast-dLLM v2 (Qwen2.5) and SDAR (Qwen3) bodies: golden logits of the official code (plain and cached forwards)."""

import numpy as np
import pytest

import jax.numpy as jnp

FDV2_TOL = 3e-4  # README: two float32 implementations, fastdllm_v2 set
SDAR_TOL = 1e-4


@pytest.fixture(scope="module")
def fdv2(fixtures):
    import dllm_jax

    return dllm_jax.load(str(fixtures / "fastdllm_v2_tiny"))


@pytest.fixture(scope="module")
def sdar(fixtures):
    import dllm_jax

    return dllm_jax.load(str(fixtures / "sdar_tiny"))


def _golden(fixtures, name):
    from safetensors.numpy import load_file

    return load_file(str(fixtures / name))


def _close(got, want, tol):
    got = np.asarray(got)
    assert got.shape == want.shape
    err = float(np.max(np.abs(got - want)))
    assert err <= tol, err


def _window(model, tokens, start, cache, key_end, S, write=None):
    from dllm_jax.models import transformer

    B, W = tokens.shape
    if cache is None:
        shape = (model.cfg.n_layers, B, S, model.cfg.n_kv_heads, model.cfg.head_dim)
        cache = {"k": jnp.zeros(shape), "v": jnp.zeros(shape)}
    pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    write = jnp.ones((B, W), bool) if write is None else write
    q = start + np.arange(W)
    ke = jnp.broadcast_to(jnp.asarray(key_end(q), jnp.int32), (B, W))
    return transformer.forward_window(model.params, model.cfg, jnp.asarray(tokens, jnp.int32),
                                      jnp.full((B,), start, jnp.int32), write, cache, pos, jnp.ones((B, S), bool),
                                      key_end=ke)


def test_configs(fdv2, sdar):
    assert fdv2.cfg.family == "fastdllm_v2" and fdv2.cfg.qkv_bias and not fdv2.cfg.qk_norm and fdv2.cfg.logit_shift
    assert fdv2.cfg.block_causal == 32 and fdv2.cfg.mask_token_id == 296
    assert sdar.cfg.family == "sdar" and sdar.cfg.qk_norm and not sdar.cfg.qkv_bias and not sdar.cfg.logit_shift
    assert sdar.cfg.block_causal == 4 and "q_norm" in sdar.params["layers"] and "bq" not in sdar.params["layers"]


def test_fastdllm_v2_plain_logits(fixtures, fdv2):
    g = _golden(fixtures, "fastdllm_v2_logits.safetensors")
    _close(fdv2.logits(g["input_ids"]), g["logits"], FDV2_TOL)  # default block_size 32
    _close(fdv2.with_block_causal(8, whole_prompt=False).logits(g["input_ids"]), g["logits_block8"], FDV2_TOL)
    _close(fdv2.logits(g["input_ids_b2"]), g["logits_b2"], FDV2_TOL)


def test_fastdllm_v2_cached_logits(fixtures, fdv2):
    """The four forward kinds of the official generators (C, B, BC, S), with the stale sub-block cache."""
    g = _golden(fixtures, "fastdllm_v2_logits.safetensors")
    c, bs, sbs = (int(v) for v in g["cache_meta"])
    x, xs = g["cache_x"], g["cache_x_sub"]
    S = x.shape[1]
    blk_end = lambda q: np.full_like(q, c + bs)  # noqa: E731
    # C: prefix, mask block_size = bs
    lg, kv = _window(fdv2, x[:, :c], 0, None, lambda q: (q // bs + 1) * bs, S)
    _close(lg, g["cache_prefix_logits"], FDV2_TOL)
    # B / BC: the block over the cache, mask with the default 32 (here the whole block and the prefix)
    lg, kv_b = _window(fdv2, x[:, c:c + bs], c, kv, lambda q: np.minimum(c + bs, (q // 32 + 1) * 32), S)
    _close(lg, g["cache_block_logits"], FDV2_TOL)
    _close(lg, g["cache_blockcache_logits"], FDV2_TOL)
    # S: only the sub-block is recomputed; the rest of the block cache keeps the K/V of the old content (stale)
    lg, _ = _window(fdv2, xs[:, c + sbs:c + bs], c + sbs, kv_b, blk_end, S)
    _close(lg, g["cache_subblock_logits"], FDV2_TOL)
    # a whole-block B forward of the new content differs from S on the sub-block (the stale cache matters)
    lg_full, _ = _window(fdv2, xs[:, c:c + bs], c, kv, blk_end, S)
    _close(lg_full, g["cache_block_sub_full_logits"], FDV2_TOL)
    assert float(np.max(np.abs(np.asarray(lg_full)[:, sbs:] - g["cache_subblock_logits"]))) > 1.0
    # C: completion of the block (mask bs), then B of the next block
    lg, kv_c = _window(fdv2, xs[:, c:c + bs], c, kv, lambda q: (q // bs + 1) * bs, S)
    _close(lg, g["cache_complete_logits"], FDV2_TOL)
    lg, _ = _window(fdv2, xs[:, c + bs:], c + bs, kv_c, lambda q: np.minimum(c + 2 * bs, (q // 32 + 1) * 32), S)
    _close(lg, g["cache_next_logits"], FDV2_TOL)


def test_sdar_plain_logits(fixtures, sdar):
    g = _golden(fixtures, "sdar_logits.safetensors")
    _close(sdar.logits(g["input_ids"]), g["logits"], SDAR_TOL)  # block_causal_mask(L, 4)
    _close(sdar.with_block_causal(8, whole_prompt=False).logits(g["input_ids"]), g["logits_block8"], SDAR_TOL)
    _close(sdar.with_block_causal(0).logits(g["input_ids"]), g["logits_full"], SDAR_TOL)
    _close(sdar.logits(g["input_ids_b2"]), g["logits_b2"], SDAR_TOL)


def test_sdar_cached_logits(fixtures, sdar):
    g = _golden(fixtures, "sdar_logits.safetensors")
    c, bl = (int(v) for v in g["cache_meta"])
    x, xd = g["cache_x"], g["cache_x_done"]
    S = x.shape[1]
    blocks = lambda q: (q // bl + 1) * bl  # noqa: E731
    lg, kv = _window(sdar, x[:, :c], 0, None, blocks, S)
    _close(lg, g["cache_prefill_logits"], SDAR_TOL)
    lg, _ = _window(sdar, x[:, c:c + bl], c, kv, blocks, S)
    _close(lg, g["cache_block_logits"], SDAR_TOL)
    lg, kv2 = _window(sdar, xd[:, c:c + bl], c, kv, blocks, S)
    _close(lg, g["cache_store_logits"], SDAR_TOL)
    lg, _ = _window(sdar, xd[:, c + bl:c + 2 * bl], c + bl, kv2, blocks, S)
    _close(lg, g["cache_next_logits"], SDAR_TOL)


def _tied_copy(src, dst, keep_head=False):
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (dst / "config.json").write_text(json.dumps(cfg))
    w = load_file(str(dst / "model.safetensors"))
    if keep_head:
        w["lm_head.weight"] = w["model.embed_tokens.weight"].copy()
    else:
        del w["lm_head.weight"]
    save_file(w, str(dst / "model.safetensors"))


@pytest.mark.parametrize("keep_head", [False, True])
def test_tied_embeddings(fixtures, fdv2, tmp_path, keep_head):
    """Fast-dLLM v2 1.5B ties its head (no lm_head.weight): logits = final hidden @ embed.T; a tied head stored anyway
    is ignored; converted checkpoints round-trip."""
    import dataclasses

    import dllm_jax
    from dllm_jax.cli import main

    _tied_copy(fixtures / "fastdllm_v2_tiny", tmp_path / "tied", keep_head)
    m = dllm_jax.load(str(tmp_path / "tied"))
    assert m.cfg.tie_embeddings and "lm_head" not in m.params
    untied = dataclasses.replace(fdv2, params={**fdv2.params, "lm_head": fdv2.params["embed"].T})
    ids = np.arange(3, 43)[None]
    np.testing.assert_allclose(np.asarray(m.logits(ids)), np.asarray(untied.logits(ids)), atol=1e-5)
    if not keep_head:
        assert main(["convert", str(tmp_path / "tied"), str(tmp_path / "conv")]) == 0
        c = dllm_jax.load(str(tmp_path / "conv"))
        assert c.cfg.tie_embeddings and "lm_head" not in c.params
        np.testing.assert_array_equal(np.asarray(c.logits(ids)), np.asarray(m.logits(ids)))


def test_unknown_family_names_supported(tmp_path):
    import json

    import dllm_jax
    from dllm_jax.models.config import ConfigError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_next", "architectures": ["X"]}))
    with pytest.raises(ConfigError) as e:
        dllm_jax.load(str(tmp_path))
    assert "Fast_dLLM_Qwen" in str(e.value) and "sdar" in str(e.value) and "llada" in str(e.value)


def test_sdar_moe_config_is_a_clear_error(fixtures, tmp_path):
    import json
    import shutil

    import dllm_jax
    from dllm_jax.models.config import ConfigError

    shutil.copytree(fixtures / "sdar_tiny", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.update(model_type="sdar_moe", num_experts=8)
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="SDAR MoE"):
        dllm_jax.load(str(tmp_path / "m"))


# ---------------------------------------------------------------------------------------------- generation (golden)

GEN_FILES = {"fastdllm_v2": "fastdllm_v2_generate.json", "sdar": "sdar_generate.json"}
# one case of every group/function runs by default; every case with `-m slow` (
# test_golden_generation_all)
QUICK = {  # (sub-block cache + the 32-mask split; batched stop; ragged batch with the completion-token quirk and
    # per-row stop; the demo with stop) and (eval batch with stop; prompt shorter than a block; prompt overwrite)
    "fastdllm_v2": ["gen_b1_p40_g72_bs24_sbs8_th0.9_blockcache", "gen_b2_p40_g96_bs32_sbs8_th0.9_nocache_stop35",
                    "bsample_ragged_lens40-64-70_g64_bs32_sbs8_th0.9_blockcache",
                    "bsample_ragged_lens12-29-40_g96_bs32_sbs8_th0.9_nocache_stop35",
                    "vis_p40_g96_bs16_sbs4_th0.7_stop35"],
    "sdar": ["eval_b2_p16_g64_bl4_s4_th0.9_stop82", "eval_b1_p5_g32_bl8_s4_th0.9", "sdar_b1_p18_g32_bl8_s1_static",
             "sdar_b1_p16_g64_bl8_s8_sequential_stop185"],
}


def _blind(cases):
    """What the conformance tool may read: never the answers."""
    keep = ("id", "code", "args", "prompt", "input_ids", "batch")
    return [{k: v for k, v in c.items() if k in keep} for c in cases]


def _check_cases(model, cases):
    from dllm_jax.conformance import run_cases

    results = run_cases(model, _blind(cases))
    bad = []
    for c, r in zip(cases, results):
        assert r["id"] == c["id"] and "unsupported" not in r, (c["id"], r.get("unsupported"))
        if r["output"] != c["output"] or r["nfe"] != c["nfe_counted"]:
            bad.append((c["id"], r["nfe"], c["nfe_counted"]))
    assert not bad, f"not exact: {bad}"


@pytest.mark.parametrize("fam", ["fastdllm_v2", "sdar"])
def test_golden_generation_quick(fixtures, fdv2, sdar, fam):
    import json

    cases = {c["id"]: c for c in json.loads((fixtures / GEN_FILES[fam]).read_text())["cases"]}
    _check_cases({"fastdllm_v2": fdv2, "sdar": sdar}[fam], [cases[i] for i in QUICK[fam]])


@pytest.mark.slow
@pytest.mark.parametrize("fam", ["fastdllm_v2", "sdar"])
def test_golden_generation_all(fixtures, fdv2, sdar, fam):
    """Every case of both golden files token- and NFE-exact (93 + 92 cases)."""
    import json

    _check_cases({"fastdllm_v2": fdv2, "sdar": sdar}[fam],
                 json.loads((fixtures / GEN_FILES[fam]).read_text())["cases"])


def test_every_code_string_maps(fixtures):
    import json

    from dllm_jax.conformance_block import preset_for

    for fam, fname in GEN_FILES.items():
        for c in json.loads((fixtures / fname).read_text())["cases"]:
            assert preset_for(c["code"]) is not None, c["code"]


# ---------------------------------------------------------------------------------------------- bad input, options

def test_small_block_must_divide_block(fdv2):
    from dllm_jax.presets import PresetError, make_schedule

    with pytest.raises(PresetError, match=r"small_block_size \(12\) must be a positive divisor of block_size \(32\)"):
        make_schedule("fastdllm_v2", 64, fdv2.cfg, block_size=32, small_block_size=12)


@pytest.mark.parametrize("name,kw,what", [("fastdllm_v2", {"block_size": 24, "small_block_size": 8}, "32-blocks"),
                                          ("sdar_eval", {"block_length": 8, "denoising_steps": 8}, "blocks of 8")])
def test_untrained_block_length_warns(fdv2, sdar, name, kw, what):
    from dllm_jax.presets import make_schedule

    model = fdv2 if name.startswith("fastdllm") else sdar
    with pytest.warns(UserWarning, match=rf"trained with blocks of .*official code would: .*{what}"):
        make_schedule(name, 48, model.cfg, **kw)


def test_sdar_eval_rejects_unreproducible_args(sdar):
    from dllm_jax.presets import PresetError, make_schedule

    with pytest.raises(PresetError, match="must be a multiple of denoising_steps"):
        make_schedule("sdar_eval", 32, sdar.cfg, block_length=4, denoising_steps=3)
    with pytest.raises(PresetError, match="only greedy decoding"):
        make_schedule("sdar", 32, sdar.cfg, top_k=0)
    with pytest.raises(PresetError, match="entropy_bounded"):
        make_schedule("sdar", 32, sdar.cfg, remasking_strategy="entropy_bounded")


def test_lockstep_needs_equal_prompts(fdv2):
    from dllm_jax.generate import ScheduleError, generate
    from dllm_jax.presets import make_schedule

    sched = make_schedule("fastdllm_v2", 32, fdv2.cfg)
    with pytest.raises(ScheduleError, match="lockstep=False"):
        generate(fdv2, [[1, 2, 3], [4, 5]], gen_length=32, schedule=sched)


def _run(model, name, prompts, gen, layout="left", **kw):
    import warnings

    from dllm_jax.engine.block_runner import generate_blocks
    from dllm_jax.presets import make_schedule

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = make_schedule(name, gen, model.cfg, **kw)
    return generate_blocks(model, prompts, schedule=sched, layout=layout)


def test_per_row_mode_equals_batch_of_one(fixtures, fdv2):
    """lockstep=False: ragged prompts in one batch, each row exactly its batch-of-one run (left padding moves the
    blocks with the row's own positions)."""
    import json

    cases = json.loads((fixtures / "fastdllm_v2_generate.json").read_text())["cases"]
    p = [c for c in cases if c["id"] == "gen_b1_p40_g64_bs32_sbs8_th0.9_blockcache"][0]
    prompts = [p["prompt"][0], p["prompt"][0][:29]]
    kw = dict(block_size=32, small_block_size=8, threshold=0.9, use_block_cache=True, stop_token=290)
    both = _run(fdv2, "fastdllm_v2", prompts, 64, lockstep=False, **kw)
    for b, pr in enumerate(prompts):
        one = _run(fdv2, "fastdllm_v2", [pr], 64, **kw)
        assert both.sequences[b].tolist() == one.sequences[0].tolist()
        assert both.nfe_per_row[b] == one.nfe
    assert both.sequences[0].tolist() == p["output"][0]


def test_corrected_options_change_what_they_should(fdv2, sdar):
    prompt = [list(range(3, 43))]
    # the 32-mask quirk matters only for blocks that do not fit a 32-block
    a = _run(fdv2, "fastdllm_v2", prompt, 128, block_size=64, small_block_size=16, stop_token=290)
    b = _run(fdv2, "fastdllm_v2", prompt, 128, block_size=64, small_block_size=16, stop_token=290,
             mask32_quirk=False)
    assert a.sequences[0].tolist() != b.sequences[0].tolist()
    c = _run(fdv2, "fastdllm_v2", prompt, 64, block_size=16, small_block_size=8, stop_token=290)
    d = _run(fdv2, "fastdllm_v2", prompt, 64, block_size=16, small_block_size=8, stop_token=290, mask32_quirk=False)
    assert c.sequences[0].tolist() == d.sequences[0].tolist() and c.nfe == d.nfe
    # SDAR generate.py overwrites the prompt tail when the quota exceeds the masks left; overwrite=False keeps it
    p18 = [list(range(5, 23))]
    q = _run(sdar, "sdar", p18, 32, block_length=8, denoising_steps=1, remasking_strategy="low_confidence_static")
    r = _run(sdar, "sdar", p18, 32, block_length=8, denoising_steps=1, remasking_strategy="low_confidence_static",
             overwrite=False)
    assert q.sequences[0][:18].tolist() != p18[0] and r.sequences[0][:18].tolist() == p18[0]


def test_generate_api_and_cli_default_preset(fixtures, capsys):
    from dllm_jax.cli import main

    assert main(["generate", "--model", str(fixtures / "sdar_tiny"), "--ids", "1,2,3,4,5,6", "--gen-length",
                 "8"]) == 0
    err = capsys.readouterr().err
    assert "[sdar_eval]" in err
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "== fastdllm_v2 (default: fastdllm_v2)" in out and "== sdar (default: sdar_eval)" in out
    assert "fastdllm_v2_batch" in out.split("== fastdllm_v2")[1]


# ---------------------------------------------------------------------------------------------- sharded == single

SHARDED = [
    ("fastdllm_v2", "fastdllm_v2", "left", dict(block_size=16, small_block_size=8, threshold=0.7,
                                                use_block_cache=True, stop_token=290)),
    ("fastdllm_v2", "fastdllm_v2_batch", "right_masked", dict(block_size=16, small_block_size=4, threshold=0.7,
                                                              use_block_cache=True, stop_token=35, pad_token_id=291)),
    ("sdar", "sdar_eval", "left", dict(block_length=4, denoising_steps=2, threshold=0.9)),
]


@pytest.mark.parametrize("fam,name,layout,kw", [pytest.param(*s, marks=[pytest.mark.slow] if s[1].endswith("batch")
                                                                else []) for s in SHARDED],
                         ids=[s[1] for s in SHARDED])
def test_sharded_2x4_equals_single_device(fdv2, sdar, fam, name, layout, kw):
    """A ("data", "model") = 2 x 4 mesh of fake CPU devices: batch over data, heads / MLP / vocab over model; the
    same tokens and NFE as one device."""
    import jax

    from dllm_jax import sharding
    from dllm_jax.engine.block_runner import generate_blocks
    from dllm_jax.presets import make_schedule

    assert len(jax.devices()) == 8
    model = fdv2 if fam == "fastdllm_v2" else sdar
    base = list(range(7, 47))
    prompts = [base, base[::-1]] if layout == "left" else [base[:29], base]
    sched = make_schedule(name, 48, model.cfg, **kw)
    one = generate_blocks(model, prompts, schedule=sched, layout=layout)
    mesh = sharding.make_mesh(2, 4)
    many = generate_blocks(model, prompts, schedule=sched, layout=layout, mesh=mesh)
    assert [s.tolist() for s in many.sequences] == [s.tolist() for s in one.sequences]
    assert many.nfe == one.nfe and many.nfe_per_row.tolist() == one.nfe_per_row.tolist()


@pytest.mark.parametrize("rule", ["credit", "quota", pytest.param("threshold", marks=pytest.mark.slow),
                                  pytest.param("hierarchical", marks=pytest.mark.slow)])
def test_block_cache_exact_for_other_rules(sdar, rule):
    """Existing acceptance rules on a block-causal model: BlockWindow x rule x BlockCache (finished blocks' K/V cached,
    one store forward per block) gives the same tokens as recomputing [0, block end) every forward (NoBlockCache,
    no store forward): NFE differs by exactly the store forwards and the prefill."""
    from dllm_jax.engine import Schedule, Threshold
    from dllm_jax.engine.block_diffusion import BlockCache, BlockWindow, NoBlockCache, QuotaThreshold
    from dllm_jax.engine.block_runner import generate_blocks
    from dllm_jax.engine.dinfer import CreditThreshold, Hierarchical

    acc = {"threshold": Threshold(threshold=0.6), "hierarchical": Hierarchical(threshold=0.8, run_threshold=0.4),
           "credit": CreditThreshold(threshold=0.7, slots=8), "quota": QuotaThreshold(block_length=8, steps=4,
                                                                                      threshold=0.9)}[rule]
    prompts = [list(range(9, 27)), list(range(40, 58))]

    def run(cached):
        win = BlockWindow(block_size=8, new_tokens=24, complete="store" if cached else "none", prefill=cached,
                          lockstep=False)
        cache = BlockCache(window=win) if cached else NoBlockCache(window=win)
        return generate_blocks(sdar, prompts, schedule=Schedule(window=win, accept=acc, cache=cache, name=rule))

    a, b = run(True), run(False)
    assert [s.tolist() for s in a.sequences] == [s.tolist() for s in b.sequences]
    n_blocks = -(-(18 + 24) // 8) - 18 // 8
    assert (a.nfe_per_row - b.nfe_per_row).tolist() == [n_blocks + 1] * 2  # store forwards + the prefill


@pytest.mark.parametrize("P,nfe,extra", [(20, 0, 0), (40, 1, 0), (64, 1, 1)])
def test_fastdllm_v2_fewer_new_tokens_than_a_block(fdv2, P, nfe, extra):
    """max_new_tokens < block_size: no block is decoded; the official code still makes the prefix forward when the
    prompt is longer than a block and appends its autoregressive token when the prompt ends on a block boundary."""
    prompt = [list(range(3, 3 + P))]
    out = _run(fdv2, "fastdllm_v2", prompt, 16, block_size=32, small_block_size=8, stop_token=290)
    assert out.nfe == nfe and len(out.sequences[0]) == P + extra
    assert out.sequences[0][:P].tolist() == prompt[0]


def test_fastdllm_dual_cache_exact_on_block_causal_model(sdar):
    """The existing fixed-blocks schedulers on a block-causal model (blocks of the model's size, aligned with the
    prompt bucket): the dual cache gives the same tokens as recomputing every forward (no logit shift: SDAR)."""
    from dllm_jax.generate import generate
    from dllm_jax.presets import make_schedule

    m = sdar.with_block_causal(4, whole_prompt=False)
    prompts = [list(range(5, 21)), list(range(30, 41))]
    kw = dict(block_length=4, threshold=0.7)
    ref = generate(m, prompts, gen_length=16, schedule=make_schedule("fastdllm", 16, m.cfg, **kw))
    for name in ("fastdllm_dual", "fastdllm_prefix"):
        out = generate(m, prompts, gen_length=16, schedule=make_schedule(name, 16, m.cfg, **kw))
        np.testing.assert_array_equal(out.sequences, ref.sequences)


def test_tied_head_int8(fixtures, tmp_path):
    """int8-all on a tied model quantizes the one embedding matrix; the head reads it (per-row scales) exactly as
    the dequantized float embedding would."""
    import dataclasses

    import dllm_jax
    from dllm_jax import quant

    _tied_copy(fixtures / "fastdllm_v2_tiny", tmp_path / "tied")
    q = dllm_jax.load(str(tmp_path / "tied"), quantize="int8-all")
    assert isinstance(q.params["embed"], quant.QArray) and "lm_head" not in q.params
    deq = dataclasses.replace(q, params={**q.params, "embed": quant.dequantize(q.params["embed"])})
    ids = np.arange(3, 43)[None]
    np.testing.assert_allclose(np.asarray(q.logits(ids)), np.asarray(deq.logits(ids)), atol=1e-4)
