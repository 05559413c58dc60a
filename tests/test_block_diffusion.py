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
