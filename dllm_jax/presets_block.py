"""Presets of the block-diffusion families (window x acceptance x cache of dllm_jax/engine/block_diffusion.py).

| preset             | official function                                                                            |
|--------------------|----------------------------------------------------------------------------------------------|
| fastdllm_v2        | Efficient-Large-Model/Fast_dLLM_v2_7B hub modeling.py `Fast_dLLM_QwenForCausalLM.generate`     |
| fastdllm_v2_batch  | NVlabs/Fast-dLLM v2/generation_functions.py `batch_sample` (eval.py; right-padded ragged batch) |
| fastdllm_v2_vis    | NVlabs/Fast-dLLM v2/generation_functions.py `mdm_sample_with_visualization` (app.py demo)      |
| sdar_eval          | JetAstra/SDAR evaluation/opencompass/.../huggingface_bd3.py `block_diffusion_generate`         |
| sdar               | JetAstra/SDAR generate.py `block_diffusion_generate` (also Gen-Verse/dLLM-RL's copy, TraDo)    |

Quirks reproduced by default, each with its corrected behaviour as an explicit option:
* Fast-dLLM v2 denoising forwards use the forward's default mask block 32 whatever block_size is
  (`mask32_quirk=False`: the generation block size); the sub-block cache keeps the block's other K/V stale (the
  official design, no option); batch_sample gives the completion token only to rows whose prompt ended before the
  block end (`ar_token_quirk=False`: to every row with a mask there); the batched stop test and truncation follow
  the first row holding the stop token (`lockstep=False`: each row on its own).
* SDAR generate.py overwrites prompt positions when the step quota exceeds the masks left (`overwrite=False`).
"""

from __future__ import annotations

import warnings

from dllm_jax.engine.block_diffusion import (SDAR_STRATEGIES, BlockCache, BlockWindow, QuotaThreshold, SDARScript,
                                             StrictThreshold)
from dllm_jax.engine.loop import Schedule
from dllm_jax.engine.sampling import TokenSampler
from dllm_jax.models.config import ModelConfig


def _error(msg: str):
    from dllm_jax.presets import PresetError  # (presets.py registers these presets: imported lazily)

    return PresetError(msg)

FASTDLLM_V2_MASK_BLOCK = 32  # the official forward's default block_size, used by every denoising forward


def _trained_block(model_cfg: ModelConfig | None) -> int:
    return int(model_cfg.get("train_block_size", 0) or 0) if model_cfg is not None else 0


def _warn_untrained(model_cfg, block, what, consequence):
    trained = _trained_block(model_cfg)
    if trained and block != trained:
        warnings.warn(f"{model_cfg.family} was trained with blocks of {trained} (config.json); {what}={block} runs as "
                      f"the official code would: {consequence}", UserWarning, stacklevel=3)


def _stop_ids(stop, model_cfg, name):
    if stop is None:
        return (model_cfg.eos_token_id,) if model_cfg is not None else ()
    ids = (stop,) if isinstance(stop, int) else tuple(stop)
    try:
        ids = tuple(int(t) for t in ids)
    except (TypeError, ValueError):
        raise _error(f"{name}: stop ids must be integers, got {stop!r}") from None
    return ids


def _greedy_only(name, temperature):
    if temperature not in (0, 0.0, None):
        raise _error(f"{name}: only greedy decoding (temperature=0) is reproduced; the official sampler draws "
                          f"with torch.multinomial on batch row 0, got temperature={temperature}")


def _fastdllm_v2(kind, gen_length, *, block_size=32, small_block_size=8, threshold=0.9, use_block_cache=False,
                 stop_token=None, temperature=0.0, top_p=0.95, mask32_quirk=True, lockstep=True, pad_token_id=None,
                 ar_token_quirk=True, model_cfg=None):
    name = {"generate": "fastdllm_v2", "batch": "fastdllm_v2_batch", "vis": "fastdllm_v2_vis"}[kind]
    _greedy_only(name, temperature)
    bs = int(block_size)
    sbs = bs if small_block_size is None else int(small_block_size)
    if bs <= 0 or sbs <= 0 or bs % sbs:
        raise _error(f"{name}: small_block_size ({small_block_size}) must be a positive divisor of block_size "
                          f"({block_size}); otherwise the positions after the last whole sub-block are never decoded "
                          "and the official loop never ends")
    if threshold is None or not (0.0 <= float(threshold) <= 1.0):
        raise _error(f"{name}: threshold must lie in [0, 1], got {threshold}")
    if kind == "vis" and use_block_cache:
        raise _error(f"{name}: the demo sampler has no block cache")
    if kind != "batch" and model_cfg is not None:
        _warn_untrained(model_cfg, bs, "block_size",
                        f"the denoising forwards still use the attention mask of {FASTDLLM_V2_MASK_BLOCK}-blocks "
                        + ("(a block that straddles a multiple of 32 is split there)" if FASTDLLM_V2_MASK_BLOCK % bs
                           else "(the block stays bidirectional)") + " while the cache-append forwards use blocks of "
                        f"{bs}")
    stop = _stop_ids(stop_token, model_cfg, name)
    g_d = FASTDLLM_V2_MASK_BLOCK if mask32_quirk else bs
    pad = -1
    if kind == "batch":
        pad = pad_token_id if pad_token_id is not None else (model_cfg.get("bos_token_id") if model_cfg else None)
        if pad is None:
            raise _error(f"{name}: pad_token_id (the tokenizer's pad id, written after a finished row's stop "
                              "token) is required")
    win = BlockWindow(
        block_size=bs, new_tokens=int(gen_length), sub_block=sbs, complete="ar",
        end_rule="new_tokens_after_max_prompt" if kind == "batch" else "new_tokens",
        complete_mask=(FASTDLLM_V2_MASK_BLOCK if mask32_quirk else bs) if kind == "vis" else bs,
        denoise_mask=g_d, sub_cache=bool(use_block_cache), lockstep=bool(lockstep), stop_ids=stop,
        stop_in_block=kind != "batch", stop_after_block=kind != "batch", row_finish=kind == "batch",
        pad_after_stop=int(pad), ar_token_quirk=bool(ar_token_quirk) and kind == "batch",
        stop_skips_prefill_token=kind == "vis", skip_prompt_block=True,
        output={"generate": "truncate_stop", "batch": "rows", "vis": "generated"}[kind])
    return Schedule(window=win, accept=StrictThreshold(threshold=float(threshold)), cache=BlockCache(window=win),
                    sampler=TokenSampler(confidence="prob"), name=name)


