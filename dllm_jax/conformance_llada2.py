"""Conformance mapping of LLaDA 2.x: the hub `LLaDA2MoeModelLM.generate` of LLaDA2.0 / LLaDA2.1 (+ arguments) ->
preset `llada2` / `llada21` (dllm_jax/presets_llada2.py) and its runner. Called by `dllm_jax.conformance.run_cases`;
returns None for cases of other functions.

Every argument of the official signature is passed to the preset (which rejects any it does not know); `mask_id` is
used as given when it differs from the checkpoint's (the official function takes it as an argument). Which of the two
functions: "LLaDA2.1" / "LLaDA2.0" in the model name before the file name in `code`, else the signature
(`editing_threshold`, `max_post_steps`, `num_to_transfer` are LLaDA2.1's).
"""

from __future__ import annotations

import dataclasses

KEY = "modeling_llada2_moe.py::LLaDA2MoeModelLM.generate"


def preset_for(code: str, args: dict) -> str | None:
    if KEY not in code:
        return None
    head = code.split(KEY)[0]  # the model the file belongs to ("inclusionAI/LLaDA2.0-mini hub "); the rest of
    if "LLaDA2.1" in head:  # `code` may mention the other version (the 2.0 cases carry the 2.1 greedy branch)
        return "llada21"
    if "LLaDA2.0" in head:
        return "llada2"
    return "llada21" if any(k in args for k in ("editing_threshold", "max_post_steps", "num_to_transfer")) \
        else "llada2"


def run_llada2_case(model, case: dict):
    """Run one golden-format case of an LLaDA 2.x `generate`; None when `code` names another function."""
    from dllm_jax.conformance import Unsupported
    from dllm_jax.engine.block_runner import BlockRunError
    from dllm_jax.presets import make_schedule
    from dllm_jax.presets_llada2 import generate_llada2

    args = dict(case.get("args", {}))
    name = preset_for(case.get("code", ""), args)
    if name is None:
        return None
    if model.cfg.family != "llada2_moe":
        raise Unsupported(f"{case.get('code')} needs an LLaDA 2.x (llada2_moe) checkpoint, got a {model.cfg.family} "
                          "model")
    prompt = case.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        raise Unsupported("the case has no prompt")
    rows = [list(map(int, r)) for r in (prompt if isinstance(prompt[0], list) else [prompt])]
    if len(rows) != 1:
        raise Unsupported(f"the official {name} generate is batch-1 only (a batch of {len(rows)} raises there)")
    mask_id = args.pop("mask_id", None)
    if mask_id is not None and int(mask_id) != model.cfg.mask_token_id:
        if not (0 <= int(mask_id) < model.cfg.vocab_size):
            raise Unsupported(f"mask_id {mask_id} lies outside the vocabulary")
        model = dataclasses.replace(model, cfg=model.cfg.replace(mask_token_id=int(mask_id)))
    gen_length = args.pop("gen_length", 2048)  # the official default
    if name == "llada2":
        for k in ("editing_threshold", "max_post_steps", "num_to_transfer"):
            if k in args:
                raise Unsupported(f"LLaDA2.0 generate has no argument {k!r}")
    try:
        sched = make_schedule(name, int(gen_length), model.cfg, **args)
        out = generate_llada2(model, rows, schedule=sched)
    except (TypeError, BlockRunError) as e:
        raise Unsupported(f"{name}: {e}") from None
    return {"id": case.get("id", "?"), "preset": name, "output": [s.tolist() for s in out.sequences],
            "nfe": int(out.nfe[0])}
