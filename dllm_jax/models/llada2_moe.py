"""LLaDA 2.x (LLaDA2.0-mini/-flash, LLaDA2.1-mini/-flash): a block-diffusion Mixture-of-Experts body.

Matches the hub remote code `modeling_llada2_moe.py` (`LLaDA2MoeModelLM`; both the 2.0 and the 2.1 file define the
same modules): fused q/k/v projection, per-head QK RMSNorm before a partial RoPE (first `rope_dim` dims of a head),
GQA, no biases; the first `first_dense_layers` layers have a dense SwiGLU MLP, the others a MoE:
  router  logits = x_f32 @ W_f32 ([N, E]), s = sigmoid(logits) in float32; selection on s + expert_bias with
          group-limited top-k (E experts in n_group contiguous groups, group score = sum of its 2 best biased scores,
          the topk_group best groups kept, then top-k over their experts, descending); weights = the unbiased s of the
          selected experts, normalised (k > 1) and times routed_scaling.
  experts out = sum_k weight_k * expert_k(x) (expert outputs cast to float32 for the weighted sum, the sum cast back)
          + shared expert (SwiGLU of width moe_hidden * n_shared_experts).
The expert compute touches only the selected experts (`moe_impl`):
  "ragged"  tokens sorted by expert, `jax.lax.ragged_dot` grouped matmuls (XLA's grouped GEMM on TPU/GPU; XLA:CPU
            lowers it to a masked dense product over all experts, so on CPU it is no cheaper than "dense");
  "segment" the pairs sorted by expert and cut into tiles of T rows, one expert per tile, each tile gathering its
            expert's matrices once (`experts_segment`): at most ~2 N k rows computed whatever E is;
  "gather"  each (token, slot) pair gathers its expert's weights and runs a batched matmul: FLOPs exactly
            2 N k (3 D F), independent of E, but N k weight matrices are moved (memory-bound; tests/benchmarks);
  "auto"    "ragged" on an accelerator, "segment" on CPU (docs/benchmarks/moe_cpu.md);
  "dense"   the reference: every expert on every token, then the top-k combination (tests and benchmarks only).

Params pytree (Flax [in, out] layout; leaves stacked on a leading layer axis):
  embed [V, D]; final_norm [D]; lm_head [D, V];
  layers (all L): attn_norm [L, D], wq [L, D, H*hd], wk/wv [L, D, K*hd], q_norm/k_norm [L, hd], wo [L, H*hd, D],
                  mlp_norm [L, D]  (+ bq [L, H*hd], bk/bv [L, K*hd] with use_qkv_bias);
  dense (first Ld): w_gate/w_up [Ld, D, F], w_down [Ld, F, D];
  moe (the other Lm = L - Ld): router [Lm, D, E] (float32), expert_bias [Lm, E] (float32),
                  w_gate/w_up [Lm, E, D, Fe], w_down [Lm, E, Fe, D], s_gate/s_up [Lm, D, Fs], s_down [Lm, Fs, D].
KV cache: {"k", "v"}: [L, B, S, K, hd], keys after QK-norm and before RoPE (as transformer.py).

Attention masks: `cfg.block_causal` = the block length of the `generate` mask (blocks from canvas index 0);
`cfg.block_mask_mode` "hard" = LLaDA2.0's 0/-inf mask, "soft01" = LLaDA2.1's 0/1 mask added as it is (see
`soft_block_attention`). Without block_causal the forward is bidirectional (the 2.0 file without a mask).
"""

from __future__ import annotations

import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from dllm_jax import quant
from dllm_jax.models import transformer
from dllm_jax.models.config import ConfigError, ModelConfig
from dllm_jax.models.transformer import _embed, _proj, _row_slice, _row_update, head_rows, rms_norm
from pallas_kernels.block_attention import api as attn_api

FAMILY = "llada2_moe"
DEFAULT_PRESET = "llada2"  # `dllm-jax generate --model DIR` without --schedule (dllm_jax/presets_llada2.py)
PRESETS = ("llada2", "llada21")  # made for this family (`dllm-jax presets`)
TRAIN_BLOCK = 32  # LLaDA 2.x block length (training, the hub generate's default, SGLang's serving block)
MOE_IMPLS = ("auto", "ragged", "segment", "gather", "dense")
MASK_MODES = ("hard", "soft01")

