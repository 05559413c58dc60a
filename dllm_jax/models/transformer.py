"""The llama-style bidirectional transformer body shared by LLaDA and Dream (pure functions over a params pytree).

Params pytree (dict of arrays; layers stacked on a leading axis and run with `lax.scan`):
  embed [V, D]; final_norm [D]; lm_head [D, V];
  layers: attn_norm [L, D], wq [L, D, H*hd], wk/wv [L, D, K*hd], (bq [L, H*hd], bk/bv [L, K*hd] if qkv_bias),
          wo [L, H*hd, D], mlp_norm [L, D], w_gate/w_up [L, D, F], w_down [L, F, D].
Any matrix (and the embedding / LM head) may instead be a `dllm_jax.quant.QArray` (int8 values + float32
per-output-channel scales); `_proj`, `_head` and `_embed` dequantize it inside the matmul / lookup.
KV cache pytree: {"k": [L, B, S, K, hd], "v": [L, B, S, K, hd]}, keys stored AFTER RoPE: a key is rotated once, at
its own position, when it is computed (the reference code caches raw keys and rotates every cached key at every call;
a position's rotation never changes, so the values are the same and the per-call work over the whole cache is gone).
Head rows: `forward`/`forward_window` take an optional (head_start [B], static head_width): the final norm and LM head
run only on those rows (the positions a schedule can commit), logits [B, head_width, V].
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from dllm_jax import quant
from dllm_jax.models.config import ModelConfig
from pallas_kernels.block_attention import api as attn_api


# Families with their own body (same forward / forward_window / init_params contract), registered by their module
# on import (dllm_jax.models imports them): family name -> module. The engine calls this module's entry points.
_BODIES: dict = {}


def register_body(family: str, module) -> None:
    _BODIES[family] = module


def rms_norm(x, w, eps):
    # Reference (LLaDA and Qwen2): normalise in float32, cast back to the input dtype, then multiply by the weight.
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def rope_tables(positions_BxT, head_dim, theta):
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions_BxT.astype(jnp.float32)[..., None] * inv_freq  # B,T,hd/2
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb)[:, :, None, :], jnp.sin(emb)[:, :, None, :]  # B,T,1,hd


def apply_rope(x_BxTxNxD, cos, sin):
    # NeoX rotate-half, computed in float32 (LLaDA rope_full_precision; Qwen2 also fp32 tables).
    xf = x_BxTxNxD.astype(jnp.float32)
    half = xf.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rot * sin).astype(x_BxTxNxD.dtype)


def _proj(x, w, b=None):
    if isinstance(w, quant.QArray):  # int8 weight: dequantized inside the matmul (see dllm_jax.quant)
        y = quant.einsum("btd,df->btf", x, w)
    else:
        y = jnp.einsum("btd,df->btf", x, w.astype(x.dtype))
    if b is not None:
        y = y + b.astype(y.dtype)
    return y


def _qkv(cfg: ModelConfig, lp, h):
    B, T, _ = h.shape
    q = _proj(h, lp["wq"], lp.get("bq")).reshape(B, T, cfg.n_heads, cfg.head_dim)
    k = _proj(h, lp["wk"], lp.get("bk")).reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
    v = _proj(h, lp["wv"], lp.get("bv")).reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
    if "q_norm" in lp:  # Qwen3 / SDAR: per-head RMSNorm of q and k over head_dim, before RoPE
        q = rms_norm(q, lp["q_norm"], cfg.norm_eps)
        k = rms_norm(k, lp["k_norm"], cfg.norm_eps)
    return q, k, v


def _mlp(cfg, lp, x):
    h = rms_norm(x, lp["mlp_norm"], cfg.norm_eps)
    g = _proj(h, lp["w_gate"])
    u = _proj(h, lp["w_up"])
    return _proj(jax.nn.silu(g) * u, lp["w_down"])


def rope(x_BxTxNxD, positions_BxT, cfg):
    cos, sin = rope_tables(positions_BxT, cfg.head_dim, cfg.rope_theta)
    return apply_rope(x_BxTxNxD, cos, sin)


def _attend(cfg, q, k_all, v_all, key_valid_BxS, q_pos, k_pos, q_index, interpret, key_end=None, k_roped=False):
    """Attention of RoPE-less queries over keys (rotated here unless `k_roped`: the cache keeps rotated keys)."""
    q = rope(q, q_pos, cfg)
    k = k_all if k_roped else rope(k_all, k_pos, cfg)
    if key_end is not None:  # per-query visible keys [0, key_end): the block-causal rule with blocks of 1
        q_index, block_size = key_end - 1, 1
    else:
        block_size = cfg.block_causal
    return attn_api.block_attention(
        q, k, v_all, key_valid_BxS, q_index, block_size=block_size,
        implementation=cfg.attention_impl, interpret=interpret or cfg.attention_interpret)


def _head(params, cfg, x):
    x = rms_norm(x, params["final_norm"], cfg.norm_eps)
    if "lm_head" not in params:  # tied embeddings (tie_word_embeddings): logits = x @ embed.T
        e = params["embed"]
        if isinstance(e, quant.QArray):  # int8 rows with per-row scales [V, 1]: scale the logits per vocab entry
            y = jnp.einsum("btd,vd->btv", x, e.q.astype(x.dtype), preferred_element_type=jnp.float32)
            return y * e.scale.reshape(-1).astype(jnp.float32)
        return jnp.einsum("btd,vd->btv", x, e.astype(x.dtype), preferred_element_type=jnp.float32)
    w = params["lm_head"]
    if isinstance(w, quant.QArray):
        return quant.einsum("btd,dv->btv", x, w, out_dtype=jnp.float32)
    return jnp.einsum("btd,dv->btv", x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def head_rows(params, cfg, x, head_start=None, head_width=None, hidden=False):
    """LM head over all rows of x [B, T, D], or only rows [head_start, head_start + head_width) of each row.
    hidden=True: those rows' final hidden states (before the final norm) instead of logits; the caller applies the
    head (`head_rows(params, cfg, h)`) to the rows it picks (the engine's masked-rows head, engine/loop.py)."""
    if not (head_start is None or head_width is None or head_width >= x.shape[1]):
        x = _row_slice(x, head_start, head_width)
    return x if hidden else _head(params, cfg, x)


def _embed(params, tokens):
    e = params["embed"]
    if isinstance(e, quant.QArray):
        return quant.take(e, tokens)
    return jnp.take(e, tokens, axis=0)


def _query_blocks(cfg: ModelConfig, q_index_BxT, prefix_len):
    """Query indices as the block-causal rule sees them. With `cfg.block_causal_prompt` the prompt [0, prefix_len) is
    one block: its queries are placed at prefix_len - 1, so they see the whole prompt (and no later block), while the
    generated queries keep their own blocks (the kernels need no extra argument). Needs prefix_len to be a multiple of
    block_causal for the generated blocks to start at the prompt's end."""
    if not (cfg.block_causal and cfg.block_causal_prompt) or prefix_len is None:
        return q_index_BxT
    return jnp.maximum(q_index_BxT, jnp.asarray(prefix_len, jnp.int32) - 1)


@partial(jax.jit, static_argnames=("cfg", "interpret", "head_width", "head_hidden"))
def forward(params, cfg: ModelConfig, tokens_BxT, positions_BxT=None, key_valid_BxT=None, interpret=False,
            prefix_len=None, key_end=None, head_start=None, head_width=None, head_hidden=False):
    """Full forward over the whole buffer. Returns (logits [B,T,V] float32, kv cache pytree).

    prefix_len: the prompt length, used only by block-causal models whose prompt is one block
    (`cfg.block_causal_prompt`); without it such a model splits the prompt into blocks.
    key_end: optional [B, T] int: query t sees only keys [0, key_end[b, t]) (replaces cfg.block_causal; block-diffusion
    policies pass the mask each official forward uses, dllm_jax/engine/block_diffusion.py).
    head_start [B] / head_width (static): logits only for rows [head_start, head_start + head_width) ([B, W, V]);
    head_hidden (static): those rows' hidden states [B, W, D] instead (see `head_rows`)."""
    if cfg.family in _BODIES:
        return _BODIES[cfg.family].forward(params, cfg, tokens_BxT, positions_BxT, key_valid_BxT, interpret=interpret,
                                           prefix_len=prefix_len, **_key_end_kw(key_end),
                                           **_head_kw(head_start, head_width, head_hidden))
    B, T = tokens_BxT.shape
    if positions_BxT is None:
        positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if key_valid_BxT is None:
        key_valid_BxT = jnp.ones((B, T), bool)
    q_index = _query_blocks(cfg, jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)), prefix_len)
    x = _embed(params, tokens_BxT)

    def layer(x, lp):
        h = rms_norm(x, lp["attn_norm"], cfg.norm_eps)
        q, k, v = _qkv(cfg, lp, h)
        k = rope(k, positions_BxT, cfg)
        o = _attend(cfg, q, k, v, key_valid_BxT, positions_BxT, positions_BxT, q_index, interpret, key_end,
                    k_roped=True)
        x = x + _proj(o.reshape(B, T, -1), lp["wo"])
        x = x + _mlp(cfg, lp, x)
        return x, (k, v)

    x, (k, v) = jax.lax.scan(layer, x, params["layers"])
    return head_rows(params, cfg, x, head_start, head_width, head_hidden), {"k": k, "v": v}


