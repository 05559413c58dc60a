"""Convert a Hugging Face LLaDA / Dream checkpoint into the dllm-jax converted format.

    python -m convert.hf_to_flax SRC DST [--dtype bfloat16|float32] [--quantize int8|int8-all] [--overwrite]
                                 [--no-progress]

SRC is an HF checkpoint directory (config.json + model.safetensors, or shards + model.safetensors.index.json).
DST receives `dllm_jax_config.json` + an orbax `params/` directory (see dllm_jax.checkpoint) plus the tokenizer
files found in SRC. The conversion streams one tensor at a time (dllm_jax.hf_weights): the output buffers are
preallocated in the target dtype and filled per shard, so peak host memory is about the converted model plus the
largest single tensor (docs/converter.md has the measurement). With --quantize each weight is quantized to int8
as it is read (dllm_jax.quant), so only the int8 model is ever held (docs/quantization.md).

Everything is written into a temp directory beside DST and renamed into place at the very end; on any error the
temp directory is removed and nothing is left at DST (with --overwrite an existing DST is replaced only after
success). Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shutil
import sys
import signal
import tempfile
import threading
import time

# Files copied verbatim from SRC when present (tokenizer, generation defaults, chat templates).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "qwen.tiktoken",
    "generation_config.json", "chat_template.json", "chat_template.jinja",
)
TOKENIZER_GLOBS = ("tokenization_*.py", "*.tiktoken", "*.jinja")
TOKENIZER_DIRS = ("additional_chat_templates",)

SAVE_CHUNK_BYTES = 16 << 20  # zarr chunk size of the written params (see save_params_bounded)

DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "fp32": "float32", "auto": "auto"}

PROG = "python -m convert.hf_to_flax"


class ConvertError(Exception):
    """A user-facing conversion error (bad arguments or paths)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2 decided by main(), no SystemExit
        raise ConvertError(f"{message} (usage: {self.prog} SRC DST [--dtype bfloat16|float32] "
                           f"[--quantize int8|int8-all] [--overwrite]; see --help)")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Convert a Hugging Face LLaDA/Dream safetensors checkpoint to the dllm-jax "
                                       "format (orbax params + dllm_jax_config.json + tokenizer files).")
    p.add_argument("src", metavar="SRC", help="HF checkpoint directory (config.json + *.safetensors)")
    p.add_argument("dst", metavar="DST", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES), metavar="{bfloat16,float32}",
                   help="stored parameter dtype; default: that of the source weights (bfloat16 if they are all bf16, "
                        "else float32)")
    p.add_argument("--quantize", default=None, choices=("int8", "int8-all"),
                   help="store int8 weights (per-output-channel symmetric, float32 scales), quantized tensor by tensor "
                        "while streaming: int8 = the linear layer weights, int8-all = also the embedding and LM head; "
                        "--dtype then applies to the remaining leaves. dllm_jax.load restores them as int8")
    p.add_argument("--lora", metavar="ADAPTER", default=None,
                   help="PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) merged into the "
                        "weights while they are read, e.g. a D2F adapter")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists (only once conversion succeeded)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _makedirs(parent: str) -> list[str]:
    """Create missing ancestors of the output; return the ones created (deepest last) so they can be undone."""
    created = []
    p = parent
    while not os.path.exists(p):
        created.append(p)
        p = os.path.dirname(p)
    for d in reversed(created):
        try:
            os.mkdir(d)
        except OSError as e:
            _undo_makedirs(created[created.index(d) + 1:])
            raise ConvertError(f"cannot create output directory {d}: {e.strerror or e}") from None
    return list(reversed(created))


def _undo_makedirs(created: list[str]) -> None:
    for d in reversed(created):
        try:
            os.rmdir(d)
        except OSError:
            pass


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    for pat in TOKENIZER_GLOBS:
        names += [os.path.basename(f) for f in glob.glob(os.path.join(src, pat)) if os.path.isfile(f)]
    names = sorted(set(names))
    for n in names:
        shutil.copy2(os.path.join(src, n), os.path.join(dst, n))
    for d in TOKENIZER_DIRS:
        if os.path.isdir(os.path.join(src, d)):
            shutil.copytree(os.path.join(src, d), os.path.join(dst, d))
            names.append(d + "/")
    return names


def _to_jax_arrays(tree: dict) -> None:
    """Replace numpy leaves by CPU jax arrays in place, one leaf at a time (device_put adopts the 64-byte aligned
    buffers from hf_weights without copying), so the saved checkpoint restores as jax arrays."""
    import jax

    from dllm_jax.quant import QArray

    cpu = jax.devices("cpu")[0]
    for k in list(tree):
        if isinstance(tree[k], dict):
            _to_jax_arrays(tree[k])
        elif isinstance(tree[k], QArray):
            tree[k] = QArray(jax.device_put(tree[k].q, cpu), jax.device_put(tree[k].scale, cpu), tree[k].dtype)
        else:
            tree[k] = jax.device_put(tree[k], cpu)