def fastdllm_v2(gen_length, **kw):
    """Fast-dLLM v2 hub `generate` (block + sub-blocks, threshold, block cache on/off, stop token)."""
    return _fastdllm_v2("generate", gen_length, **kw)


def fastdllm_v2_batch(gen_length, *, min_len=None, seq_len=None, **kw):
    """Fast-dLLM v2 `batch_sample` (run with layout='right_masked'; min_len/seq_len are implied by the prompts)."""
    return _fastdllm_v2("batch", gen_length, **kw)


def fastdllm_v2_vis(gen_length, **kw):
    """Fast-dLLM v2 `mdm_sample_with_visualization` (the demo): the final generated ids."""
    return _fastdllm_v2("vis", gen_length, **kw)


def _sdar_common(name, gen_length, block_length, denoising_steps, temperature, top_k, top_p, model_cfg):
    bl, T = int(block_length), int(denoising_steps)
    if bl <= 0 or T <= 0:
        raise _error(f"{name}: block_length and denoising_steps must be > 0, got {block_length}, "
                          f"{denoising_steps}")
    if top_k != 1 or temperature is None or temperature <= 0:
        raise _error(f"{name}: only greedy decoding is reproduced (top_k=1 with temperature > 0, as the "
                          f"evaluation config); got top_k={top_k}, temperature={temperature} (the official sampler "
                          "draws with torch.multinomial from the global RNG)")
    if model_cfg is not None:
        _warn_untrained(model_cfg, bl, "block_length",
                        f"block-causal attention over blocks of {bl} and a per-block quota of {bl}/{T} tokens per step")
    return bl, T


def sdar_eval(gen_length, *, block_length=4, denoising_steps=4, threshold=1.0, temperature=1.0, top_k=1,
              top_p=1.0, remasking="low_confidence", stopping_criteria_idx=None, lockstep=True, model_cfg=None):
    """SDAR's Hugging Face evaluation generator (huggingface_bd3.py)."""
    name = "sdar_eval"
    bl, T = _sdar_common(name, gen_length, block_length, denoising_steps, temperature, top_k, top_p, model_cfg)
    if remasking != "low_confidence":
        raise _error(f"{name}: remasking={remasking!r} is not reproduced ('random' draws torch.rand); use "
                          "'low_confidence'")
    if temperature != 1.0:
        raise _error(f"{name}: temperature must be 1.0 (the confidence is softmax(logits / temperature))")
    if bl % T:
        raise _error(f"{name}: block_length ({bl}) must be a multiple of denoising_steps ({T}) (the official "
                          "generator asserts it)")
    stop = _stop_ids(stopping_criteria_idx, model_cfg, name)
    win = BlockWindow(block_size=bl, new_tokens=int(gen_length), complete="store", end_rule="ceil",
                      lockstep=bool(lockstep), stop_ids=stop, stop_after_block=True, output="canvas")
    return Schedule(window=win, accept=QuotaThreshold(block_length=bl, steps=T, threshold=float(threshold)),
                    cache=BlockCache(window=win), sampler=TokenSampler(confidence="prob"), name=name)


def sdar(gen_length, *, block_length=4, denoising_steps=4, temperature=1.0, top_k=1, top_p=1.0,
         remasking_strategy="low_confidence_dynamic", confidence_threshold=0.85, eb_threshold=None,
         stopping_criteria_idx=None, overwrite=True, model_cfg=None):
    """SDAR generate.py `block_diffusion_generate` (batch 1 in the official code; rows run independently here)."""
    name = "sdar"
    bl, T = _sdar_common(name, gen_length, block_length, denoising_steps, temperature, top_k, top_p, model_cfg)
    if remasking_strategy not in SDAR_STRATEGIES:
        raise _error(f"{name}: remasking_strategy must be one of {SDAR_STRATEGIES}, got {remasking_strategy!r} "
                          "('entropy_bounded' fails in the official code: transfer_index is never initialised)")
    stop = _stop_ids(stopping_criteria_idx, model_cfg, name)
    win = BlockWindow(block_size=bl, new_tokens=int(gen_length), complete="store", end_rule="ceil",
                      lockstep=False, stop_ids=stop, stop_after_block=True, output="canvas")
    acc = SDARScript(strategy=remasking_strategy, block_length=bl, steps=T, threshold=float(confidence_threshold),
                     overwrite=bool(overwrite))
    return Schedule(window=win, accept=acc, cache=BlockCache(window=win), sampler=TokenSampler(confidence="prob"),
                    name=name)


for _f in (fastdllm_v2, fastdllm_v2_batch, fastdllm_v2_vis):
    _f.preset_target = _fastdllm_v2  # (for presets.preset_args: the wrappers forward **kw)

BLOCK_PRESETS = {"fastdllm_v2": fastdllm_v2, "fastdllm_v2_batch": fastdllm_v2_batch,
                 "fastdllm_v2_vis": fastdllm_v2_vis, "sdar_eval": sdar_eval, "sdar": sdar}