def _key_end_kw(key_end):
    return {} if key_end is None else {"key_end": key_end}


def _head_kw(head_start, head_width, head_hidden=False):
    kw = {} if head_start is None else {"head_start": head_start, "head_width": head_width}
    return {**kw, "head_hidden": True} if head_hidden else kw


def _row_slice(a_BxS, start_B, size):
    return jax.vmap(lambda a, s: jax.lax.dynamic_slice_in_dim(a, s, size, axis=0))(a_BxS, start_B)


def _row_update(a_BxS, upd_BxW, start_B):
    return jax.vmap(lambda a, u, s: jax.lax.dynamic_update_slice_in_dim(a, u, s, axis=0))(a_BxS, upd_BxW, start_B)


@partial(jax.jit, static_argnames=("cfg", "interpret", "head_width", "head_hidden"))
def forward_window(params, cfg: ModelConfig, tokens_BxW, start_B, write_BxW, cache, positions_BxS, key_valid_BxS,
                   interpret=False, prefix_len=None, key_end=None, head_start=None, head_width=None,
                   head_hidden=False):
    """Cached forward of a window of W queries at per-row offsets `start_B` into the S-long KV buffer.

    For each layer the window's freshly computed K/V overwrite the cache where `write_BxW` is true (dual-cache
    `replace_position`; prefix-cache = write the whole suffix); the queries then attend over the full updated
    buffer (masked by `key_valid_BxS`). The caller guarantees start + W <= S. prefix_len, key_end ([B, W]): as in
    `forward`; head_start ([B], relative to the window) / head_width / head_hidden: as in `forward`.
    Returns (logits [B,W,V] float32, updated cache).
    """
    if cfg.family in _BODIES:
        return _BODIES[cfg.family].forward_window(params, cfg, tokens_BxW, start_B, write_BxW, cache, positions_BxS,
                                                  key_valid_BxS, interpret=interpret, prefix_len=prefix_len,
                                                  **_key_end_kw(key_end),
                                                  **_head_kw(head_start, head_width, head_hidden))
    B, W = tokens_BxW.shape
    q_pos = _row_slice(positions_BxS, start_B, W)
    q_index = _query_blocks(cfg, start_B[:, None] + jnp.arange(W, dtype=jnp.int32)[None], prefix_len)
    x = _embed(params, tokens_BxW)

    def layer(x, lp_kv):
        lp, ck, cv = lp_kv
        h = rms_norm(x, lp["attn_norm"], cfg.norm_eps)
        q, k, v = _qkv(cfg, lp, h)
        k = rope(k, q_pos, cfg)  # the window's keys, rotated once at their positions (the cache holds rotated keys)
        wmask = write_BxW[:, :, None, None]
        k_blend = jnp.where(wmask, k.astype(ck.dtype), _row_slice(ck, start_B, W))
        v_blend = jnp.where(wmask, v.astype(cv.dtype), _row_slice(cv, start_B, W))
        ck = _row_update(ck, k_blend, start_B)
        cv = _row_update(cv, v_blend, start_B)
        o = _attend(cfg, q, ck.astype(q.dtype), cv.astype(q.dtype), key_valid_BxS, q_pos, positions_BxS, q_index,
                    interpret, key_end, k_roped=True)
        x = x + _proj(o.reshape(B, W, -1), lp["wo"])
        x = x + _mlp(cfg, lp, x)
        return x, (ck, cv)

    x, (k, v) = jax.lax.scan(layer, x, (params["layers"], cache["k"], cache["v"]))
    return head_rows(params, cfg, x, head_start, head_width, head_hidden), {"k": k, "v": v}