def save_params_bounded(dst: str, params: dict) -> None:
    """dllm_jax.checkpoint.save_params with orbax's in-flight write bytes capped at the largest leaf.

    Same handler and on-disk format as `save_params` (StandardCheckpointHandler -> `params/`), but tensorstore
    holds the encoded bytes of every write in flight and weights hardly compress, so orbax's default cap (96 GB)
    lets the save buffer a second copy of the whole model. A cap just above the largest leaf (orbax needs every
    single write to fit) keeps the save's extra memory to one or two leaves; 16 MiB zarr chunks trim the encode
    buffers further (measured ~20% less) and let a sharded restore read only the chunks it needs. The chunking
    is recorded in the zarr metadata, so `restore_converted` reads it like any other orbax checkpoint."""
    import orbax.checkpoint as ocp

    largest = max(a.size * a.dtype.itemsize for a in _leaves(params))
    handler = ocp.StandardCheckpointHandler(save_concurrent_gb=(largest + (1 << 20)) / 1e9)
    ckptr = ocp.Checkpointer(handler)
    try:
        save_args = _map_leaves(params, lambda a: ocp.SaveArgs(chunk_byte_size=SAVE_CHUNK_BYTES))
        ckptr.save(os.path.abspath(os.path.join(dst, "params")),
                   args=ocp.args.StandardSave(params, save_args=save_args))
    finally:
        ckptr.close()


