"""Named presets: each published method as a composition window x acceptance x cache (+ token sampler).

| preset                     | official function                                              |
|----------------------------|----------------------------------------------------------------|
| llada                      | ML-GSAI/LLaDA generate.py::generate                            |
| fastdllm                   | NVlabs/Fast-dLLM llada/generate.py::generate                   |
| fastdllm_prefix            | ... ::generate_with_prefix_cache                               |
| fastdllm_dual              | ... ::generate_with_dual_cache                                 |
| dream                      | Dream generation_utils.py::diffusion_generate (maskgit_plus, topk_margin, entropy, origin) |
| fastdllm_dream_threshold   | Fast-dLLM dream generation_utils.py, alg=confidence_threshold  |
| fastdllm_dream_prefix/dual | Fast-dLLM dream generation_utils_block.py (dual_cache False/True) |
| vanilla                    | one token per forward, fixed blocks (= llada with steps=gen_length) |
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Callable

from dllm_jax.engine import (DreamCarryThreshold, DreamOrigin, DreamQuota, DualCache, Factor, FixedBlocks, NoCache,
                             PrefixCache, Schedule, Threshold, TokenSampler, TopKQuota)
from dllm_jax.models.config import ModelConfig


class PresetError(ValueError):
    pass


def _blocks(gen_length, block_length, steps):
    if block_length is None:
        block_length = gen_length
    if block_length <= 0 or gen_length % block_length:
        raise PresetError(_block_hint(gen_length, block_length))
    nb = gen_length // block_length
    if steps is not None and (steps <= 0 or steps % nb):
        raise PresetError(f"steps ({steps}) must be a positive multiple of the number of blocks ({nb})")
    return block_length, nb


def _block_hint(gen_length, block_length) -> str:
    """gen_length/block_length mismatch, with the block lengths and gen lengths that would do."""
    msg = f"gen_length ({gen_length}) must be divisible by block_length ({block_length})"
    divs = [d for d in range(min(gen_length, 256), 1, -1) if gen_length % d == 0][:4] if gen_length > 0 else []
    if divs:
        msg += f": use --block-length {' / '.join(map(str, divs))}"
    if block_length and block_length > 0:
        lo = max(block_length, gen_length // block_length * block_length)
        hi = -(-gen_length // block_length) * block_length
        alts = sorted({lo, hi} - {gen_length})
        msg += f"{' or' if divs else ': use'} --gen-length {' / '.join(map(str, alts))}"
    return msg


def _eos_sampler(mcfg: ModelConfig | None, confidence, temperature, logits_eos_inf, confidence_eos_eot_inf,
                 eos_fix, style="gumbel", top_p=None, top_k=None):
    if logits_eos_inf and confidence_eos_eot_inf:
        raise PresetError("choose one of logits_eos_inf and confidence_eos_eot_inf")
    pen = None
    if logits_eos_inf:
        pen = "logits_eos_inf"
    elif confidence_eos_eot_inf:
        pen = "confidence_eos_eot_inf" if eos_fix else "confidence_eos_eot_inf_reference"
    eos = mcfg.eos_token_id if mcfg else -1
    eot = int(mcfg.get("eot_token_id", -1) or -1) if mcfg else -1
    if temperature < 0:
        raise PresetError(f"temperature must be >= 0, got {temperature}")
    return TokenSampler(confidence=confidence, temperature=float(temperature), style=style, top_p=top_p, top_k=top_k,
                        eos_penalty=pen, eos_id=eos, eot_id=eot)


def _threshold_or_factor(threshold, factor, steps_per_block):
    if threshold is not None and factor is not None:
        raise PresetError("give threshold or factor, not both")
    if threshold is not None:
        if not (0.0 < threshold <= 1.0):
            raise PresetError(f"threshold must lie in (0, 1], got {threshold}")
        return Threshold(threshold=float(threshold))
    if factor is not None:
        if factor <= 0:
            raise PresetError(f"factor must be > 0, got {factor}")
        return Factor(factor=float(factor))
    return TopKQuota(steps_per_block=steps_per_block)


def llada(gen_length, *, steps=None, block_length=None, temperature=0.0, cfg_scale=0.0, remasking="low_confidence",
          logits_eos_inf=False, confidence_eos_eot_inf=False, eos_fix=False, eos_early_stop=False,
          model_cfg=None) -> Schedule:
    """ML-GSAI LLaDA `generate`: semi-AR blocks, `steps/num_blocks` forwards per block, top-k quota."""
    steps = gen_length if steps is None else steps
    bl, nb = _blocks(gen_length, block_length, steps)
    if remasking not in ("low_confidence", "random"):
        raise PresetError(f"remasking must be 'low_confidence' or 'random', got {remasking!r}")
    conf = "prob" if remasking == "low_confidence" else "random"
    return Schedule(window=FixedBlocks(bl), accept=TopKQuota(steps_per_block=steps // nb),
                    sampler=_eos_sampler(model_cfg, conf, temperature, logits_eos_inf, confidence_eos_eot_inf,
                                         eos_fix),
                    cfg_scale=float(cfg_scale), eos_early_stop=eos_early_stop, name="llada")


def vanilla(gen_length, *, block_length=32, **kw) -> Schedule:
    """One token per forward: LLaDA `generate` with steps = gen_length over blocks of 32 (the quality baseline).

    Takes LLaDA's arguments but `steps`; a block longer than the generation is cut to it."""
    bl = min(block_length, gen_length)
    return llada(gen_length, steps=gen_length, block_length=bl, **kw).replace(name="vanilla")