def shift_logits(logits_BxTxV):
    """Dream's right shift: the prediction for position i is raw row i-1; position 0 keeps its own row."""
    return jnp.concatenate([logits_BxTxV[:, :1], logits_BxTxV[:, :-1]], axis=1)


def init_params(cfg: ModelConfig, key, dtype=jnp.float32, scale=0.02):
    """Random params with the converted layout (used by training and random-weight benchmarks)."""
    if cfg.family in _BODIES:
        return _BODIES[cfg.family].init_params(cfg, key, dtype=dtype, scale=scale)
    D, L, H, K, hd, F, V = (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_hidden,
                            cfg.vocab_size)
    ks = iter(jax.random.split(key, 16))

    def n(shape, s=scale):
        return (jax.random.normal(next(ks), shape, jnp.float32) * s).astype(dtype)

    layers = {
        "attn_norm": jnp.ones((L, D), dtype), "wq": n((L, D, H * hd)), "wk": n((L, D, K * hd)),
        "wv": n((L, D, K * hd)), "wo": n((L, H * hd, D), scale / (2 * L) ** 0.5), "mlp_norm": jnp.ones((L, D), dtype),
        "w_gate": n((L, D, F)), "w_up": n((L, D, F)), "w_down": n((L, F, D), scale / (2 * L) ** 0.5),
    }
    if cfg.qkv_bias:
        layers.update(bq=jnp.zeros((L, H * hd), dtype), bk=jnp.zeros((L, K * hd), dtype),
                      bv=jnp.zeros((L, K * hd), dtype))
    if cfg.qk_norm:
        layers.update(q_norm=jnp.ones((L, hd), dtype), k_norm=jnp.ones((L, hd), dtype))
    out = {"embed": n((V, D)), "layers": layers, "final_norm": jnp.ones((D,), dtype), "lm_head": n((D, V))}
    if cfg.tie_embeddings:
        del out["lm_head"]  # the head is embed.T (`_head`)
    return out


def param_shapes(cfg: ModelConfig) -> dict:
    """Shapes of every leaf of the params pytree (for checks and eval_shape tables)."""
    return jax.tree.map(lambda a: tuple(a.shape), jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