# (regex on the HF name, params path, transpose?); the expert index is the regex's second group. query_key_value is
# split into wq/wk/wv by the reader (dllm_jax/moe_weights.py).
WEIGHT_TABLE = (
    (r"model\.word_embeddings\.weight", ("embed",), False),
    (r"model\.norm\.weight", ("final_norm",), False),
    (r"lm_head\.weight", ("lm_head",), True),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", ("layers", "attn_norm"), False),
    (r"model\.layers\.(\d+)\.attention\.query_key_value\.weight", ("layers", "wqkv"), True),
    (r"model\.layers\.(\d+)\.attention\.query_key_value\.bias", ("layers", "bqkv"), False),
    (r"model\.layers\.(\d+)\.attention\.query_layernorm\.weight", ("layers", "q_norm"), False),
    (r"model\.layers\.(\d+)\.attention\.key_layernorm\.weight", ("layers", "k_norm"), False),
    (r"model\.layers\.(\d+)\.attention\.dense\.weight", ("layers", "wo"), True),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", ("layers", "mlp_norm"), False),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", ("dense", "w_gate"), True),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", ("dense", "w_up"), True),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", ("dense", "w_down"), True),
    (r"model\.layers\.(\d+)\.mlp\.gate\.weight", ("moe", "router"), True),
    (r"model\.layers\.(\d+)\.mlp\.gate\.expert_bias", ("moe", "expert_bias"), False),
    (r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.gate_proj\.weight", ("moe", "w_gate"), True),
    (r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.up_proj\.weight", ("moe", "w_up"), True),
    (r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.down_proj\.weight", ("moe", "w_down"), True),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.gate_proj\.weight", ("moe", "s_gate"), True),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.up_proj\.weight", ("moe", "s_up"), True),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.down_proj\.weight", ("moe", "s_down"), True),
)

FLOAT32_LEAVES = ("router", "expert_bias")  # the official router runs in float32 whatever the model dtype


# ------------------------------------------------------------------------------------------------------- config