def _fastdllm(cache, name, gen_length, *, steps=None, block_length=None, temperature=0.0, remasking="low_confidence",
              threshold=None, factor=None, eos_early_stop=False, model_cfg=None):
    steps = gen_length if steps is None else steps
    bl, nb = _blocks(gen_length, block_length, steps)
    spb = steps // nb
    if cache.has_cache and threshold is None and factor is None and spb < 2:
        raise PresetError("the cached Fast-dLLM variants with a fixed schedule need >= 2 steps per block "
                          "(the reference indexes past its schedule otherwise)")
    conf = "prob" if remasking == "low_confidence" else "random"
    return Schedule(window=FixedBlocks(bl), accept=_threshold_or_factor(threshold, factor, spb), cache=cache,
                    sampler=_eos_sampler(model_cfg, conf, temperature, False, False, False),
                    eos_early_stop=eos_early_stop, name=name)


def fastdllm(gen_length, **kw):
    """Fast-dLLM v1 LLaDA `generate` (no cache): fixed blocks, top-k quota, or `threshold` / `factor` parallel decoding.

    Arguments: steps, block_length, temperature, remasking, threshold, factor, eos_early_stop."""
    return _fastdllm(NoCache(), "fastdllm", gen_length, **kw)


def fastdllm_prefix(gen_length, **kw):
    """Fast-dLLM v1 `generate_with_prefix_cache`: as fastdllm, the prefix KV cache refreshed once per block."""
    return _fastdllm(PrefixCache(), "fastdllm_prefix", gen_length, **kw)


def fastdllm_dual(gen_length, **kw):
    """Fast-dLLM v1 `generate_with_dual_cache`: as fastdllm, prefix and suffix KV cached, the block recomputed."""
    return _fastdllm(DualCache(), "fastdllm_dual", gen_length, **kw)


_DREAM_CONF = {"maskgit_plus": "prob", "topk_margin": "margin", "entropy": "neg_entropy", "origin": "random"}


def dream(gen_length, *, steps=None, alg="maskgit_plus", eps=1e-3, temperature=0.0, top_p=None, top_k=None,
          alg_temp=0.0, batch_mean_quota=True, eos_early_stop=False, model_cfg=None):
    """Dream `diffusion_generate` (no cache): `steps` global steps on float32 linspace(1, eps) timesteps."""
    steps = gen_length if steps is None else steps
    if alg not in _DREAM_CONF:
        raise PresetError(f"unknown Dream alg {alg!r}; expected one of {sorted(_DREAM_CONF)} "
                          "(or use preset fastdllm_dream_threshold for confidence_threshold)")
    if alg_temp:
        raise PresetError("alg_temp > 0 (multinomial position sampling) is not supported; use alg_temp=0")
    if steps <= 0:
        raise PresetError(f"steps must be > 0, got {steps}")
    acc = DreamOrigin(steps=steps, eps=eps) if alg == "origin" else DreamQuota(steps=steps, eps=eps,
                                                                                batch_mean=batch_mean_quota)
    return Schedule(window=FixedBlocks(None), accept=acc,
                    sampler=_eos_sampler(model_cfg, _DREAM_CONF[alg], temperature, False, False, False,
                                         style="dream", top_p=top_p, top_k=top_k),
                    eos_early_stop=eos_early_stop, name=f"dream_{alg}")


def fastdllm_dream_threshold(gen_length, *, steps=None, threshold=0.9, temperature=0.0, top_p=None, top_k=None,
                             eos_early_stop=False, model_cfg=None):
    """Fast-dLLM Dream `diffusion_generate` with alg='confidence_threshold' (no cache, shifted logits)."""
    steps = gen_length if steps is None else steps
    if steps <= 0 or gen_length % steps:
        raise PresetError(f"confidence_threshold needs gen_length ({gen_length}) divisible by steps ({steps})")
    if not (0.0 < threshold <= 1.0):
        raise PresetError(f"threshold must lie in (0, 1], got {threshold}")
    return Schedule(window=FixedBlocks(None), accept=DreamCarryThreshold(steps=steps, threshold=float(threshold)),
                    sampler=_eos_sampler(model_cfg, "prob", temperature, False, False, False, style="dream",
                                         top_p=top_p, top_k=top_k),
                    eos_early_stop=eos_early_stop, name="fastdllm_dream_threshold")


