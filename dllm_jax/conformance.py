"""Conformance tool: run golden-format cases (official code + arguments) through the matching preset.

    python -m dllm_jax.conformance --checkpoint DIR --cases FILE.json --out OUT.json

Reads only `id`, `code`, `args` and `prompt` of each case (never `output`, `nfe_*` or `forward_inputs`) and writes
{"cases": [{"id", "output", "nfe"} | {"id", "unsupported": reason}]}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

# (substring of `code`, preset name or callable(args) -> preset name)
_FN_MAP = (
    ("ML-GSAI/LLaDA generate.py::generate", "llada"),
    ("Fast-dLLM llada/generate.py::generate_with_prefix_cache", "fastdllm_prefix"),
    ("Fast-dLLM llada/generate.py::generate_with_dual_cache", "fastdllm_dual"),
    ("Fast-dLLM llada/generate.py::generate", "fastdllm"),
    ("generation_utils_block.py", lambda a: "fastdllm_dream_dual" if a.get("dual_cache") else "fastdllm_dream_prefix"),
    ("generation_utils.py", lambda a: "fastdllm_dream_threshold" if a.get("alg") == "confidence_threshold"
     else "dream"),
    # advanced block schedulers (docs/schedulers.md); the longest matching key wins
    ("lizhuo-luo/DSB llada/generate.py::generate_dsb_cache", "dsb_cache"),
    ("lizhuo-luo/DSB llada/generate.py::generate_dsb", "dsb"),
    ("lizhuo-luo/DSB dream/model/generation_utils.py", lambda a: "dsb_dream_cache" if a.get("use_cache")
     else "dsb_dream"),
    ("lgxi24/AdaBlock-dLLM llada/generate_adablock.py::generate_adablock", "adablock"),
    ("lgxi24/AdaBlock-dLLM llada/generate_adablock.py::generate_adablock_prefix_cache", "adablock_prefix"),
    ("lgxi24/AdaBlock-dLLM llada/generate_adablock.py::generate_adablock_dual_cache", "adablock_dual"),
    ("AdaBlock-dLLM dream/model/generation_utils_adablock.py::DreamGenerationMixin.diffusion_generate -> "
     "_sample_adablock", "adablock_dream"),
    ("AdaBlock-dLLM dream/model/generation_utils_adablock.py::DreamGenerationMixin.diffusion_generate -> "
     "_sample_adablock_cache", "adablock_dream_dual"),
    ("Laurence-Wu/BlockBatch llada/generate_blockBatching_original_bulk.py", "blockbatch"),
    ("Laurence-Wu/BlockBatch llada/generate_blockBatching_expand_sim_refresh_dominent_RMS.py", "blockbatch_rms"),
    ("Laurence-Wu/BlockBatch dream/generate_blockBatching_original_bulk.py", "blockbatch_dream"),
)

# arguments that only select the preset (consumed by the mapping above), per preset
_CONSUMED = {"dsb_dream": ("dsb", "use_cache", "prefix_window"),  # (no cache: prefix_window unused)
             "dsb_dream_cache": ("dsb", "use_cache")}

# argument names of the official functions -> preset keyword arguments
_RENAME = {"max_new_tokens": "gen_length"}
_DROP = {"attention_mask", "mask_id", "output_history", "return_dict_in_generate", "timesteps_float32",
         "dual_cache", "eps_listed"}


class Unsupported(Exception):
    pass


def map_case(case: dict, model_cfg) -> tuple[str, dict, dict]:
    code = case.get("code", "")
    hits = [(key, preset) for key, preset in _FN_MAP if key in code]
    if not hits:
        raise Unsupported(f"no preset reproduces {code!r}")
    key, preset = max(hits, key=lambda kp: len(kp[0]))
    args = dict(case.get("args", {}))
    name = preset(args) if callable(preset) else preset
    if name in ("dsb_dream", "dsb_dream_cache") and not args.get("dsb"):
        raise Unsupported("DSB Dream sampler called without dsb=True")
    for k in _CONSUMED.get(name, ()):
        args.pop(k, None)
    if name in ("adablock_dream", "adablock_dream_dual"):
        if name == "adablock_dream_dual" and not args.get("dual_cache"):
            raise Unsupported("_sample_adablock_cache asserts dual_cache=True")
        # The Dream delimiter list is hard-coded in the sampler (not an argument): the official list unless the case
        # ran a local copy with the list replaced, whose list the case states in `delimiter_ids_effective`.
        if "hard-coded delimiter list replaced" in code:
            if not case.get("delimiter_ids_effective"):
                raise Unsupported("patched AdaBlock Dream sampler without `delimiter_ids_effective`")
            args["delimiter_ids"] = list(case["delimiter_ids_effective"])
    if name.startswith("blockbatch") and case.get("eos_token_id") is not None:
        # the case may override the model config's eos_token_id (a config value the reference reads)
        args["eos_token_id"] = int(case["eos_token_id"])
    gen_kw = {}
    am = args.get("attention_mask")
    if isinstance(am, str):
        if am != "all-ones":
            raise Unsupported(f"attention_mask {am!r} is not understood")
    elif am is not None and "ignores attention_mask" not in case.get("model_code", ""):
        # (Fast-dLLM's LLaDA model ignores the mask: its pads are ordinary attended tokens, so feed them as such.)
        gen_kw["attention_mask"] = am
    if "mask_id" in args and args["mask_id"] != model_cfg.mask_token_id:
        raise Unsupported(f"mask_id {args['mask_id']} differs from the checkpoint's mask_token_id")
    kw = {}
    for k, v in args.items():
        if k in _DROP:
            continue
        kw[_RENAME.get(k, k)] = v
    if name.startswith("dream") or name.startswith("fastdllm_dream"):
        if "gen_length" not in kw:
            raise Unsupported("Dream case without max_new_tokens")
    if name == "dream" and kw.get("alg") == "confidence_threshold":
        raise Unsupported("confidence_threshold belongs to fastdllm_dream_threshold")
    if name in ("fastdllm_dream_threshold",):
        kw.pop("alg", None)
        kw.pop("eps", None)
    if name == "dream":
        kw.pop("threshold", None)
    if name != "dream" and kw.pop("alg_temp", 0) not in (0, 0.0, None):
        raise Unsupported("alg_temp > 0 (multinomial position sampling) is not supported")
    return name, kw, gen_kw


def run_cases(model, cases: list[dict], progress: bool = False) -> list[dict]:
    from tqdm.auto import tqdm

    from dllm_jax.generate import generate
    from dllm_jax.presets import PresetError, make_schedule

    out = []
    for case in tqdm(cases, desc="conformance", unit="case", file=sys.stderr, disable=not progress,
                     dynamic_ncols=True, leave=False):
        cid = case.get("id", "?")
        try:
            from dllm_jax.conformance_block import run_block_case

            res = run_block_case(model, case)  # Fast-dLLM v2 / SDAR functions (None: not one of them)
            if res is None:
                from dllm_jax.conformance_llada2 import run_llada2_case

                res = run_llada2_case(model, case)  # LLaDA2.0 / LLaDA2.1 generate (None: not one of them)
            if res is not None:
                out.append(res)
                continue
            name, kw, gen_kw = map_case(case, model.cfg)
            gen_length = kw.pop("gen_length")
            try:
                sched = make_schedule(name, gen_length, model.cfg, **kw)
            except TypeError as e:
                raise Unsupported(f"preset {name} does not take these arguments: {e}") from None
            if name.startswith("blockbatch"):
                from dllm_jax.engine.blockbatch import generate_branches

                bb = generate_branches(model, np.asarray(case["prompt"]), gen_length=gen_length, schedule=sched)
                out.append({"id": cid, "preset": name, "output": [s.tolist() for s in bb.sequences],
                            "nfe": bb.nfe[0], "nfe_returned": bb.nfe_returned[0], "winner": bb.winner[0],
                            "exit": bb.exit[0], "raw_row_forwards": bb.raw_row_forwards[0]})
                continue
            res = generate(model, np.asarray(case["prompt"]), gen_length=gen_length, schedule=sched, bucket=False,
                           **gen_kw)
            nfe = [int(v) for v in res.nfe]
            out.append({"id": cid, "preset": name, "output": res.sequences.tolist(),
                        "nfe": nfe[0] if len(set(nfe)) == 1 else nfe})
        except (Unsupported, PresetError) as e:
            out.append({"id": cid, "unsupported": str(e)})
    return out


def case_family(meta: dict) -> str | None:
    """The model family the cases were produced on: the family whose weight table names every tensor in
    meta['weight_names'], else the family that meta['checkpoint'] (e.g. 'dream_tiny') starts with."""
    import re

    from dllm_jax.models import FAMILIES

    ck = str(meta.get("checkpoint", ""))
    hits = [f for f in FAMILIES if ck.startswith(f)]
    named = max(hits, key=len) if hits else None
    names = meta.get("weight_names")
    if isinstance(names, list) and names:
        fits = []
        for fam, mod in FAMILIES.items():
            table = [re.compile(rx + r"\Z") for rx, _, _ in getattr(mod, "WEIGHT_TABLE", ())]
            if table and all(any(t.match(n) for t in table) for n in names):
                fits.append(fam)
        if fits:  # several families share weight names (Dream and Fast-dLLM v2: Qwen2): the checkpoint name decides
            return named if named in fits else fits[0]
    return named


def compare(case: dict, result: dict) -> str:
    """'match' (tokens and NFE equal the case's `output` / `nfe_counted`), 'differs', 'unsupported', or 'no
    expected output' (held-out case files without answers)."""
    if "unsupported" in result:
        return "unsupported"
    if "output" not in case:
        return "no expected output"
    same_nfe = "nfe_counted" not in case or result.get("nfe") == case["nfe_counted"]
    return "match" if result.get("output") == case["output"] and same_nfe else "differs"


def main(argv=None) -> int:
    from dllm_jax.cli import ArgParser, quiet_transformers

    quiet_transformers()  # also when run as python -m

    ap = ArgParser(prog="dllm_jax.conformance", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    import dllm_jax

    try:
        with open(a.cases) as f:
            data = json.load(f)
        cases = data["cases"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        print(f"error: cannot read cases from {a.cases}: {e}", file=sys.stderr)
        return 2
    try:
        model = dllm_jax.load(a.checkpoint)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fam = case_family(data.get("meta", {}) if isinstance(data, dict) else {})
    if fam is not None and fam != model.cfg.family:
        print(f"warning: the cases in {a.cases} were produced on a {fam} checkpoint, but {a.checkpoint} is a "
              f"{model.cfg.family} model: their outputs cannot match", file=sys.stderr)
    results = run_cases(model, cases, progress=not a.no_progress)
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"cases": results}, f)
    os.replace(tmp, a.out)
    verdicts = [compare(c, r) for c, r in zip(cases, results)]
    counts = {v: verdicts.count(v) for v in ("match", "differs", "unsupported", "no expected output") if v in verdicts}
    print(f"{len(results)} cases: " + ", ".join(f"{n} {v}" for v, n in counts.items()) + f" -> {a.out}")
    for c, r, v in zip(cases, results, verdicts):
        if v == "differs":
            print(f"  differs: {r['id']} (nfe {r.get('nfe')} vs {c.get('nfe_counted')}"
                  f"{', tokens differ' if r.get('output') != c.get('output') else ''})")
        elif v == "unsupported":
            print(f"  unsupported: {r['id']}: {r['unsupported']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
