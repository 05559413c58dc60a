"""LLaDA 2.x presets: the hub `generate` of LLaDA2.0 and of LLaDA2.1 as window x acceptance x cache compositions
(engine/llada2.py over engine/block_diffusion.py), and the runner that returns what the official function returns.

| preset   | official function                                                                                   |
|----------|-----------------------------------------------------------------------------------------------------|
| llada2   | inclusionAI/LLaDA2.0-mini hub modeling_llada2_moe.py `LLaDA2MoeModelLM.generate` (greedy branch)      |
| llada21  | inclusionAI/LLaDA2.1-mini hub modeling_llada2_moe.py `LLaDA2MoeModelLM.generate` (M2T + T2T editing) |

Both: blocks of `block_length` from position 0 (the prompt tail belongs to the first decoded block), every forward
recomputes x[:, :block_end] (NoBlockCache: the loop's full forward with the keys limited to the current block end),
batch 1 in the official code (here rows are independent: a row's output is its batch-of-one output).

Quirks reproduced by default, each with its corrected behaviour as an explicit option:
* LLaDA2.1's attention mask is the 0/1 block pattern added as a bias (nothing is masked: earlier blocks attend to
  the current one with weight e^-1); `mask_fix=True` uses the 0/-inf block-causal mask of LLaDA2.0 (the later dllm
  fix, `.log()`), which also makes the finished-block KV cache exact (`cache="block"`).
* LLaDA2.0's `eos_early_stop` return includes the prompt and searches eos from position 0 (an eos inside the prompt
  returns a prompt prefix); reproduced as is (the returned value is the official one).
* LLaDA2.0 stops after any block holding eos_id whatever eos_early_stop says (the official block loop's check).
* LLaDA2.0 hub sampler has no temperature-0 branch (issue #6): temperature 0 here is the maintainers' greedy fix.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dllm_jax.engine.block_diffusion import BlockCache, NoBlockCache, QuotaThreshold
from dllm_jax.engine.llada2 import LLaDA2Window
from dllm_jax.engine.loop import Schedule
from dllm_jax.engine.sampling import TokenSampler


def PresetError(msg: str):  # noqa: N802 - presets.py registers these presets, so its error class is imported lazily
    from dllm_jax.presets import PresetError as _PresetError

    return _PresetError(msg)


_ALWAYS = 1 << 20  # a quota schedule that never ends: num_to_transfer at every step (QuotaThreshold(n * K, K))
_NO_BLOCK_MASK = 1 << 30  # key_end = the window end only (LLaDA2.1: the block pattern is a bias, not a mask)


def _sampler(name, temperature, top_p, top_k):
    if temperature is None or temperature < 0:
        raise PresetError(f"{name}: temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return TokenSampler(confidence="prob")
    # softmax(logits / T) after top-k / top-p, the probability of the drawn token as confidence (not the torch
    # RNG stream: sampled runs are not token-exact)
    return TokenSampler(confidence="prob", temperature=float(temperature), style="dream", top_p=top_p, top_k=top_k)


def _common(name, gen_length, block_length, threshold, eos_id, model_cfg):
    bl = int(block_length)
    if bl <= 0:
        raise PresetError(f"{name}: block_length must be > 0, got {block_length}")
    if int(gen_length) <= 0:
        raise PresetError(f"{name}: gen_length must be > 0, got {gen_length}")
    if threshold is None or not (0.0 <= float(threshold) <= 1.0):
        raise PresetError(f"{name}: threshold must lie in [0, 1], got {threshold}")
    eos = eos_id if eos_id is not None else (model_cfg.eos_token_id if model_cfg is not None else None)
    if eos is None:
        raise PresetError(f"{name}: eos_id is required (the model config gives none)")
    if model_cfg is not None:
        from dllm_jax.presets_block import _warn_untrained

        _warn_untrained(model_cfg, bl, "block_length",
                        f"block-causal attention and decoding over blocks of {bl} from position 0 (the official "
                        "generate accepts any block_length and builds its mask from it)")
    return bl, int(eos)


def llada2(gen_length, *, block_length=32, steps=32, threshold=0.95, minimal_topk=1, eos_early_stop=False,
           eos_id=None, temperature=0.0, top_p=None, top_k=None, cache="none", model_cfg=None) -> Schedule:
    """LLaDA2.0 `generate`: per block at most `steps` forwards; quota get_num_transfer_tokens(block_length, steps);
    the masks with p > threshold when at least the quota of them, else the quota most confident. cache="block" keeps
    the finished blocks' K/V (exact for this block-causal mask; not what the official code does, same tokens)."""
    name = "llada2"
    bl, eos = _common(name, gen_length, block_length, threshold, eos_id, model_cfg)
    if minimal_topk is None or int(minimal_topk) <= 0:
        raise PresetError(f"{name}: minimal_topk must be >= 1, got {minimal_topk}")
    steps = min(int(steps), int(gen_length) // int(minimal_topk))  # as the official code
    if steps <= 0:
        raise PresetError(f"{name}: steps must be >= 1 (after min(steps, gen_length // minimal_topk)), got {steps}")
    if cache not in ("none", "block"):
        raise PresetError(f"{name}: cache must be 'none' (the official recompute) or 'block', got {cache!r}")
    block = cache == "block"  # prompt prefill + a store forward per finished block, as SDAR's cache
    win = LLaDA2Window(block_size=bl, new_tokens=int(gen_length), stop_ids=(eos,), stop_after_block=True,
                       early_eos=bool(eos_early_stop), eos_id=eos, prefill=block,
                       complete="store" if block else "none")
    cpol = NoBlockCache(window=win) if cache == "none" else BlockCache(window=win)
    return Schedule(window=win, accept=QuotaThreshold(block_length=bl, steps=steps, threshold=float(threshold)),
                    cache=cpol, sampler=_sampler(name, temperature, top_p, top_k), name=name,
                    max_nfe=_nblocks_bound(gen_length, bl) * (steps + 1) + 8)


def llada21(gen_length, *, block_length=32, threshold=0.95, editing_threshold=0.9, max_post_steps=16,
            num_to_transfer=1, eos_early_stop=False, eos_id=None, temperature=0.0, top_p=None, top_k=None,
            steps=None, minimal_topk=None, mask_fix=False, model_cfg=None) -> Schedule:
    """LLaDA2.1 `generate` (token editing): M2T with a constant quota `num_to_transfer`, T2T edits of this block's
    earlier commits above `editing_threshold`, up to `max_post_steps` mask-free forwards per block. `steps` and
    `minimal_topk` are accepted and unused, as in the official code."""
    name = "llada21"
    bl, eos = _common(name, gen_length, block_length, threshold, eos_id, model_cfg)
    del steps, minimal_topk
    if editing_threshold is None or not (0.0 <= float(editing_threshold) <= 1.0):
        raise PresetError(f"{name}: editing_threshold must lie in [0, 1], got {editing_threshold}")
    if max_post_steps is None or int(max_post_steps) < 0:
        raise PresetError(f"{name}: max_post_steps must be >= 0, got {max_post_steps}")
    if num_to_transfer is None or int(num_to_transfer) <= 0:
        raise PresetError(f"{name}: num_to_transfer must be >= 1, got {num_to_transfer}")
    if temperature not in (0, 0.0):
        raise PresetError(f"{name}: only greedy decoding (temperature=0) is supported with token editing (the T2T "
                          f"test reads the greedy proposal), got temperature={temperature}")
    n = int(num_to_transfer)
    win = LLaDA2Window(block_size=bl, new_tokens=int(gen_length), stop_ids=(eos,),
                       stop_after_block=bool(eos_early_stop), eos_id=eos, editing=True,
                       editing_threshold=float(editing_threshold), max_post_steps=int(max_post_steps),
                       denoise_mask=bl if mask_fix else _NO_BLOCK_MASK, attention="hard" if mask_fix else "soft01")
    return Schedule(window=win, accept=QuotaThreshold(block_length=n * _ALWAYS, steps=_ALWAYS,
                                                      threshold=float(threshold)),
                    cache=NoBlockCache(window=win), sampler=_sampler(name, temperature, top_p, top_k),
                    name=name + ("_maskfix" if mask_fix else ""),
                    max_nfe=_nblocks_bound(gen_length, bl) * (bl + int(max_post_steps) + 1) + 8)


def _nblocks_bound(gen_length, bl):
    return int(gen_length) // bl + 2


LLADA2_PRESETS = {"llada2": llada2, "llada21": llada21}


# ------------------------------------------------------------------------------------------------------- runner

@dataclasses.dataclass
class LLaDA2Output:
    sequences: list  # per row, what the official `generate` returns for that row alone (1-D int arrays)
    nfe: list  # forwards per row (the official count of model calls for that row)
    early: list  # per row: True when the LLaDA2.0 eos_early_stop return (prompt included) was taken
    canvas: np.ndarray
    compile_time_s: float
    run_time_s: float


def generate_llada2(model, prompt_ids, *, schedule: Schedule, seed=0, mesh=None) -> LLaDA2Output:
    """Run an llada2 / llada21 schedule; returns per row x[P:P + gen_length] cut after the first eos (eos included),
    or with the LLaDA2.0 early stop x[:eos_pos + 1] (prompt included), as the official functions."""
    from dllm_jax.engine.block_runner import generate_blocks

    win = schedule.window
    if not isinstance(win, LLaDA2Window):
        raise PresetError(f"schedule {schedule.name!r} is not an LLaDA 2.x schedule (presets llada2 / llada21)")
    if model.cfg.family != "llada2_moe":
        raise PresetError(f"schedule {schedule.name!r} needs an LLaDA 2.x model (family llada2_moe), got "
                          f"{model.cfg.family!r}")
    out = generate_blocks(model, prompt_ids, schedule=schedule, layout="left", seed=seed, mesh=mesh)
    st = out.state
    P, G, eos = out.prompt_len, win.new_tokens, win.eos_id
    seqs, early = [], []
    for b in range(out.canvas.shape[0]):
        origin, gen0 = int(st["origin"][b]), int(st["gen0"][b])
        row = out.canvas[b]
        if win.early_eos and bool(st["early"][b]):
            seqs.append(row[origin:int(st["eos_pos"][b]) + 1])
            early.append(True)
            continue
        gen = row[gen0:gen0 + G]
        hits = np.nonzero(gen == eos)[0]
        seqs.append(gen[: int(hits[0]) + 1] if len(hits) else gen)
        early.append(False)
    del P
    return LLaDA2Output(sequences=seqs, nfe=[int(n) for n in out.nfe_per_row], early=early, canvas=out.canvas,
                        compile_time_s=out.compile_time_s, run_time_s=out.run_time_s)