def _fastdllm_dream_block(dual, gen_length, *, steps=None, block_length=32, alg="confidence_threshold",
                          threshold=0.9, eps=1e-3, temperature=0.0, top_p=None, top_k=None, eos_early_stop=False,
                          model_cfg=None):
    steps = gen_length if steps is None else steps
    bl, nb = _blocks(gen_length, block_length, steps)
    if alg == "confidence_threshold":
        if threshold is None:
            threshold = 0.9
        if not (0.0 < threshold <= 1.0):
            raise PresetError(f"threshold must lie in (0, 1], got {threshold}")
        acc, conf = Threshold(threshold=float(threshold)), "prob"
    else:
        # Reference quirk: any other alg is replaced by negative entropy with a per-block linear schedule.
        acc, conf = DreamQuota(steps=steps // nb, eps=eps), "neg_entropy"
    cache = (DualCache if dual else PrefixCache)(refresh_commit="first")
    return Schedule(window=FixedBlocks(bl), accept=acc, cache=cache,
                    sampler=_eos_sampler(model_cfg, conf, temperature, False, False, False, style="dream",
                                         top_p=top_p, top_k=top_k),
                    eos_early_stop=eos_early_stop, name="fastdllm_dream_" + ("dual" if dual else "prefix"))


def fastdllm_dream_prefix(gen_length, **kw):
    """Fast-dLLM Dream block decoding with the prefix cache (threshold rule per block, shifted logits)."""
    return _fastdllm_dream_block(False, gen_length, **kw)


def fastdllm_dream_dual(gen_length, **kw):
    """Fast-dLLM Dream block decoding with the dual cache (prefix and suffix cached, shifted logits)."""
    return _fastdllm_dream_block(True, gen_length, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Advanced block schedulers (DSB, AdaBlock-dLLM, BlockBatch): see docs/schedulers.md.

def _need_threshold(threshold, factor, method):
    if factor is not None:
        raise PresetError(f"{method}: factor is not supported (the published setting is a threshold)")
    if threshold is None:
        raise PresetError(f"{method}: threshold must be set (the step-quota path of the official code is "
                          "not reproduced: it indexes a global schedule out of range)")
    if not (0.0 < threshold <= 1.0):
        raise PresetError(f"threshold must lie in (0, 1], got {threshold}")
    return Threshold(threshold=float(threshold))


def _dream_alg(alg, method):
    if alg != "confidence_threshold":
        raise PresetError(f"{method}: only alg='confidence_threshold' is supported, got {alg!r} (the official "
                          "cached sampler breaks for the other algs)")


def _sliding(gen_length, block_length, max_block_length):
    from dllm_jax.engine.dsb import SlidingWindow

    if block_length is None or block_length <= 0:
        raise PresetError(f"block_length must be > 0, got {block_length}")
    if max_block_length is None or max_block_length == 0 or max_block_length < -1:
        raise PresetError(f"max_block_length must be -1 (greedy) or > 0 (const.), got {max_block_length}")
    return SlidingWindow(block_length=int(block_length), max_block_length=int(max_block_length))


def dsb(gen_length, *, block_length=32, max_block_length=-1, threshold=0.9, factor=None, steps=None,
        temperature=0.0, remasking="low_confidence", eos_early_stop=False, model_cfg=None):
    """DSB `generate_dsb` (LLaDA, no cache): sliding window x threshold rule, one full forward per step.
    max_block_length=-1: DSB (greedy); = block_length: DSB (const.). `steps` is unused with a threshold."""
    if remasking != "low_confidence":
        raise PresetError("dsb supports remasking='low_confidence' only")
    return Schedule(window=_sliding(gen_length, block_length, max_block_length),
                    accept=_need_threshold(threshold, factor, "dsb"),
                    sampler=_eos_sampler(model_cfg, "prob", temperature, False, False, False),
                    eos_early_stop=eos_early_stop, name="dsb")


def dsb_cache(gen_length, *, block_length=32, max_block_length=-1, threshold=0.9, factor=None, steps=None,
              prefix_window=24, suffix_window=0, suffix_commit_quirk=True, temperature=0.0,
              remasking="low_confidence", eos_early_stop=False, model_cfg=None):
    """DSB `generate_dsb_cache` (LLaDA, DSB Cache): refresh forward every >= block_length committed tokens, cached
    window [s - max(jump, pwl), e + swl). suffix_commit_quirk=False corrects the suffix-window masking bug."""
    from dllm_jax.engine.dsb import DSBCache

    if remasking != "low_confidence":
        raise PresetError("dsb_cache supports remasking='low_confidence' only")
    if prefix_window is None or prefix_window < 0 or suffix_window is None or suffix_window < 0:
        raise PresetError(f"prefix_window/suffix_window must be >= 0, got {prefix_window}/{suffix_window}")
    cache = DSBCache(prefix_window=int(prefix_window), suffix_window=int(suffix_window),
                     refresh_tokens=int(block_length), suffix_commit_quirk=bool(suffix_commit_quirk))
    return Schedule(window=_sliding(gen_length, block_length, max_block_length),
                    accept=_need_threshold(threshold, factor, "dsb_cache"), cache=cache,
                    sampler=_eos_sampler(model_cfg, "prob", temperature, False, False, False),
                    eos_early_stop=eos_early_stop, name="dsb_cache")


def dsb_dream(gen_length, *, block_length=32, max_block_length=-1, threshold=0.9, alg="confidence_threshold",
              steps=None, eps=1e-3, temperature=0.0, top_p=None, top_k=None, eos_early_stop=False, model_cfg=None):
    """DSB Dream `_sample_dsb` (no cache): sliding window x threshold rule on the shifted logits."""
    _dream_alg(alg, "dsb_dream")
    return Schedule(window=_sliding(gen_length, block_length, max_block_length),
                    accept=_need_threshold(threshold, None, "dsb_dream"),
                    sampler=_eos_sampler(model_cfg, "prob", temperature, False, False, False, style="dream",
                                         top_p=top_p, top_k=top_k),
                    eos_early_stop=eos_early_stop, name="dsb_dream")


def dsb_dream_cache(gen_length, *, block_length=32, max_block_length=-1, threshold=0.9, alg="confidence_threshold",
                    prefix_window=4, steps=None, eps=1e-3, temperature=0.0, top_p=None, top_k=None,
                    eos_early_stop=False, model_cfg=None):
    """DSB Dream `_sample_dsb_cache`: each refresh forward commits only the window's first mask (greedy, no
    threshold; counted as one committed token); cached windows [s - max(jump, pwl), e), no suffix window."""
    from dllm_jax.engine.dsb import DSBCache

    _dream_alg(alg, "dsb_dream_cache")
    if prefix_window is None or prefix_window < 0:
        raise PresetError(f"prefix_window must be >= 0, got {prefix_window}")
    # Quirk kept: the shift is applied inside the cached window, so its first position uses its own logits row; with
    # prefix_window >= 1 that position is always decoded (harmless), with 0 it can be the masked window start.
    cache = DSBCache(prefix_window=int(prefix_window), suffix_window=0, refresh_tokens=int(block_length),
                     refresh_commit="first")
    return Schedule(window=_sliding(gen_length, block_length, max_block_length),
                    accept=_need_threshold(threshold, None, "dsb_dream_cache"), cache=cache,
                    sampler=_eos_sampler(model_cfg, "prob", temperature, False, False, False, style="dream",
                                         top_p=top_p, top_k=top_k),
                    eos_early_stop=eos_early_stop, name="dsb_dream_cache")


def _delims(delimiter_ids, delimiter_threshold):
    try:
        tau = float(delimiter_threshold)  # accepts "inf"
    except (TypeError, ValueError):
        raise PresetError(f"delimiter_threshold must be a number (or inf), got {delimiter_threshold!r}") from None
    if math.isnan(tau):
        raise PresetError("delimiter_threshold must not be NaN")
    ids = tuple(int(d) for d in (delimiter_ids or ()))
    return ids, tau


def _adablock(cache, name, gen_length, *, init_block_length=32, threshold=0.9, delimiter_ids=(198,),
              delimiter_threshold=math.inf, steps=None, temperature=0.0, remasking="low_confidence",
              eos_early_stop=False, model_cfg=None):
    from dllm_jax.engine.adablock import DelimiterBlocks

    if remasking != "low_confidence":
        raise PresetError(f"{name} supports remasking='low_confidence' only")
    if init_block_length is None or init_block_length <= 0:
        raise PresetError(f"init_block_length must be > 0, got {init_block_length}")
    ids, tau = _delims(delimiter_ids, delimiter_threshold)
    win = DelimiterBlocks(init_block_length=int(init_block_length), delimiter_ids=ids, delimiter_threshold=tau)
    return Schedule(window=win, accept=_need_threshold(threshold, None, name), cache=cache,
                    sampler=_eos_sampler(model_cfg, "prob", temperature, False, False, False),
                    eos_early_stop=eos_early_stop, name=name)


def adablock(gen_length, **kw):
    """AdaBlock `generate_adablock` (LLaDA, no cache): delimiter-chosen blocks x threshold rule."""
    return _adablock(NoCache(), "adablock", gen_length, **kw)


def adablock_prefix(gen_length, **kw):
    """AdaBlock `generate_adablock_prefix_cache`: a full forward per block (it also chooses the block), then the
    suffix from the block start over the prefix cache. Unlike Fast-dLLM no cached forward is forced."""
    return _adablock(PrefixCache(min_window_forwards=0), "adablock_prefix", gen_length, **kw)


def adablock_dual(gen_length, **kw):
    """AdaBlock `generate_adablock_dual_cache`: as adablock_prefix, cached forwards cover the block only."""
    return _adablock(DualCache(min_window_forwards=0), "adablock_dual", gen_length, **kw)


def _adablock_dream(dual, gen_length, *, block_length=8, threshold=0.9, delimiter_threshold=0.3,
                    delimiter_ids=None, alg="confidence_threshold", steps=None, eps=1e-3, temperature=0.0,
                    top_p=None, top_k=None, eos_early_stop=False, model_cfg=None):
    from dllm_jax.engine.adablock import DREAM_DELIMITERS, DelimiterBlocks

    name = "adablock_dream_dual" if dual else "adablock_dream"
    _dream_alg(alg, name)
    if block_length is None or block_length <= 0:
        raise PresetError(f"block_length must be > 0, got {block_length}")
    ids, tau = _delims(DREAM_DELIMITERS if delimiter_ids is None else delimiter_ids, delimiter_threshold)
    win = DelimiterBlocks(init_block_length=int(block_length), delimiter_ids=ids, delimiter_threshold=tau)
    # Dual cache: the block's full forward chooses the block, then commits only the block start (greedy).
    cache = DualCache(min_window_forwards=0, refresh_commit="first") if dual else NoCache()
    return Schedule(window=win, accept=_need_threshold(threshold, None, name), cache=cache,
                    sampler=_eos_sampler(model_cfg, "prob", temperature, False, False, False, style="dream",
                                         top_p=top_p, top_k=top_k),
                    eos_early_stop=eos_early_stop, name=name)


def adablock_dream(gen_length, **kw):
    """AdaBlock Dream `_sample_adablock` (no cache). delimiter_ids=None = Dream's hard-coded list."""
    return _adablock_dream(False, gen_length, **kw)


def adablock_dream_dual(gen_length, **kw):
    """AdaBlock Dream `_sample_adablock_cache` (dual cache only, as the reference asserts)."""
    return _adablock_dream(True, gen_length, **kw)


def _branch_sizes(gen_length, block_sizes):
    try:
        sizes = tuple(sorted(int(b) for b in block_sizes))
    except TypeError:
        raise PresetError(f"block_sizes must be a list of ints, got {block_sizes!r}") from None
    if not sizes or any(b <= 0 or gen_length % b for b in sizes):
        raise PresetError(f"gen_length ({gen_length}) must be divisible by every block size {list(sizes)}")
    if len(set(sizes)) != len(sizes):
        raise PresetError(f"block sizes must be distinct, got {list(block_sizes)}")
    return sizes


def _blockbatch(variant, gen_length, *, block_sizes=(4, 8, 16, 32), threshold=0.9, sync_threshold=8,
                conf_threshold=0.5, refresh_block_size=32, temperature=0.0, remasking="low_confidence",
                eos_token_id=None, stop_on_eos=False, top_p=None, top_k=None, steps=None, model_cfg=None):
    from dllm_jax.engine.blockbatch import BranchBlocks, BranchCache, NoCommit

    name = {"bulk": "blockbatch", "rms": "blockbatch_rms", "dream": "blockbatch_dream"}[variant]
    sizes = _branch_sizes(gen_length, block_sizes)
    if threshold is None or not (0.0 < threshold <= 1.0):
        raise PresetError(f"threshold must lie in (0, 1], got {threshold}")
    if variant != "dream" and (temperature or remasking != "low_confidence"):
        raise PresetError(f"{name} supports greedy decoding only (temperature=0, remasking='low_confidence')")
    if sync_threshold is None or sync_threshold < 0:
        raise PresetError(f"sync_threshold must be >= 0, got {sync_threshold}")
    if refresh_block_size is None or refresh_block_size <= 0:
        raise PresetError(f"refresh_block_size must be > 0, got {refresh_block_size}")
    if not (0.0 <= conf_threshold <= 1.0):
        raise PresetError(f"conf_threshold must lie in [0, 1], got {conf_threshold}")
    eos = eos_token_id if eos_token_id is not None else (model_cfg.eos_token_id if model_cfg else -1)
    if variant == "dream":
        # Dream: temperature/top_p/top_k are overwritten by the reference (greedy); EOS only matters with stop_on_eos
        eos = eos if stop_on_eos else -1
    win = BranchBlocks(block_sizes=sizes, variant=variant, threshold=float(threshold),
                       sync_threshold=int(sync_threshold), conf_threshold=float(conf_threshold),
                       refresh_block_size=int(refresh_block_size), eos_id=int(eos))
    acc = NoCommit() if variant == "dream" else Threshold(threshold=float(threshold))
    return Schedule(window=win, accept=acc, cache=BranchCache(predecessor=variant == "dream"),
                    sampler=_eos_sampler(model_cfg, "prob", 0.0, False, False, False), name=name)


def blockbatch(gen_length, **kw):
    """BlockBatch LLaDA (original_bulk): one branch per block size as rows of one batched forward, confidence-gated
    merge, leader sync, periodic refresh (every R tokens of block advances), EOS cycle. Run with
    dllm_jax.engine.blockbatch.generate_branches (one request = len(block_sizes) rows)."""
    return _blockbatch("bulk", gen_length, **kw)


def blockbatch_rms(gen_length, **kw):
    """BlockBatch LLaDA, RMS variant: the refresh is triggered by KV-row divergence (RMS chord shell), merges scan
    [P, max source block end) and count as decoded tokens."""
    return _blockbatch("rms", gen_length, **kw)


def blockbatch_dream(gen_length, **kw):
    """BlockBatch Dream (original_bulk): predecessor-window block steps, one greedy seed token per full forward."""
    return _blockbatch("dream", gen_length, **kw)


_ADVANCED: dict[str, Callable[..., Schedule]] = {
    "dsb": dsb, "dsb_cache": dsb_cache, "dsb_dream": dsb_dream, "dsb_dream_cache": dsb_dream_cache,
    "adablock": adablock, "adablock_prefix": adablock_prefix, "adablock_dual": adablock_dual,
    "adablock_dream": adablock_dream, "adablock_dream_dual": adablock_dream_dual,
    "blockbatch": blockbatch, "blockbatch_rms": blockbatch_rms, "blockbatch_dream": blockbatch_dream,
}


_CACHES = {"none": NoCache, "prefix": PrefixCache, "dual": DualCache}


def _cache(name):
    name = "none" if name is None else name  # `--set cache=none` parses to None
    if name not in _CACHES:
        raise PresetError(f"cache must be one of {sorted(_CACHES)}, got {name!r}")
    return _CACHES[name]()


def localleap(gen_length, *, block_length=32, threshold=0.9, relaxed=0.75, radius=4, cache="none",
              eos_early_stop=False, model_cfg=None):
    """LocalLeap: anchors >= threshold let neighbours within `radius` through at `relaxed` (fixed blocks)."""
    from dllm_jax.engine.localleap import LocalLeap

    bl, _ = _blocks(gen_length, block_length, None)
    acc = LocalLeap(threshold=float(threshold), relaxed=float(relaxed), radius=int(radius))
    return Schedule(window=FixedBlocks(bl), accept=acc, cache=_cache(cache),
                    sampler=_eos_sampler(model_cfg, "prob", 0.0, False, False, False),
                    eos_early_stop=eos_early_stop, name="localleap")


def _looks(prefix_look, after_look, refresh_every):
    if prefix_look is None or after_look is None or prefix_look < 0 or after_look < 0:
        raise PresetError(f"prefix_look/after_look must be >= 0, got {prefix_look}/{after_look}")
    if refresh_every is None or refresh_every < 0:
        raise PresetError(f"refresh_every must be >= 0 (0 = only on entering a block), got {refresh_every}")


def dinfer_hierarchical(gen_length, *, block_length=32, threshold=0.9, run_threshold=0.4, prefix_look=16,
                        after_look=16, refresh_every=0, eos_early_stop=False, model_cfg=None):
    """dInfer hierarchical decoding (per-run best + threshold) with the vicinity-refresh cache."""
    return compose(gen_length, window="fixed", accept="hierarchical", cache="vicinity", block_length=block_length,
                   threshold=threshold, run_threshold=run_threshold, prefix_look=prefix_look, after_look=after_look,
                   refresh_every=refresh_every, eos_early_stop=eos_early_stop,
                   model_cfg=model_cfg).replace(name="dinfer_hierarchical")


def dinfer_credit(gen_length, *, block_length=32, threshold=0.9, alpha=0.7, boost=0.2, decay=0.8, slots=None,
                  cache="vicinity", prefix_look=16, after_look=16, refresh_every=0, eos_early_stop=False,
                  model_cfg=None):
    """dInfer credit decoding (threshold rule on logits + alpha log(1 + credit)) with the vicinity-refresh cache
    (cache='none'|'prefix'|'dual'|'vicinity')."""
    return compose(gen_length, window="fixed", accept="credit", cache=cache, block_length=block_length,
                   threshold=threshold, alpha=alpha, boost=boost, decay=decay, slots=slots, prefix_look=prefix_look,
                   after_look=after_look, refresh_every=refresh_every, eos_early_stop=eos_early_stop,
                   model_cfg=model_cfg).replace(name="dinfer_credit")


def entropy_elastic(gen_length, *, budget=1.0, min_size=4, max_size=64, threshold=0.9, cache="none",
                    eos_early_stop=False, model_cfg=None):
    """Entropy-elastic window (new): width = clip(uncertainty budget / local uncertainty) x threshold rule."""
    from dllm_jax.engine.elastic import EntropyElastic

    if cache != "none":
        # dual: the width needs the confidences beyond the window, which a cached forward does not compute; prefix:
        # the window never empties while masks remain, so the cache would be refreshed once and the K/V of tokens
        # committed afterwards and passed by the window start would stay those of masks
        raise PresetError(f"entropy_elastic runs without a KV cache (cache='none'), got cache={cache!r}")
    return Schedule(window=EntropyElastic(budget=float(budget), min_size=int(min_size), max_size=int(max_size)),
                    accept=_threshold_or_factor(threshold, None, 1), cache=_cache(cache),
                    sampler=_eos_sampler(model_cfg, "prob", 0.0, False, False, False),
                    eos_early_stop=eos_early_stop, name="entropy_elastic")


def osdt(gen_length, *, thresholds=None, calibration=None, block_length=None, cache="dual", eos_early_stop=False,
         model_cfg=None):
    """OSDT: per-block thresholds calibrated once per task (`dllm_jax.engine.osdt.calibrate`), from a list or a
    saved calibration file."""
    from dllm_jax.engine import osdt as osdt_mod

    if calibration is not None:
        if thresholds is not None:
            raise PresetError("osdt: give thresholds=[...] or calibration=PATH, not both")
        try:
            cal = osdt_mod.load(calibration)
        except ValueError as e:
            raise PresetError(str(e)) from None
        if block_length is not None and int(block_length) != cal["block_length"]:
            raise PresetError(f"osdt: block_length={block_length} differs from the calibration's "
                              f"{cal['block_length']} ({calibration})")
        thresholds, block_length = cal["thresholds"], cal["block_length"]
    if not thresholds:
        raise PresetError("osdt needs thresholds=[...] or calibration=PATH (see dllm_jax.engine.osdt.calibrate)")
    bl, _ = _blocks(gen_length, block_length or 32, None)
    acc = osdt_mod.BlockThresholds(thresholds=tuple(float(t) for t in thresholds), block_length=bl)
    return Schedule(window=FixedBlocks(bl), accept=acc, cache=_cache(cache),
                    sampler=_eos_sampler(model_cfg, "prob", 0.0, False, False, False),
                    eos_early_stop=eos_early_stop, name="osdt")


def d2f(gen_length, *, block_length=32, tau_add=0.1, tau_act=0.95, tau_conf=0.9, attention="bidirectional",
        cache="none", span_blocks=3, eos_early_stop=False, model_cfg=None):
    """D2F pipeline (training-free, bidirectional): several blocks in flight, added at tau_add, fully activated at
    tau_act, per-block confidence tau_conf. attention="block_causal" for D2F-trained (block-causal) checkpoints loaded
    with model.with_block_causal(block_length). cache="pipeline": D2F's KV cache of the finished prefix (exact under
    block-causal attention, an approximation under bidirectional attention); a cached forward covers span_blocks
    blocks from the cache boundary, rows whose pipeline is longer take a full forward. After an EOS no block is added
    and the row ends when the added blocks are complete (the official end; the positions never added become EOS);
    eos_early_stop=True ends it sooner, once the first EOS has no mask before it (same text up to the EOS, fewer
    forwards)."""
    bl, _ = _blocks(gen_length, block_length, None)
    if attention not in ("bidirectional", "block_causal"):
        raise PresetError(f"d2f: attention must be 'bidirectional' or 'block_causal', got {attention!r}")
    mode_bc = attention == "block_causal"
    if model_cfg is not None:
        have = int(model_cfg.block_causal)
        if mode_bc and have != bl:
            raise PresetError(f"d2f attention='block_causal' needs a model with block-causal attention over blocks of "
                              f"{bl} (model.with_block_causal({bl})); this model has block_causal={have}")
        if not mode_bc and have:
            raise PresetError(f"this model runs block-causal attention (block_causal={have}): use d2f with "
                              f"attention='block_causal' and block_length={have}")
    cache = "none" if cache is None else cache  # `--set cache=none` parses to None
    if cache not in _COMPOSE_OK["d2f"]:
        raise PresetError(f"d2f: cache must be 'none' or 'pipeline', got {cache!r}")
    sched = compose(gen_length, window="d2f", accept="d2f", cache=cache, block_length=bl, tau_add=tau_add,
                    tau_act=tau_act, tau_conf=tau_conf, span_blocks=span_blocks, eos_early_stop=eos_early_stop,
                    model_cfg=model_cfg)
    # the attention mode is the preset's argument (compose reads it from the model, which may not be given); the
    # cache boundary is kept on D2F's blocks
    return sched.replace(window=dataclasses.replace(sched.window, block_causal=mode_bc),
                         cache=dataclasses.replace(sched.cache, align=bl) if cache == "pipeline" else sched.cache,
                         name="d2f")


_COMPOSE_WINDOWS = ("fixed", "sliding", "adablock", "elastic", "d2f")
_COMPOSE_ACCEPTS = ("threshold", "factor", "quota", "hierarchical", "localleap", "credit", "d2f")
_COMPOSE_CACHES = ("none", "prefix", "dual", "dsb", "vicinity", "pipeline")
# which caches a window works with: block caches refresh when a block starts (fixed / delimiter blocks); the DSB
# cache follows a sliding window's jumps; the elastic window sizes itself from a full forward's confidences and
# never closes a block (no refresh point for a block cache) and reads confidences past any cached window; D2F's
# finished-prefix cache ("pipeline") needs only a window start that never moves back
_COMPOSE_OK = {"fixed": ("none", "prefix", "dual", "vicinity", "pipeline"),
               "adablock": ("none", "prefix", "dual", "vicinity", "pipeline"),
               "sliding": ("none", "dsb", "pipeline"), "elastic": ("none",),
               # D2F's pipeline of blocks: no block start to refresh at, its start only moves forward
               "d2f": ("none", "pipeline")}


def compose(gen_length, *, window="fixed", accept="threshold", cache="none", block_length=32, max_block_length=-1,
            delimiter_ids=(198,), delimiter_threshold=math.inf, budget=1.0, min_size=4, max_size=64,
            threshold=0.9, factor=None, steps=None, run_threshold=0.4, relaxed=0.75, radius=4, alpha=0.7,
            boost=0.2, decay=0.8, slots=None, prefix_window=8,
            prefix_look=16, after_look=16, refresh_every=0, span_blocks=3, tau_add=0.1, tau_act=0.95, tau_conf=0.9,
            eos_early_stop=False, model_cfg=None):
    """Any window x acceptance x cache by name (LLaDA-style: no logit shift handling beyond the model's):
    window fixed|sliding|adablock|elastic|d2f, accept threshold|factor|quota|hierarchical|localleap|credit|d2f,
    cache none|prefix|dual|dsb|vicinity|pipeline. E.g. window=sliding, accept=hierarchical, cache=dsb.
    window=d2f is D2F's pipeline of blocks (tau_add), accept=d2f its per-block rule (tau_conf, tau_act; with the d2f
    or fixed window); compose(window="d2f", accept="d2f") is the `d2f` preset.
    cache=pipeline is D2F's finished-prefix cache (span_blocks x block_length positions per cached forward); it is
    exact on a block-causal model (`with_block_causal`), an approximation on a bidirectional one."""
    from dllm_jax.engine.dinfer import Hierarchical, VicinityCache
    from dllm_jax.engine.dsb import DSBCache
    from dllm_jax.engine.localleap import LocalLeap

    cache = "none" if cache is None else cache  # `--set cache=none` parses to None
    for kind, v, ok in (("window", window, _COMPOSE_WINDOWS), ("accept", accept, _COMPOSE_ACCEPTS),
                        ("cache", cache, _COMPOSE_CACHES)):
        if v not in ok:
            raise PresetError(f"compose: {kind} must be one of {', '.join(ok)}, got {v!r}")
    if cache not in _COMPOSE_OK[window]:
        raise PresetError(f"compose: window={window!r} works with cache in {_COMPOSE_OK[window]}, got {cache!r}")
    if accept == "quota" and window != "fixed":
        raise PresetError("compose: accept='quota' (a per-block step budget) needs window='fixed'")
    if accept == "d2f" and window not in ("fixed", "d2f"):
        raise PresetError("compose: accept='d2f' (per-block activation over blocks of block_length) needs "
                          "window='d2f' or 'fixed'")
    steps_per_block = None
    if window == "fixed":
        bl, nb = _blocks(gen_length, block_length, steps)
        win = FixedBlocks(bl)
        steps_per_block = (steps or gen_length) // nb
    elif window == "sliding":
        win = _sliding(gen_length, block_length, max_block_length)
    elif window == "adablock":
        from dllm_jax.engine.adablock import DelimiterBlocks

        if block_length is None or block_length <= 0:
            raise PresetError(f"block_length must be > 0, got {block_length}")
        ids, tau = _delims(delimiter_ids, delimiter_threshold)
        win = DelimiterBlocks(init_block_length=int(block_length), delimiter_ids=ids, delimiter_threshold=tau)
    elif window == "d2f":
        from dllm_jax.engine.d2f import D2FPipeline

        bl, _ = _blocks(gen_length, block_length, None)
        win = D2FPipeline(block_length=bl, tau_add=float(tau_add),
                          block_causal=bool(model_cfg is not None and model_cfg.block_causal))
    else:
        from dllm_jax.engine.elastic import EntropyElastic

        win = EntropyElastic(budget=float(budget), min_size=int(min_size), max_size=int(max_size))
    if accept in ("threshold", "factor"):
        acc = _threshold_or_factor(threshold if accept == "threshold" else None,
                                   factor if accept == "factor" else None, steps_per_block)
        if accept == "factor" and factor is None:
            raise PresetError("compose: accept='factor' needs factor=...")
    elif accept == "quota":
        acc = TopKQuota(steps_per_block=steps_per_block)
    elif accept == "d2f":
        from dllm_jax.engine.d2f import D2FAccept

        acc = D2FAccept(block_length=win.block_length, tau_conf=float(tau_conf), tau_act=float(tau_act))
    elif accept == "hierarchical":
        acc = Hierarchical(threshold=float(threshold), run_threshold=float(run_threshold))
    elif accept == "credit":
        from dllm_jax.engine.dinfer import CreditThreshold

        if model_cfg is not None and model_cfg.logit_shift:
            raise PresetError("credit decoding (dinfer_credit) is defined for LLaDA-style models (no logit shift); "
                              "Dream is not supported")
        if not (0.0 < threshold <= 1.0) or alpha < 0 or boost < 0 or not (0.0 <= decay <= 1.0):
            raise PresetError(f"credit decoding needs threshold in (0, 1], alpha >= 0, boost >= 0, decay in [0, 1]; "
                              f"got {threshold}, {alpha}, {boost}, {decay}")
        # exact when slots >= the forwards a position spends in the window (<= block_length for fixed blocks)
        acc = CreditThreshold(threshold=float(threshold), alpha=float(alpha), boost=float(boost), decay=float(decay),
                              slots=int(slots or (block_length if window == "fixed" else gen_length)))
    else:
        if not (0.0 < relaxed <= threshold <= 1.0):
            raise PresetError(f"compose: localleap needs 0 < relaxed ({relaxed}) <= threshold ({threshold}) <= 1")
        acc = LocalLeap(threshold=float(threshold), relaxed=float(relaxed), radius=int(radius))
    if cache == "dsb":
        if prefix_window is None or prefix_window < 0:
            raise PresetError(f"prefix_window must be >= 0, got {prefix_window}")
        cpol = DSBCache(prefix_window=int(prefix_window), suffix_window=0, refresh_tokens=int(block_length))
    elif cache == "pipeline":
        from dllm_jax.engine.d2f import PipelineCache

        if isinstance(span_blocks, bool) or not isinstance(span_blocks, int) or span_blocks < 1:
            raise PresetError(f"compose: span_blocks must be an integer >= 1, got {span_blocks!r}")
        if not block_length or block_length <= 0:
            raise PresetError(f"compose: cache='pipeline' needs block_length > 0, got {block_length}")
        align = int(model_cfg.block_causal) if model_cfg is not None else 0
        cpol = PipelineCache(span=int(span_blocks) * int(block_length), align=align)
    elif cache == "vicinity":
        _looks(prefix_look, after_look, refresh_every)
        cpol = VicinityCache(prefix_look=int(prefix_look), after_look=int(after_look), refresh_every=int(refresh_every))
    else:
        cpol = _cache(cache)
    return Schedule(window=win, accept=acc, cache=cpol,
                    sampler=_eos_sampler(model_cfg, "prob", 0.0, False, False, False),
                    eos_early_stop=eos_early_stop, name=f"compose[{window}x{accept}x{cache}]")


_EXTRA: dict[str, Callable[..., Schedule]] = {
    "compose": compose,
    "localleap": localleap, "dinfer_hierarchical": dinfer_hierarchical, "dinfer_credit": dinfer_credit,
    "entropy_elastic": entropy_elastic,
    "osdt": osdt, "d2f": d2f,
}


PRESETS: dict[str, Callable[..., Schedule]] = {
    "llada": llada, "vanilla": vanilla, "fastdllm": fastdllm, "fastdllm_prefix": fastdllm_prefix,
    "fastdllm_dual": fastdllm_dual, "dream": dream, "fastdllm_dream_threshold": fastdllm_dream_threshold,
    "fastdllm_dream_prefix": fastdllm_dream_prefix, "fastdllm_dream_dual": fastdllm_dream_dual,
    **_ADVANCED, **_EXTRA,
}

# block-diffusion families (Fast-dLLM v2, SDAR): window x acceptance x cache of engine/block_diffusion.py
from dllm_jax.presets_block import BLOCK_PRESETS  # noqa: E402

PRESETS.update(BLOCK_PRESETS)

# LLaDA 2.x (LLaDA2.0 / LLaDA2.1 hub generate): engine/llada2.py over the block-diffusion policies
from dllm_jax.presets_llada2 import LLADA2_PRESETS  # noqa: E402

PRESETS.update(LLADA2_PRESETS)


# wrappers that forward **kw to another preset function: (target, arguments the wrapper fixes itself)
vanilla.preset_target, vanilla.preset_fixed = llada, ("steps",)
for _f in (fastdllm, fastdllm_prefix, fastdllm_dual):
    _f.preset_target = _fastdllm
for _targets, _target in (((fastdllm_dream_prefix, fastdllm_dream_dual), _fastdllm_dream_block),
                          ((adablock, adablock_prefix, adablock_dual), _adablock),
                          ((adablock_dream, adablock_dream_dual), _adablock_dream),
                          ((blockbatch, blockbatch_rms, blockbatch_dream), _blockbatch)):
    for _f in _targets:
        _f.preset_target = _target
# arguments whose default is None but that take a number
_NUMERIC = frozenset({"threshold", "factor", "steps", "block_length", "top_p", "top_k", "temperature", "eps"})


def _fn_args(fn) -> dict | None:
    """Keyword arguments (name -> default) a preset function takes; None when it forwards **kw it cannot name."""
    out, open_kw = {}, False
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            open_kw = True
        elif p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty):
            out[p.name] = p.default
    if open_kw:
        target = getattr(fn, "preset_target", None)
        inner = _fn_args(target) if target is not None else None
        if inner is None:
            return None
        for k in getattr(fn, "preset_fixed", ()):
            inner.pop(k, None)
        out = {**inner, **out}
    out.pop("model_cfg", None)
    return out


def preset_args(name: str) -> dict | None:
    """The arguments preset `name` takes, name -> default (None if the preset cannot list them)."""
    if name not in PRESETS:
        raise PresetError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return _fn_args(PRESETS[name])


def describe(name: str) -> str:
    """The first paragraph of preset `name`'s docstring, on one line."""
    doc = inspect.getdoc(PRESETS[name]) or ""
    return " ".join(doc.split("\n\n")[0].split())


def _check_args(name: str, kw: dict) -> None:
    accepted = preset_args(name)
    if accepted is None:
        return
    unknown = sorted(set(kw) - set(accepted))
    if unknown:
        others = sorted(n for n in PRESETS if n != name and set(unknown) <= set(_fn_args(PRESETS[n]) or ()))
        hint = f"; presets that take {', '.join(unknown)}: {', '.join(others)}" if others else ""
        raise PresetError(f"preset {name!r} does not take {', '.join(unknown)}; it takes: "
                          f"{', '.join(sorted(accepted))}{hint}")
    for k, v in kw.items():
        d = accepted[k]
        if isinstance(d, bool) and not isinstance(v, bool):
            raise PresetError(f"{name}: {k} must be true or false, got {v!r}")
        numeric = (isinstance(d, (int, float)) and not isinstance(d, bool)) or (d is None and k in _NUMERIC)
        if numeric and v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))) \
                and not _float_text(v):
            raise PresetError(f"{name}: {k} must be a number, got {v!r}")