def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """LLaDA2MoeConfig (hub `configuration_llada2_moe.py`) -> ModelConfig. Keys the hub code never reads
    (score_function, norm_topk_prob, router_dtype, moe_router_enable_expert_bias, rotary_dim) are checked against
    what the code hard-codes, so a config that asks for something else is an error, not a silent mismatch."""
    def need(k):
        if hf.get(k) is None:
            raise ConfigError(f"{where}: LLaDA2 MoE config has no '{k}'")
        return hf[k]

    d, nh = int(need("hidden_size")), int(need("num_attention_heads"))
    nkv = int(hf.get("num_key_value_heads") or 0)
    if nkv <= 0 or nh % nkv:
        raise ConfigError(f"{where}: num_key_value_heads must be a positive divisor of num_attention_heads ({nh}), "
                          f"got {hf.get('num_key_value_heads')!r} (the config class defaults it to 0)")
    hd = int(hf.get("head_dim") or d // nh)
    prf = float(hf.get("partial_rotary_factor", 0.5))
    rope_dim = int(hd * prf)
    if rope_dim <= 0 or rope_dim % 2 or rope_dim > hd:
        raise ConfigError(f"{where}: partial_rotary_factor {prf} gives a RoPE width of {rope_dim} of head_dim {hd}; "
                          "expected an even width in (0, head_dim]")
    if hf.get("use_bias", True):
        raise ConfigError(f"{where}: use_bias=true (bias on the attention output and MLPs) is not supported; the "
                          "released LLaDA2 configs set use_bias false (note the config class defaults it to true)")
    if not hf.get("use_qk_norm", True):
        raise ConfigError(f"{where}: use_qk_norm=false is not supported (every released LLaDA2 config uses QK-norm)")
    if str(hf.get("hidden_act", "silu")) != "silu":
        raise ConfigError(f"{where}: hidden_act {hf.get('hidden_act')!r} is not supported (expected 'silu')")
    if hf.get("rope_scaling"):
        raise ConfigError(f"{where}: rope_scaling {hf['rope_scaling']!r} is not supported (expected null)")
    for k, want in (("score_function", "sigmoid"), ("norm_topk_prob", True)):
        if k in hf and hf[k] != want:
            raise ConfigError(f"{where}: {k}={hf[k]!r}, but the LLaDA2 modeling code hard-codes {want!r}")
    E = int(need("num_experts"))
    k = int(need("num_experts_per_tok"))
    ng, tg = int(hf.get("n_group") or 1), int(hf.get("topk_group") or 1)
    if E <= 0 or not (0 < k <= E):
        raise ConfigError(f"{where}: need 0 < num_experts_per_tok ({k}) <= num_experts ({E})")
    if E % ng or E // ng < 2 or not (0 < tg <= ng) or k > tg * (E // ng):
        raise ConfigError(f"{where}: group-limited routing needs num_experts ({E}) divisible by n_group ({ng}) into "
                          f"groups of >= 2, 0 < topk_group ({tg}) <= n_group and top-k ({k}) <= the experts of "
                          "the kept groups")
    L = int(need("num_hidden_layers"))
    fk = int(hf.get("first_k_dense_replace") or 0)
    if not (0 <= fk <= L):
        raise ConfigError(f"{where}: first_k_dense_replace ({fk}) must lie in [0, num_hidden_layers={L}]")
    if hf.get("tie_word_embeddings"):
        raise ConfigError(f"{where}: tie_word_embeddings=true is not supported (LLaDA2 checkpoints are untied)")
    eos = hf.get("eos_token_id", 156892)
    eos = eos[0] if isinstance(eos, list) else eos
    return ModelConfig(
        family=FAMILY, vocab_size=int(need("vocab_size")), d_model=d, n_layers=L, n_heads=nh, n_kv_heads=nkv,
        head_dim=hd, mlp_hidden=int(need("intermediate_size")), rope_theta=float(hf.get("rope_theta", 600000.0)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), qkv_bias=bool(hf.get("use_qkv_bias", False)),
        mask_token_id=int(hf.get("mask_token_id", 156895)), eos_token_id=int(eos),
        pad_token_id=int(hf["pad_token_id"] if hf.get("pad_token_id") is not None else eos),
        max_seq_len=int(hf.get("max_position_embeddings", 32768)), logit_shift=False,
        qk_norm=True, rope_dim=rope_dim, n_experts=E, n_experts_per_tok=k,
        moe_hidden=int(need("moe_intermediate_size")),
        n_shared_experts=int(hf.get("num_shared_experts") or 0), n_group=ng, topk_group=tg,
        routed_scaling=float(hf.get("routed_scaling_factor", 1.0)), first_dense_layers=fk,
        extra=(("train_block_size", TRAIN_BLOCK),),
    )


# ---------------------------------------------------------------------------------------------------- attention

def rope_partial(x_BxTxNxD, positions_BxT, rope_dim, theta):
    """HF default RoPE on the first rope_dim dims (rotate-half over that slice); cos/sin computed in float32 and
    cast to the activation dtype, the rotation computed in that dtype (as the official code)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rope_dim, 2, dtype=jnp.float32) / rope_dim))
    freqs = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    dt = x_BxTxNxD.dtype
    cos, sin = jnp.cos(emb).astype(dt)[:, :, None, :], jnp.sin(emb).astype(dt)[:, :, None, :]
    xr, xp = x_BxTxNxD[..., :rope_dim], x_BxTxNxD[..., rope_dim:]
    half = rope_dim // 2
    rot = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    return jnp.concatenate([xr * cos + rot * sin, xp], axis=-1)


def soft_block_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, key_valid_BxS, q_pos_BxT, block_size, key_end_BxT=None,
                         k_pos_BxS=None):
    """LLaDA2.1 `generate`'s mask: the block pattern (key_block <= query_block) as 0/1 values passed as an additive
    float mask to SDPA, i.e. +1 on the scores of allowed keys and +0 elsewhere: no key is excluded (the quirk; the
    later dllm fix `.log()`s it into 0/-inf). Blocks are counted in model positions (q_pos, k_pos), so a left-padded
    row sees its own pattern. Keys outside key_valid (padding) or past key_end (the forward's window) are excluded
    as keys the official forward never had."""
    B, T, H, D = q_BxTxHxD.shape
    S, K = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
    G = H // K
    q = q_BxTxHxD.reshape(B, T, K, G, D)
    s = jnp.einsum("btkgd,bskd->bkgts", q, k_BxSxKxD, preferred_element_type=jnp.float32) * (D ** -0.5)
    k_idx = jnp.arange(S, dtype=jnp.int32)
    k_pos = jnp.broadcast_to(k_idx, (B, S)) if k_pos_BxS is None else k_pos_BxS
    allowed = (q_pos_BxT[:, :, None] // block_size) >= (k_pos[:, None, :] // block_size)
    s = s + allowed[:, None, None].astype(jnp.float32)
    m = jnp.broadcast_to(key_valid_BxS[:, None, :], (B, T, S))
    if key_end_BxT is not None:  # the forward's window [0, key_end): later keys do not exist for the official code
        m = m & (k_idx[None, None, :] < key_end_BxT[:, :, None])
    m = m[:, None, None]
    s = jnp.where(m, s, -jnp.inf)
    mx = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(m, jnp.exp(s - jnp.where(jnp.isfinite(mx), mx, 0.0)), 0.0)
    den = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(den == 0, 1.0, den)
    o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v_BxSxKxD.dtype), v_BxSxKxD, preferred_element_type=jnp.float32)
    return o.reshape(B, T, H, D).astype(q_BxTxHxD.dtype)


def _qkv(cfg: ModelConfig, lp, h):
    B, T, _ = h.shape
    q = _proj(h, lp["wq"], lp.get("bq")).reshape(B, T, cfg.n_heads, cfg.head_dim)
    k = _proj(h, lp["wk"], lp.get("bk")).reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
    v = _proj(h, lp["wv"], lp.get("bv")).reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
    return rms_norm(q, lp["q_norm"], cfg.norm_eps), rms_norm(k, lp["k_norm"], cfg.norm_eps), v


def _rope_k(cfg, k, k_pos):
    return rope_partial(k, k_pos, cfg.rope_dim or cfg.head_dim, cfg.rope_theta)


def _attend(cfg, q, k_all, v_all, key_valid_BxS, q_pos, k_pos, q_index, interpret, key_end=None, k_roped=False):
    """key_end [B, T] (optional): query t sees only keys [0, key_end) -- the window of the official forward. In
    "hard" mode it replaces the block rule (as transformer._attend); in "soft01" mode it bounds the window and the
    0/1 block bias of cfg.block_causal is added inside it. k_roped: the keys are already rotated (the cache keeps
    rotated keys: a key is rotated once, at its own position)."""
    rd = cfg.rope_dim or cfg.head_dim
    q = rope_partial(q, q_pos, rd, cfg.rope_theta)
    k = k_all if k_roped else rope_partial(k_all, k_pos, rd, cfg.rope_theta)
    if cfg.block_causal and cfg.block_mask_mode == "soft01":
        return soft_block_attention(q, k, v_all, key_valid_BxS, q_pos, cfg.block_causal, key_end, k_pos)
    block_size = cfg.block_causal
    if key_end is not None:  # the block-causal rule with blocks of 1 at q_index = key_end - 1
        q_index, block_size = key_end - 1, 1
    return attn_api.block_attention(q, k, v_all, key_valid_BxS, q_index, block_size=block_size,
                                    implementation=cfg.attention_impl,
                                    interpret=interpret or cfg.attention_interpret)


# ---------------------------------------------------------------------------------------------------------- MoE

def route(cfg: ModelConfig, h_NxD, router_DxE, bias_E):
    """The official gate. Returns (topk_idx [N, k] int32 in descending biased score, topk_weight [N, k] float32,
    router logits [N, E] float32)."""
    N, E = h_NxD.shape[0], cfg.n_experts
    logits = jnp.dot(h_NxD.astype(jnp.float32), router_DxE.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    s = jax.nn.sigmoid(logits)
    r = s + bias_E.astype(jnp.float32)
    gsz = E // cfg.n_group
    if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
        group_scores = jnp.sum(jax.lax.top_k(r.reshape(N, cfg.n_group, gsz), 2)[0], axis=-1)
        _, gidx = jax.lax.top_k(group_scores, cfg.topk_group)
        keep_g = jnp.zeros((N, cfg.n_group), bool).at[jnp.arange(N)[:, None], gidx].set(True)
        r = jnp.where(jnp.repeat(keep_g, gsz, axis=1), r, -jnp.inf)
    _, idx = jax.lax.top_k(r, cfg.n_experts_per_tok)
    w = jnp.take_along_axis(s, idx, axis=1)
    if cfg.n_experts_per_tok > 1:
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
    return idx.astype(jnp.int32), w * cfg.routed_scaling, logits


def _w(a, dtype):
    return a.dequantize() if isinstance(a, quant.QArray) else a.astype(dtype)


def _swiglu(x, wg, wu, wd):
    return _proj(jax.nn.silu(_proj(x, wg)) * _proj(x, wu), wd)


def experts_dense(x_NxD, idx_NxK, w_NxK, mp):
    """Reference: every expert on every token ([E, N, F] intermediates), then the top-k combination."""
    dt = x_NxD.dtype
    g = jnp.einsum("nd,edf->enf", x_NxD, _w(mp["w_gate"], dt))
    u = jnp.einsum("nd,edf->enf", x_NxD, _w(mp["w_up"], dt))
    y = jnp.einsum("enf,efd->end", jax.nn.silu(g) * u, _w(mp["w_down"], dt))  # [E, N, D]
    sel = jnp.take_along_axis(jnp.moveaxis(y, 0, 1), idx_NxK[:, :, None], axis=1)  # [N, K, D]
    return jnp.sum(sel.astype(jnp.float32) * w_NxK[..., None], axis=1).astype(dt)


def _qeinsum(spec, x, w, idx=None):
    """einsum of x with expert weights w [E, in, out] (QArray or float), optionally gathered per row by idx."""
    if isinstance(w, quant.QArray):
        q, sc = (w.q, w.scale) if idx is None else (w.q[idx], w.scale[idx])
        y = jnp.einsum(spec, x, q.astype(x.dtype), preferred_element_type=jnp.float32)
        sc = sc.squeeze(-2)
        return (y * (sc[:, None] if y.ndim == 3 else sc)).astype(x.dtype)
    ww = w if idx is None else w[idx]
    return jnp.einsum(spec, x, ww.astype(x.dtype))


def experts_gather(x_NxD, idx_NxK, w_NxK, mp):
    """Only the selected experts: each (token, slot) pair gathers its expert's three matrices ([N*K, D, F])."""
    N, K = idx_NxK.shape
    dt = x_NxD.dtype
    flat = idx_NxK.reshape(-1)
    xr = jnp.repeat(x_NxD, K, axis=0)  # [N*K, D], row n*K + j = token n
    g = _qeinsum("nd,ndf->nf", xr, mp["w_gate"], flat)
    u = _qeinsum("nd,ndf->nf", xr, mp["w_up"], flat)
    y = _qeinsum("nf,nfd->nd", jax.nn.silu(g) * u, mp["w_down"], flat)
    return jnp.sum(y.reshape(N, K, -1).astype(jnp.float32) * w_NxK[..., None], axis=1).astype(dt)


def experts_segment(x_NxD, idx_NxK, w_NxK, mp, tile: int | None = None):
    """Only the selected experts: the N*K (token, slot) pairs sorted by expert and cut into tiles of T rows that each
    belong to one expert (an expert's last tile is padded); every tile gathers its expert's matrices once and runs a
    [T, D] x [D, F] matmul. Static bound: M // T + min(E, M) tiles (M = N*K), so with T = max(1, M // E) at most
    ~2 M rows are computed whatever E is (the dense reference computes E * N)."""
    N, K = idx_NxK.shape
    M = N * K
    wg = mp["w_gate"]
    E = (wg.q if isinstance(wg, quant.QArray) else wg).shape[0]
    T = int(tile or max(1, M // E))
    NT = M // T + min(E, M)
    dt = x_NxD.dtype
    flat = idx_NxK.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    counts = jnp.bincount(flat, length=E).astype(jnp.int32)
    tiles_e = (counts + T - 1) // T
    cum_t = jnp.cumsum(tiles_e)
    t = jnp.arange(NT, dtype=jnp.int32)
    e_t = jnp.minimum(jnp.searchsorted(cum_t, t, side="right"), E - 1).astype(jnp.int32)
    j = t - (cum_t - tiles_e)[e_t]
    r = jnp.arange(T, dtype=jnp.int32)
    local = j[:, None] * T + r[None]  # row of the expert's sorted segment
    valid = (t < cum_t[-1])[:, None] & (local < counts[e_t][:, None])
    srow = jnp.clip((jnp.cumsum(counts) - counts)[e_t][:, None] + local, 0, M - 1)
    src = jnp.take(order, srow)  # [NT, T] pair index (token * K + slot)
    xt = jnp.where(valid[..., None], jnp.take(x_NxD, src // K, axis=0), 0).astype(dt)
    h = jax.nn.silu(_qeinsum("ntd,ndf->ntf", xt, wg, e_t)) * _qeinsum("ntd,ndf->ntf", xt, mp["w_up"], e_t)
    y = _qeinsum("ntf,nfd->ntd", h, mp["w_down"], e_t)
    out = jnp.zeros((M, y.shape[-1]), jnp.float32).at[jnp.where(valid, src, M)].add(
        y.astype(jnp.float32), mode="drop")
    return jnp.sum(out.reshape(N, K, -1) * w_NxK[..., None], axis=1).astype(dt)


def _ragged(x, w, group_sizes):
    if isinstance(w, quant.QArray):
        # per-output-channel scales differ per expert: scale the rows by their expert's scales after the dot
        y = jax.lax.ragged_dot(x, w.q.astype(x.dtype), group_sizes, preferred_element_type=jnp.float32)
        row_e = jnp.repeat(jnp.arange(w.q.shape[0]), group_sizes, total_repeat_length=x.shape[0])
        return (y * w.scale[row_e, 0]).astype(x.dtype)
    return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes)


def experts_ragged(x_NxD, idx_NxK, w_NxK, mp):
    """Only the selected experts: (token, slot) pairs sorted by expert, grouped matmuls with jax.lax.ragged_dot."""
    N, K = idx_NxK.shape
    E = (mp["w_gate"].q if isinstance(mp["w_gate"], quant.QArray) else mp["w_gate"]).shape[0]
    dt = x_NxD.dtype
    flat = idx_NxK.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    xs = jnp.take(x_NxD, order // K, axis=0)
    gs = jnp.bincount(flat, length=E).astype(jnp.int32)
    h = jax.nn.silu(_ragged(xs, mp["w_gate"], gs)) * _ragged(xs, mp["w_up"], gs)
    ys = _ragged(h, mp["w_down"], gs)
    y = jnp.zeros_like(ys).at[order].set(ys)
    return jnp.sum(y.reshape(N, K, -1).astype(jnp.float32) * w_NxK[..., None], axis=1).astype(dt)


EXPERT_IMPLS = {"dense": experts_dense, "gather": experts_gather, "segment": experts_segment,
                "ragged": experts_ragged}


def resolve_moe_impl(name: str) -> str:
    if name not in MOE_IMPLS:
        raise ValueError(f"unknown moe_impl {name!r}; expected one of {MOE_IMPLS}")
    if name == "auto":
        return "segment" if jax.default_backend() == "cpu" else "ragged"
    return name


def moe_mlp(cfg: ModelConfig, mp, x_BxTxD, return_routing=False):
    """The sparse MoE block (+ shared expert) on [B, T, D]."""
    B, T, D = x_BxTxD.shape
    h = x_BxTxD.reshape(B * T, D)
    idx, w, logits = route(cfg, h, mp["router"], mp["expert_bias"])
    y = EXPERT_IMPLS[resolve_moe_impl(cfg.moe_impl)](h, idx, w, mp)
    if cfg.n_shared_experts:
        y = y + _swiglu(h[None], mp["s_gate"], mp["s_up"], mp["s_down"])[0]
    y = y.reshape(B, T, D)
    if return_routing:
        return y, (logits.reshape(B, T, -1), idx.reshape(B, T, -1), w.reshape(B, T, -1))
    return y


# ------------------------------------------------------------------------------------------------------ forward

def _split_layers(params, cfg):
    Ld = cfg.first_dense_layers
    attn = params["layers"]
    head = jax.tree.map(lambda a: a[:Ld], attn)
    tail = jax.tree.map(lambda a: a[Ld:], attn)
    return (head, params.get("dense")), (tail, params.get("moe"))


def _body(params, cfg, x, attend_fn, caches=None, collect=False):
    """Run the layers: a scan over the dense layers, then one over the MoE layers. attend_fn(lp, q, k, v, ck, cv)
    -> (o, k_store, v_store). Returns (x, (k, v) stacked over all layers, routing per MoE layer or None)."""
    (hl, dense), (tl, moe) = _split_layers(params, cfg)
    Ld = cfg.first_dense_layers
    B, T, _ = x.shape

    def layer(kind):
        def f(x, xs):
            lp, mp, ck, cv = xs
            h = rms_norm(x, lp["attn_norm"], cfg.norm_eps)
            q, k, v = _qkv(cfg, lp, h)
            o, ks, vs = attend_fn(q, k, v, ck, cv)
            x = x + _proj(o.reshape(B, T, -1), lp["wo"])
            h = rms_norm(x, lp["mlp_norm"], cfg.norm_eps)
            if kind == "dense":
                return x + _swiglu(h, mp["w_gate"], mp["w_up"], mp["w_down"]), (ks, vs, None)
            y, routing = moe_mlp(cfg, mp, h, return_routing=True)
            return x + y, (ks, vs, routing if collect else None)
        return f

    ck = cv = None
    kvs, routing = [], None
    if Ld:
        xs = (hl, dense) + ((caches["k"][:Ld], caches["v"][:Ld]) if caches else (None, None))
        x, (k1, v1, _) = jax.lax.scan(layer("dense"), x, xs)
        kvs.append((k1, v1))
    if cfg.n_layers > Ld:
        xs = (tl, moe) + ((caches["k"][Ld:], caches["v"][Ld:]) if caches else (None, None))
        x, (k2, v2, routing) = jax.lax.scan(layer("moe"), x, xs)
        kvs.append((k2, v2))
    k = jnp.concatenate([a for a, _ in kvs]) if len(kvs) > 1 else kvs[0][0]
    v = jnp.concatenate([b for _, b in kvs]) if len(kvs) > 1 else kvs[0][1]
    del ck, cv
    return x, {"k": k, "v": v}, routing


def _forward_impl(params, cfg, tokens_BxT, positions_BxT, key_valid_BxT, interpret, collect, key_end=None,
                  head_start=None, head_width=None, head_hidden=False):
    B, T = tokens_BxT.shape
    if positions_BxT is None:
        positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if key_valid_BxT is None:
        key_valid_BxT = jnp.ones((B, T), bool)
    q_index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

    def attend(q, k, v, ck, cv):
        k = _rope_k(cfg, k, positions_BxT)
        return (_attend(cfg, q, k, v, key_valid_BxT, positions_BxT, positions_BxT, q_index, interpret, key_end,
                        k_roped=True), k, v)

    x, kv, routing = _body(params, cfg, _embed(params, tokens_BxT), attend, collect=collect)
    return head_rows(params, cfg, x, head_start, head_width, head_hidden), kv, routing


@partial(jax.jit, static_argnames=("cfg", "interpret", "head_width", "head_hidden"))
def forward(params, cfg: ModelConfig, tokens_BxT, positions_BxT=None, key_valid_BxT=None, interpret=False,
            prefix_len=None, key_end=None, head_start=None, head_width=None, head_hidden=False):
    """Full forward. Returns (logits [B, T, V] float32, kv cache). prefix_len is accepted for the engine's
    signature and unused: LLaDA2's blocks start at canvas index 0 (the prompt is split into blocks). key_end
    ([B, T], optional): per-query visible keys [0, key_end), see `_attend`. head_start/head_width: as in
    transformer.forward (logits of those rows only; head_hidden: their hidden states)."""
    logits, kv, _ = _forward_impl(params, cfg, tokens_BxT, positions_BxT, key_valid_BxT, interpret, False, key_end,
                                  head_start, head_width, head_hidden)
    return logits, kv


@partial(jax.jit, static_argnames=("cfg", "interpret"))
def forward_with_routing(params, cfg: ModelConfig, tokens_BxT, positions_BxT=None, key_valid_BxT=None,
                         interpret=False):
    """forward plus, per MoE layer, (router logits [Lm, B, T, E], top-k indices [Lm, B, T, k], weights)."""
    return _forward_impl(params, cfg, tokens_BxT, positions_BxT, key_valid_BxT, interpret, True)


@partial(jax.jit, static_argnames=("cfg", "interpret", "head_width", "head_hidden"))
def forward_window(params, cfg: ModelConfig, tokens_BxW, start_B, write_BxW, cache, positions_BxS, key_valid_BxS,
                   interpret=False, prefix_len=None, key_end=None, head_start=None, head_width=None,
                   head_hidden=False):
    """Cached forward of W queries at per-row offsets (the contract of transformer.forward_window)."""
    B, W = tokens_BxW.shape
    q_pos = _row_slice(positions_BxS, start_B, W)
    q_index = start_B[:, None] + jnp.arange(W, dtype=jnp.int32)[None]

    def attend(q, k, v, ck, cv):
        k = _rope_k(cfg, k, q_pos)
        wmask = write_BxW[:, :, None, None]
        ck = _row_update(ck, jnp.where(wmask, k.astype(ck.dtype), _row_slice(ck, start_B, W)), start_B)
        cv = _row_update(cv, jnp.where(wmask, v.astype(cv.dtype), _row_slice(cv, start_B, W)), start_B)
        o = _attend(cfg, q, ck.astype(q.dtype), cv.astype(q.dtype), key_valid_BxS, q_pos, positions_BxS, q_index,
                    interpret, key_end, k_roped=True)
        return o, ck, cv

    x, kv, _ = _body(params, cfg, _embed(params, tokens_BxW), attend, caches=cache)
    return head_rows(params, cfg, x, head_start, head_width, head_hidden), kv


# ------------------------------------------------------------------------------------------------------- params

def init_params(cfg: ModelConfig, key, dtype=jnp.float32, scale=0.02):
    """Random params with the converted layout (benchmarks, sharding tests, restore targets)."""
    D, L, H, K, hd, F, V = (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_hidden,
                            cfg.vocab_size)
    Ld, E, Fe = cfg.first_dense_layers, cfg.n_experts, cfg.moe_hidden
    Lm, Fs = L - Ld, cfg.moe_hidden * cfg.n_shared_experts
    ks = iter(jax.random.split(key, 32))

    def n(shape, s=scale, dt=dtype):
        return (jax.random.normal(next(ks), shape, jnp.float32) * s).astype(dt)

    layers = {"attn_norm": jnp.ones((L, D), dtype), "wq": n((L, D, H * hd)), "wk": n((L, D, K * hd)),
              "wv": n((L, D, K * hd)), "q_norm": jnp.ones((L, hd), dtype), "k_norm": jnp.ones((L, hd), dtype),
              "wo": n((L, H * hd, D)), "mlp_norm": jnp.ones((L, D), dtype)}
    if cfg.qkv_bias:
        layers.update(bq=jnp.zeros((L, H * hd), dtype), bk=jnp.zeros((L, K * hd), dtype),
                      bv=jnp.zeros((L, K * hd), dtype))
    p = {"embed": n((V, D)), "layers": layers, "final_norm": jnp.ones((D,), dtype), "lm_head": n((D, V))}
    if Ld:
        p["dense"] = {"w_gate": n((Ld, D, F)), "w_up": n((Ld, D, F)), "w_down": n((Ld, F, D))}
    if Lm:
        moe = {"router": n((Lm, D, E), 1.0 / np.sqrt(D), jnp.float32), "expert_bias": n((Lm, E), 0.1, jnp.float32),
               "w_gate": n((Lm, E, D, Fe)), "w_up": n((Lm, E, D, Fe)), "w_down": n((Lm, E, Fe, D))}
        if Fs:
            moe.update(s_gate=n((Lm, D, Fs)), s_up=n((Lm, D, Fs)), s_down=n((Lm, Fs, D)))
        p["moe"] = moe
    return p


def param_shapes(cfg: ModelConfig) -> dict:
    return jax.tree.map(lambda a: tuple(a.shape), jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))


def param_count(cfg: ModelConfig) -> dict:
    """Parameter counts: total, and activated per token (embedding excluded from neither)."""
    shapes = param_shapes(cfg)
    total = int(sum(np.prod(s) for s in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))))
    Lm = cfg.n_layers - cfg.first_dense_layers
    expert = 3 * cfg.d_model * cfg.moe_hidden
    active = total - Lm * (cfg.n_experts - cfg.n_experts_per_tok) * expert
    return {"total": total, "active": active}


transformer.register_body(FAMILY, sys.modules[__name__])
