"""`dllm-jax` command line: generate, convert, conformance, train, eval, bench, serve."""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def default_model_path() -> str:
    here = os.path.join(os.path.dirname(__file__), "assets", "default_model")
    return here


class ArgParser(argparse.ArgumentParser):
    """argparse with one-line errors: `prog: error: ... (see prog --help)` instead of the whole usage first."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def quiet_transformers() -> None:
    """We never need PyTorch: keep transformers from announcing on every command that it is missing."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def user_error(e: BaseException) -> bool:
    """Errors caused by the input or the machine (shown as one line), as opposed to bugs (shown with a traceback)."""
    if isinstance(e, (ValueError, OSError)):
        return True
    from pallas_kernels.block_attention.api import KernelUnavailableError

    return isinstance(e, KernelUnavailableError)


def _parse_value(v: str):
    low = v.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    if v[:1] in "[(" and v[-1:] in "])":  # lists: block_sizes=[4,8,16], delimiter_ids=[7]
        import ast

        try:
            return list(ast.literal_eval(v))
        except (ValueError, SyntaxError):
            raise ValueError(f"cannot parse {v!r} as a list (expected e.g. [4,8,16])") from None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_set(items) -> dict:
    """`--set KEY=VALUE` items (repeatable) as preset keyword arguments; ValueError on a malformed item."""
    kw = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        kw[k.strip()] = _parse_value(v.strip())
    return kw


def model_defaults(schedule: str, model_cfg, kw: dict) -> dict:
    """Preset arguments the loaded model implies unless given: d2f on a block-causal model (`--block-causal N`) runs
    in block-causal mode over the model's blocks."""
    if schedule == "d2f" and model_cfg.block_causal:
        kw.setdefault("attention", "block_causal")
        kw.setdefault("block_length", model_cfg.block_causal)
    return kw


def default_schedule(model_cfg) -> str:
    """The preset `generate` uses without --schedule: the family's own (Fast-dLLM v2, SDAR, ...), else vanilla."""
    from dllm_jax.models import FAMILIES

    mod = FAMILIES.get(getattr(model_cfg, "family", None))
    return getattr(mod, "DEFAULT_PRESET", "vanilla")


def schedule_from_args(a, model_cfg):
    from dllm_jax.presets import make_schedule

    if a.schedule is None:
        a.schedule = default_schedule(model_cfg)
    kw = {}
    for name in ("steps", "block_length", "threshold", "factor", "temperature", "alg"):
        v = getattr(a, name, None)
        if v is not None:
            kw[name] = v
    kw.update(parse_set(a.set))
    if a.eos_early_stop:
        kw["eos_early_stop"] = True
    model_defaults(a.schedule, model_cfg, kw)
    try:
        return make_schedule(a.schedule, a.gen_length, model_cfg, **kw)
    except TypeError as e:
        raise ValueError(f"preset {a.schedule!r} does not take these arguments ({e})") from None


def default_gen_length(model_cfg) -> int:
    """The canvas `generate` and `serve` use unless told: the model's declared `default_gen_length` (the embedded
    model: 128, its code answers need it; 64 would cut and garble them), else 64."""
    return int(model_cfg.get("default_gen_length", 64))


def _add_schedule_args(p):
    p.add_argument("--schedule", default=None,
                   help="preset name (see `dllm-jax presets`; default: the model family's preset, else vanilla)")
    p.add_argument("--gen-length", type=int, default=None,
                   help="response canvas in tokens (default: the model's `default_gen_length`, else 64)")
    p.add_argument("--steps", type=int)
    p.add_argument("--block-length", type=int)
    p.add_argument("--threshold", type=float)
    p.add_argument("--factor", type=float)
    p.add_argument("--temperature", type=float)
    p.add_argument("--alg")
    p.add_argument("--eos-early-stop", action="store_true")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other preset argument")


def parse_mesh(spec: str | None):
    if not spec:
        return None
    from dllm_jax import sharding

    mesh = sharding.mesh_from_spec(spec, allow_subset=True)
    import jax

    if mesh.size < len(jax.devices()):
        print(f"[mesh] {spec}: using {mesh.size} of {len(jax.devices())} devices", file=sys.stderr)
    return mesh