@contextlib.contextmanager
def deferred_interrupt(log):
    """Hold back Ctrl-C (SIGINT) while orbax writes: its writer threads keep going after the main thread is
    interrupted, so removing the temp dir at once would race them (leaving a half-written dir and a thread
    traceback at exit). The interrupt is raised when the write has finished; a second Ctrl-C aborts at once.
    A no-op off the main thread (signal handlers can only be set there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hits = []

    def handler(signum, frame):
        hits.append(signum)
        if len(hits) == 1:
            log("interrupted: finishing the write in progress, then removing it (Ctrl-C again to abort at once)")
        else:
            raise KeyboardInterrupt

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if hits:
        raise KeyboardInterrupt


def convert(src: str, dst: str, dtype: str = "auto", overwrite: bool = False, progress: bool = True,
            log=None, quantize: str | None = None, lora: str | None = None) -> dict:
    """Convert SRC (HF) into DST (dllm-jax format). Returns a summary dict. Raises ConvertError, ConfigError or
    CheckpointError for bad inputs; never leaves a partial DST or temp directory behind. quantize: None, "int8"
    or "int8-all" (see dllm_jax.quant). lora: a PEFT LoRA adapter directory merged while reading (dllm_jax.lora)."""
    from dllm_jax import quant
    from dllm_jax.hf_weights import load_hf_params, plan_checkpoint
    from dllm_jax.models.config import config_from_hf, read_hf_config

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if dtype not in DTYPES:
        raise ConvertError(f"invalid --dtype {dtype!r}; choose bfloat16 or float32")
    try:
        qcfg = quant.resolve(quantize)
    except quant.QuantError as e:
        raise ConvertError(str(e)) from None
    src_abs, dst_abs = os.path.abspath(src), os.path.abspath(dst)
    if not os.path.exists(src_abs):
        raise ConvertError(f"source checkpoint {src!r} does not exist")
    if not os.path.isdir(src_abs):
        raise ConvertError(f"source checkpoint {src!r} is not a directory")
    if os.path.lexists(dst_abs) and not overwrite:
        raise ConvertError(f"output {dst!r} already exists; pass --overwrite to replace it")
    if _is_within(os.path.realpath(src_abs), os.path.realpath(dst_abs)):
        raise ConvertError(f"output {dst!r} would replace the source checkpoint {src!r}")

    hf = read_hf_config(src_abs)
    cfg = config_from_hf(hf, where=os.path.join(src_abs, "config.json"))
    plan = plan_checkpoint(src_abs, cfg)  # all headers validated: bad checkpoints fail before anything is written
    adapter = None
    if lora is not None:
        from dllm_jax.lora import read_adapter

        adapter = read_adapter(lora)  # checked against the plan by load_hf_params, before a weight is read
    dtype_name = DTYPES[dtype]
    if dtype_name == "auto":
        dtype_name = "bfloat16" if plan.source_dtypes == {"BF16"} else "float32"
    import ml_dtypes
    import numpy as np

    np_dtype = np.float32 if dtype_name == "float32" else ml_dtypes.bfloat16

    parent = os.path.dirname(dst_abs)
    created = _makedirs(parent)
    tmp = None
    try:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst_abs)}.tmp-", dir=parent)
        log(f"converting {cfg.family} checkpoint {src} ({len(plan.shards)} shard(s), {plan.n_tensors} tensors, "
            f"{_fmt_bytes(plan.total_bytes)}, source dtype {'/'.join(sorted(plan.source_dtypes))}) -> {dst} "
            f"[{dtype_name}{f', {qcfg.name}' if qcfg else ''}]")
        if os.environ.get("DLLM_JAX_CONVERT_HOLD_S"):  # test seam: stay in the reading phase (Ctrl-C test on a
            time.sleep(float(os.environ["DLLM_JAX_CONVERT_HOLD_S"]))  # loaded machine, tests/test_convert.py)
        from tqdm import tqdm

        with tqdm(total=plan.n_tensors, unit="tensor", file=sys.stderr, disable=not progress, dynamic_ncols=True,
                  desc="reading") as bar:
            shard_no = {f: i + 1 for i, (f, _) in enumerate(plan.shards)}

            def on_tensor(fname, name):
                bar.set_description(f"shard {shard_no[fname]}/{len(plan.shards)}", refresh=False)
                bar.update(1)

            params = load_hf_params(src_abs, cfg, dtype=np_dtype, on_tensor=on_tensor, plan=plan, quantize=qcfg,
                                    lora=adapter)
        n_params = sum(int(np.prod(a.shape)) for a in _leaves(params, weights_only=True))
        n_bytes = sum(a.size * a.dtype.itemsize for a in _leaves(params))
        from dllm_jax.checkpoint import write_config

        with deferred_interrupt(log):  # orbax writes from its own threads: let them finish, then clean up
            log(f"writing orbax checkpoint ({n_params:,} parameters, {_fmt_bytes(n_bytes)})")
            _to_jax_arrays(params)
            save_params_bounded(tmp, params)
        del params
        write_config(tmp, cfg, dtype_name, converter="convert.hf_to_flax",
                     source={"path": src_abs, "model_type": hf.get("model_type"),
                             "dtypes": sorted(plan.source_dtypes), "shards": len(plan.shards),
                             **({"lora": {"path": os.path.abspath(lora), "r": adapter.rank, "scale": adapter.scale,
                                          "merged_weights": len(adapter.pairs)}} if adapter else {})},
                     hf_config=hf, **({"quantization": qcfg.to_meta()} if qcfg else {}))
        copied = copy_tokenizer_files(src_abs, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        _replace(tmp, dst_abs)
        tmp = None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _undo_makedirs(created)
        raise
    return {"src": src_abs, "dst": dst_abs, "family": cfg.family, "dtype": dtype_name, "n_params": n_params,
            "shards": len(plan.shards), "tokenizer_files": copied, "quantization": qcfg.name if qcfg else None,
            "bytes": n_bytes}


def _leaves(tree, weights_only=False):
    """The arrays of a params tree; an int8 QArray gives its values and scales (only its values: weights_only)."""
    from dllm_jax.quant import QArray

    for v in tree.values():
        if isinstance(v, dict):
            yield from _leaves(v, weights_only)
        elif isinstance(v, QArray):
            yield v.q
            if not weights_only:
                yield v.scale
        else:
            yield v


def _map_leaves(tree, fn):
    from dllm_jax.quant import QArray

    def one(v):
        if isinstance(v, dict):
            return _map_leaves(v, fn)
        if isinstance(v, QArray):
            return QArray(fn(v.q), fn(v.scale), v.dtype)
        return fn(v)

    return {k: one(v) for k, v in tree.items()}


def _replace(tmp: str, dst: str) -> None:
    """Move the finished temp dir to dst; an existing dst (only there with --overwrite) is swapped out first and
    deleted only after the new one is in place."""
    old = None
    if os.path.lexists(dst):
        old = tempfile.mktemp(prefix=f".{os.path.basename(dst)}.old-", dir=os.path.dirname(dst))
        os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        if old is not None:
            os.rename(old, dst)
        raise
    if old is not None:
        _remove(old)


def main(argv=None, prog: str | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    if prog is None:
        prog = "dllm-jax convert" if os.path.basename(sys.argv[0] or "") == "dllm-jax" else PROG
    if "jax" not in sys.modules:  # the converter needs no accelerator: do not grab one
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    parser = build_parser(prog)
    err = f"{prog}: error:"
    try:
        args = parser.parse_args(argv)
    except ConvertError as e:
        print(f"{err} {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)

    from dllm_jax.hf_weights import CheckpointError
    from dllm_jax.models.config import ConfigError

    try:
        info = convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress,
                       quantize=args.quantize, lora=args.lora)
    except (ConvertError, ConfigError, CheckpointError) as e:
        print(f"{err} {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{err} {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written to {args.dst}", file=sys.stderr)
        return 130
    tok = f", tokenizer files: {', '.join(info['tokenizer_files'])}" if info["tokenizer_files"] else ", no tokenizer files"
    q = f" + {info['quantization']}" if info["quantization"] else ""
    print(f"wrote {info['dst']} ({info['family']}, {info['n_params']:,} parameters, {info['dtype']}{q}{tok})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