def _float_text(v) -> bool:
    """A string the official code's JSON writes for a float ("inf", "1e-3"): the presets convert it."""
    if not isinstance(v, str):
        return False
    try:
        float(v)
    except ValueError:
        return False
    return True


def make_schedule(name: str, gen_length: int, model_cfg: ModelConfig | None = None, **kw) -> Schedule:
    """Build the schedule of preset `name` for `gen_length` generated tokens.

    name: a key of PRESETS (`dllm-jax presets` lists them with what each reproduces); gen_length: the number of
    generated positions (most presets need it divisible by their block length); model_cfg: the loaded model's
    config (EOS/EOT ids, block-causal attention, logit shift); kw: the preset's own arguments (`preset_args(name)`
    lists them with their defaults), e.g. block_length, steps, threshold, temperature, cache.

    Every argument is checked here, before anything is compiled: an unknown argument, a value of the wrong type
    or an impossible combination raises PresetError naming it and what would do."""
    if name not in PRESETS:
        raise PresetError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    if isinstance(gen_length, bool) or not isinstance(gen_length, int) or gen_length <= 0:
        raise PresetError(f"gen_length must be a positive integer, got {gen_length!r}")
    _check_args(name, kw)
    return PRESETS[name](gen_length, model_cfg=model_cfg, **kw).replace(gen_length=gen_length)
