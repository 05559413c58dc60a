"""Read Hugging Face safetensors checkpoints (single file or sharded with an index) into the params pytree.

Streams one shard at a time: each tensor is mapped (name table of the model family), transposed to the Flax
[in, out] layout, cast, and placed into preallocated stacked per-layer host buffers; no whole second copy of the
model is ever held. Every expected tensor must be present with the expected shape and no tensor may be left over.
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable, Iterator

import numpy as np

from dllm_jax.models import FAMILIES
from dllm_jax.models.config import ModelConfig
from dllm_jax.models.transformer import param_shapes


class CheckpointError(ValueError):
    """The checkpoint on disk is not what the model expects."""


def shard_files(path: str) -> list[str]:
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint path {path!r} does not exist or is not a directory")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                wm = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index (need a 'weight_map'): {e}") from None
        files = sorted(set(wm.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that do not exist: {missing}")
        return [os.path.join(path, f) for f in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors file in {path!r} (expected model.safetensors or an index)")
    return [os.path.join(path, f) for f in files]


def _iter_shard(fname: str) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(fname, framework="numpy") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot read {fname}: truncated or corrupt safetensors file ({e})") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises assorted errors (e.g. bf16 via numpy)
        if "bfloat16" in str(e) or "bf16" in str(e).lower():
            yield from _iter_shard_bf16(fname)
        else:
            raise CheckpointError(f"cannot read {fname}: {type(e).__name__}: {e}") from None


def _iter_shard_bf16(fname: str) -> Iterator[tuple[str, np.ndarray]]:
    """numpy has no bfloat16: read raw bytes and view them as ml_dtypes.bfloat16."""
    import ml_dtypes

    dtypes = {"BF16": ml_dtypes.bfloat16, "F32": np.float32, "F16": np.float16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8}
    try:
        with open(fname, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            base = 8 + n
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                a, b = meta["data_offsets"]
                f.seek(base + a)
                buf = f.read(b - a)
                if len(buf) != b - a:
                    raise CheckpointError(f"cannot read {fname}: truncated safetensors file (tensor {name})")
                yield name, np.frombuffer(buf, dtype=dtypes[meta["dtype"]]).reshape(meta["shape"])
    except (json.JSONDecodeError, KeyError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {fname}: corrupt safetensors header ({e})") from None


def expected_shapes(cfg: ModelConfig) -> dict:
    return param_shapes(cfg)


def load_hf_params(path: str, cfg: ModelConfig, dtype=np.float32,
                   on_shard: Callable[[str], None] | None = None) -> dict:
    """Map every tensor of an HF checkpoint into a params pytree of numpy arrays (dtype `dtype`)."""
    table = [(re.compile(rx + r"\Z"), dst, tr) for rx, dst, tr in FAMILIES[cfg.family].WEIGHT_TABLE]
    shapes = expected_shapes(cfg)
    out: dict = {"layers": {}}
    seen: set[tuple] = set()
    extra: list[str] = []
    for fname in shard_files(path):
        for name, arr in _iter_shard(fname):
            for rx, dst, tr in table:
                m = rx.match(name)
                if m:
                    break
            else:
                extra.append(name)
                continue
            if dst[0] == "layers":
                li = int(m.group(1))
                if dst[1] not in shapes["layers"] or li >= cfg.n_layers:
                    extra.append(name)
                    continue
                full = shapes["layers"][dst[1]]
                want = full[1:]
                key = (dst[1], li)
            else:
                want = shapes[dst[0]]
                key = (dst[0],)
            got = arr.T if tr else arr
            if tuple(got.shape) != tuple(want):
                hf_want = tuple(reversed(want)) if tr else tuple(want)
                raise CheckpointError(
                    f"tensor {name} in {os.path.basename(fname)} has shape {tuple(arr.shape)}, expected {hf_want} "
                    f"for this config")
            if key in seen:
                raise CheckpointError(f"tensor {name} appears twice in the checkpoint")
            seen.add(key)
            if dst[0] == "layers":
                buf = out["layers"].get(dst[1])
                if buf is None:
                    buf = out["layers"][dst[1]] = np.empty(full, dtype)
                buf[li] = got.astype(dtype)
            else:
                out[dst[0]] = np.ascontiguousarray(got.astype(dtype))
            del arr, got
        if on_shard:
            on_shard(fname)
    missing = []
    for k, v in shapes.items():
        if k == "layers":
            for lk in v:
                for li in range(cfg.n_layers):
                    if (lk, li) not in seen:
                        missing.append(f"layers.{lk}[{li}]")
        elif (k,) not in seen:
            missing.append(k)
    if missing:
        raise CheckpointError(f"checkpoint {path!r} is missing {len(missing)} tensor(s) the config needs: "
                              f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        raise CheckpointError(f"checkpoint {path!r} has {len(extra)} unexpected tensor(s) for a {cfg.family} model: "
                              f"{extra[:8]}{' ...' if len(extra) > 8 else ''}")
    return out