def cmd_generate(a) -> int:
    import numpy as np

    import dllm_jax
    from dllm_jax.generate import generate

    path = a.model or default_model_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"model {path!r} not found (the embedded default model lives in "
                                f"dllm_jax/assets/default_model; pass --model DIR for another checkpoint)")
    mesh = parse_mesh(a.mesh)
    model = dllm_jax.load(path, dtype=a.dtype, mesh=mesh, attention=a.attention, quantize=a.quantize, lora=a.lora)
    if a.block_causal:
        model = model.with_block_causal(a.block_causal)
    tok = None
    if a.ids is None:
        if model.tokenizer_path is None:
            raise ValueError(f"model {path!r} has no tokenizer: pass the prompt as token ids with --ids 1,2,3")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model.tokenizer_path)
        prompts = a.prompt or []
        if not prompts:
            raise ValueError("give a prompt: dllm-jax generate \"your question\"")
        if any(not p.strip() for p in prompts):
            raise ValueError("the prompt is empty: give the text to answer, e.g. dllm-jax generate \"What is 12 + 35?\"")
        warn_unknown_chars(tok, prompts)
        rows = []
        for p in prompts:
            if not a.no_chat and getattr(tok, "chat_template", None):
                from dllm_jax.tokenizer import hf_chat_ids

                ids = hf_chat_ids(tok, p)
            else:
                ids = tok(p, add_special_tokens=False)["input_ids"]
            rows.append(list(ids))
    else:
        try:
            rows = [[int(t) for t in a.ids.split(",") if t.strip()]]
        except ValueError:
            raise ValueError(f"--ids must be comma-separated integers, got {a.ids!r}") from None
    if a.gen_length is None:
        a.gen_length = default_gen_length(model.cfg)
    sched = schedule_from_args(a, model.cfg)
    out = generate(model, rows, gen_length=a.gen_length, schedule=sched, seed=a.seed, mesh=mesh,
                   trace=a.show_steps)
    if a.show_steps:
        def piece(t):
            if tok is None:
                return f"{int(t)} "
            return tok.decode([int(t)], skip_special_tokens=False)

        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        for b in range(len(rows)):
            if len(rows) > 1:
                print(f"--- row {b} ---")
            for line in render_steps(out.generated[b], out.trace["step_of"][b, out.prompt_len:], piece,
                                     eos_id=model.cfg.eos_token_id, color=color):
                print(line)
    for b in range(len(rows)):
        gen = out.generated[b][: int(out.gen_lengths[b])]
        if tok is not None:
            text = tok.decode([int(t) for t in gen if t != model.cfg.mask_token_id], skip_special_tokens=True)
            print(text)
        else:
            print(" ".join(str(int(t)) for t in out.generated[b]))
    n_tok = int(np.sum(out.gen_lengths))
    print(f"[{sched.name}] NFE {out.nfe.tolist()}  generated {n_tok} tokens  run {out.run_time_s:.3f}s "
          f"({n_tok / max(out.run_time_s, 1e-9):.1f} tok/s)  compile {out.compile_time_s:.2f}s", file=sys.stderr)
    return 0


def warn_unknown_chars(tok, prompts) -> list:
    """Warn (stderr) about prompt characters the tokenizer can only encode as its unknown token; returns them."""
    unk = getattr(tok, "unk_token_id", None)
    if unk is None:
        return []
    bad = []
    for p in prompts:
        ids = tok(p, add_special_tokens=False)["input_ids"]
        if unk in ids:
            bad += [c for c in dict.fromkeys(p) if unk in tok(c, add_special_tokens=False)["input_ids"]]
    bad = list(dict.fromkeys(bad))
    if bad:
        shown = " ".join(repr(c) for c in bad[:10]) + (" ..." if len(bad) > 10 else "")
        print(f"warning: {len(bad)} character(s) of the prompt are not in this model's vocabulary and are read as "
              f"{tok.unk_token!r}: {shown}", file=sys.stderr)
    return bad


def render_steps(gen_ids, step_of, piece, eos_id=None, mask_char="\u00b7", color=False, max_lines=400):
    """The denoising as text, one line per loop iteration: the canvas after that iteration (masks as `mask_char`),
    the positions committed at it marked (bold green with `color`, else in [brackets]), and how many there were.

    gen_ids: final generated ids [G]; step_of: the iteration at which each position was filled (-1 never), as
    returned in `generate(..., trace=True).trace["step_of"]` (generated part); piece(id) -> its text."""
    gen_ids, step_of = np.asarray(gen_ids), np.asarray(step_of)
    n_iter = int(step_of.max()) + 1 if step_of.size else 0

    def text(t):
        if eos_id is not None and int(t) == eos_id:
            return "\u220e"  # end-of-sequence marker
        return piece(int(t)).replace("\n", "\u23ce")

    lines = []
    for k in range(min(n_iter, max_lines)):
        cells = []
        for t, s in zip(gen_ids, step_of):
            if s < 0 or s > k:
                cells.append(mask_char)
            elif s == k:
                p = text(t)
                cells.append(f"\x1b[1;32m{p}\x1b[0m" if color else f"[{p}]")
            else:
                cells.append(text(t))
        n_new = int(np.sum(step_of == k))
        lines.append(f"step {k + 1:3d} +{n_new:<3d}| " + "".join(cells))
    if n_iter > max_lines:
        lines.append(f"... ({n_iter - max_lines} more steps)")
    return lines


