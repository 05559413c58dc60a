"""Conformance mapping of the block-diffusion families (Fast-dLLM v2, SDAR): official function + arguments ->
preset (dllm_jax/presets_block.py) + runner (engine/block_runner.py). Called by `dllm_jax.conformance.run_cases`;
returns None for cases of other families.

Every argument of the official signature is mapped or checked (never silently dropped): mask ids other than the
checkpoint's are used as given (the official functions take them as arguments); `tokenizer` objects are absent, their
`pad_token_id` is the only field used; `min_len`/`seq_len` of batch_sample must agree with the prompts; `input_ids`,
when the case lists them, must be the right-mask-padded layout eval.py builds.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# (substring of `code`, preset); the longest matching key wins
_FN_MAP = (
    ("Fast_dLLM_QwenForCausalLM.generate", "fastdllm_v2"),
    ("Fast-dLLM v2/generation_functions.py::Fast_dLLM_QwenForCausalLM.batch_sample", "fastdllm_v2_batch"),
    ("generation_functions.py::Fast_dLLM_QwenForCausalLM.batch_sample", "fastdllm_v2_batch"),
    ("mdm_sample_with_visualization", "fastdllm_v2_vis"),
    ("huggingface_bd3.py::block_diffusion_generate", "sdar_eval"),
    ("generate.py::block_diffusion_generate", "sdar"),
)

# official argument names -> preset argument names (per preset); None = consumed here
_RENAME = {
    "fastdllm_v2": {"max_new_tokens": "gen_length", "stopping_criteria": None, "tokenizer": None},
    "fastdllm_v2_batch": {"max_new_tokens": "gen_length", "tokenizer.pad_token_id": "pad_token_id",
                          "min_len": None, "seq_len": None, "tokenizer": None},
    "fastdllm_v2_vis": {"max_new_tokens": "gen_length", "tokenizer.pad_token_id": None, "tokenizer": None},
    "sdar_eval": {"tokenizer": None},
    "sdar": {},
}


def preset_for(code: str):
    hits = [(k, p) for k, p in _FN_MAP if k in code]
    return max(hits, key=lambda kp: len(kp[0]))[1] if hits else None


def plan_block_case(model, case: dict):
    """(preset name, model, schedule, prompt rows, layout) that reproduce one golden-format case of a block-diffusion
    function (the model's config is replaced where the case passes another mask id); None when `code` names no
    such function. Raises conformance.Unsupported for what no preset reproduces."""
    from dllm_jax.conformance import Unsupported
    from dllm_jax.presets import make_schedule

    name = preset_for(case.get("code", ""))
    if name is None:
        return None
    fam = "sdar" if name.startswith("sdar") else "fastdllm_v2"
    if model.cfg.family != fam:
        raise Unsupported(f"{case.get('code')} needs a {fam} checkpoint, got a {model.cfg.family} model")
    args = dict(case.get("args", {}))
    prompt = case.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        raise Unsupported("the case has no prompt")
    rows = [list(map(int, r)) for r in (prompt if isinstance(prompt[0], list) else [prompt])]
    mask_id = args.pop("mask_id", None)
    if mask_id is not None and int(mask_id) != model.cfg.mask_token_id:
        if not (0 <= int(mask_id) < model.cfg.vocab_size):
            raise Unsupported(f"mask_id {mask_id} lies outside the vocabulary")
        model = dataclasses.replace(model, cfg=model.cfg.replace(mask_token_id=int(mask_id)))
    layout = "left"
    if name == "fastdllm_v2_batch":
        layout = "right_masked"
        lens = [len(r) for r in rows]
        if "seq_len" in args and [int(v) for v in np.ravel(args["seq_len"])] != lens:
            raise Unsupported(f"seq_len {args['seq_len']} does not match the prompt lengths {lens}")
        if "min_len" in args and int(args["min_len"]) != min(lens):
            raise Unsupported(f"min_len {args['min_len']} is not the shortest prompt length {min(lens)}")
        ids = case.get("input_ids")
        if ids is not None:
            want = [r + [model.cfg.mask_token_id] * (max(lens) - len(r)) for r in rows]
            if [list(map(int, r)) for r in ids] != want:
                raise Unsupported("input_ids are not the prompts right-padded with the mask id (eval.py's layout)")
    if name == "sdar_eval":
        am = args.get("attention_mask")
        if am is not None and not np.all(np.asarray(am) == 1):
            raise Unsupported("the evaluation generator ignores attention_mask; only all-ones masks are meaningful")
        args.pop("attention_mask", None)
    kw = {}
    for k, v in args.items():
        new = _RENAME[name].get(k, k)
        if new is not None:
            kw[new] = v
    if name in ("fastdllm_v2", "fastdllm_v2_batch", "fastdllm_v2_vis") and "stop_token" in kw:
        kw["stop_token"] = int(kw["stop_token"])
    if "top_p" in kw and name.startswith("fastdllm"):
        kw.pop("top_p")  # unused at temperature 0 (the only temperature reproduced)
    gen_length = kw.pop("gen_length", None)
    if gen_length is None:
        raise Unsupported(f"{name}: the case gives no generation length")
    try:
        sched = make_schedule(name, int(gen_length), model.cfg, **kw)
    except TypeError as e:
        raise Unsupported(f"preset {name} does not take these arguments: {e}") from None
    return name, model, sched, rows, layout


def run_block_case(model, case: dict):
    """Run one golden-format case of a block-diffusion function; None when `code` names no such function."""
    from dllm_jax.conformance import Unsupported
    from dllm_jax.engine.block_runner import BlockRunError, generate_blocks

    plan = plan_block_case(model, case)
    if plan is None:
        return None
    name, model, sched, rows, layout = plan
    try:
        out = generate_blocks(model, rows, schedule=sched, layout=layout)
    except BlockRunError as e:
        raise Unsupported(str(e)) from None
    seqs = [s.tolist() for s in out.sequences]
    output = seqs[0] if name == "fastdllm_v2_vis" else seqs
    return {"id": case.get("id", "?"), "preset": name, "output": output, "nfe": int(out.nfe)}