def cmd_presets(a) -> int:
    import shutil
    import textwrap

    from dllm_jax.models import FAMILIES
    from dllm_jax.presets import PRESETS, describe

    width = max(60, min(shutil.get_terminal_size((120, 24)).columns, 140))
    own = {fam: tuple(getattr(mod, "PRESETS", ())) for fam, mod in FAMILIES.items()}
    claimed = {n for names in own.values() for n in names}
    groups = [("llada, dream (bidirectional; also any model)", [n for n in sorted(PRESETS) if n not in claimed])]
    groups += [(f"{fam} (default: {getattr(FAMILIES[fam], 'DEFAULT_PRESET', names[0])})", list(names))
               for fam, names in own.items() if names]
    for i, (title, names) in enumerate(groups):
        print(("\n" if i else "") + f"== {title}")
        for name in names:
            text = textwrap.fill(describe(name) or "(no description)", width=width, initial_indent=f"{name:26s} ",
                                 subsequent_indent=" " * 27)
            print(text)
    print("\nArguments of a preset: python -c \"from dllm_jax.presets import preset_args; print(preset_args('NAME'))\"; "
          "set them with --set KEY=VALUE.")
    return 0


def main(argv=None) -> int:
    quiet_transformers()
    ap = ArgParser(prog="dllm-jax", description="Diffusion-LLM inference in JAX")
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text (default: the embedded model)")
    g.add_argument("prompt", nargs="*")
    g.add_argument("--model", help="HF or converted checkpoint directory (default: embedded model)")
    g.add_argument("--ids", help="prompt as comma-separated token ids (for checkpoints without a tokenizer)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--attention", default="reference", help="reference | pallas_tpu | pallas_gpu | pallas_mgpu | auto")
    g.add_argument("--quantize", choices=["int8", "int8-all"], default=None,
                   help="int8 weight-only quantization at load (int8-all: also embedding + LM head; "
                        "docs/quantization.md)")
    g.add_argument("--lora", metavar="ADAPTER", help="PEFT LoRA adapter merged into an HF checkpoint at load "
                                                     "(e.g. a D2F adapter on LLaDA-Instruct)")
    g.add_argument("--block-causal", type=int, default=0, metavar="N",
                   help="run block-causal attention over blocks of N with the prompt as one block (D2F-trained "
                        "models); with --schedule d2f it implies --set attention=block_causal")
    g.add_argument("--mesh", help="device mesh, e.g. data=2,model=4")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.add_argument("--show-steps", action="store_true",
                   help="render the denoising: the canvas after each step, the positions committed at it marked")
    _add_schedule_args(g)
    g.set_defaults(fn=cmd_generate)

    p = sub.add_parser("presets", help="list the schedule presets")
    p.set_defaults(fn=cmd_presets)

    for name, (_, help_) in _DELEGATED.items():  # listed for --help; dispatched below, before argparse
        sub.add_parser(name, help=help_, add_help=False)

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        # argparse's REMAINDER does not capture a leading `--option`, so these sub-commands get their
        # arguments untouched (`dllm-jax train --preset default` == `python -m dllm_jax.train --preset default`)
        return _delegate(argv[0], argv[1:])
    a = ap.parse_args(argv)
    _maybe_compilation_cache()
    try:
        return a.fn(a)
    except Exception as e:  # noqa: BLE001 - input errors are one line; anything else is a bug: re-raised
        if not user_error(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


# sub-commands that are modules with their own argument parser: name -> (module, help)
_DELEGATED = {"convert": ("convert.hf_to_flax", "convert an HF checkpoint to the dllm-jax format"),
              "conformance": ("dllm_jax.conformance", "run golden-format cases"),
              "train": ("dllm_jax.train", "train the embedded default model"),
              "eval": ("dllm_jax.evaluate", "evaluate schedules on the task suite"),
              "bench": ("dllm_jax.bench", "efficiency benchmark"),
              "serve": ("dllm_jax.serve.server", "OpenAI-compatible streaming server (continuous batching)")}


def _maybe_compilation_cache() -> None:
    if os.environ.get("DLLM_JAX_CACHE_DIR"):  # persistent XLA compilation cache (dllm_jax.utils)
        from dllm_jax.utils import enable_compilation_cache

        enable_compilation_cache()


def _delegate(cmd: str, rest: list) -> int:
    import importlib

    _maybe_compilation_cache()
    module = _DELEGATED[cmd][0]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        print(f"error: `dllm-jax {cmd}` is not available ({e})", file=sys.stderr)
        return 2
    try:
        return int(mod.main(rest) or 0)
    except KeyboardInterrupt:
        print(f"dllm-jax {cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - as in main(): input errors are one line, bugs keep their traceback
        if not user_error(e):
            raise
        print(f"dllm-jax {cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
