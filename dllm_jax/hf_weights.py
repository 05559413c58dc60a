"""Read Hugging Face safetensors checkpoints (single file or sharded with an index) into the params pytree.

Streams one tensor at a time: every shard header is parsed and validated first (`plan_checkpoint`: names, shapes,
dtypes, file sizes -- a bad checkpoint fails before any weight is read), then each tensor is read with a plain
`readinto` (no mmap, so the shard itself is never resident), mapped through the model family's name table,
transposed to the Flax [in, out] layout and cast straight into preallocated stacked per-layer host buffers of the
target dtype. Peak host memory is therefore about the output buffers plus the largest single tensor; no second copy
of the model is ever held. Every expected tensor must be present with the expected shape and none may be left over.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Callable, Iterator

import numpy as np

from dllm_jax.models import FAMILIES
from dllm_jax.models.config import ModelConfig
from dllm_jax.models.transformer import param_shapes


class CheckpointError(ValueError):
    """The checkpoint on disk is not what the model expects."""


_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def _st_dtypes() -> dict:
    import ml_dtypes

    return {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype("<f2"), "F32": np.dtype("<f4"),
            "F64": np.dtype("<f8"), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"),
            "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?")}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype tag, e.g. "BF16"
    shape: tuple
    start: int  # absolute byte offset in the file
    nbytes: int


def shard_files(path: str) -> list[str]:
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint path {path!r} does not exist or is not a directory")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = sorted(set(_index_weight_map(index).values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that do not exist: {missing}")
        return [os.path.join(path, f) for f in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors file in {path!r} (expected model.safetensors or an index)")
    return [os.path.join(path, f) for f in files]


def _index_weight_map(index: str) -> dict:
    try:
        with open(index) as f:
            wm = json.load(f)["weight_map"]
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise TypeError("'weight_map' must map tensor names to file names")
        return wm
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index} is not a valid safetensors index (need a 'weight_map'): {e}") from None


def read_header(fname: str) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors header against the file size. Raises CheckpointError when the file is
    truncated or corrupt, or holds a dtype this reader does not know."""
    dtypes = _st_dtypes()
    bad = f"cannot read {fname}:"
    try:
        size = os.path.getsize(fname)
        with open(fname, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{bad} truncated safetensors file ({size} bytes, no header)")
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{bad} truncated or corrupt safetensors file (header length {n} but the file "
                                      f"is {size} bytes)")
            raw = f.read(n)
        header = json.loads(raw)
    except OSError as e:
        raise CheckpointError(f"{bad} {e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{bad} corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad} corrupt safetensors header (not a JSON object)")
    base, data_len = 8 + n, size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            tag, shape, (a, b) = meta["dtype"], tuple(int(s) for s in meta["shape"]), meta["data_offsets"]
            a, b = int(a), int(b)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{bad} corrupt safetensors header entry for {name!r} ({e!r})") from None
        if tag not in dtypes:
            raise CheckpointError(f"{bad} tensor {name} has dtype {tag!r}, which is not supported "
                                  f"(supported: {sorted(dtypes)})")
        want = math.prod(shape) * dtypes[tag].itemsize
        if a < 0 or b < a or b - a != want or any(s < 0 for s in shape):
            raise CheckpointError(f"{bad} corrupt safetensors header: tensor {name} {tag}{list(shape)} has data "
                                  f"offsets [{a}, {b}] ({want} bytes expected)")
        if b > data_len:
            raise CheckpointError(f"{bad} truncated safetensors file: tensor {name} ends at byte {base + b} but the "
                                  f"file is {size} bytes")
        out[name] = TensorInfo(name, tag, shape, base + a, b - a)
    return out


def _read_tensor(f, info: TensorInfo, fname: str) -> np.ndarray:
    arr = np.empty(info.shape, _st_dtypes()[info.dtype])
    f.seek(info.start)
    view = memoryview(arr.reshape(-1).view(np.uint8)) if info.nbytes else memoryview(b"")
    got = 0
    while got < info.nbytes:
        k = f.readinto(view[got:])
        if not k:
            raise CheckpointError(f"cannot read {fname}: truncated safetensors file (tensor {info.name} ends early)")
        got += k
    return arr


def _iter_shard(fname: str, header: dict[str, TensorInfo] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) for every tensor of one safetensors file, in file order, one tensor in memory at a time.
    Handles every safetensors dtype including BF16 (as ml_dtypes.bfloat16); a truncated or corrupt file raises
    CheckpointError (before the first tensor when the header already shows it)."""
    if header is None:
        header = read_header(fname)
    try:
        with open(fname, "rb") as f:
            for info in sorted(header.values(), key=lambda t: t.start):
                yield info.name, _read_tensor(f, info, fname)
    except OSError as e:
        raise CheckpointError(f"cannot read {fname}: {e}") from None


_iter_shard_bf16 = _iter_shard  # the reader above handles bf16 natively; old name kept


def expected_shapes(cfg: ModelConfig) -> dict:
    return param_shapes(cfg)


@dataclasses.dataclass
class CheckpointPlan:
    """What a checkpoint holds and where every tensor goes; built from the headers only."""

    shards: list[tuple[str, dict[str, TensorInfo]]]  # (file, header) in read order
    dest: dict[str, tuple]  # HF name -> (params key, layer index or None, transpose?)
    source_dtypes: set[str]  # safetensors dtype tags of the mapped tensors

    @property
    def n_tensors(self) -> int:
        return sum(len(h) for _, h in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for _, h in self.shards for t in h.values())


FLOAT_TAGS = frozenset({"BF16", "F16", "F32", "F64"})  # safetensors tags a weight may be stored in


def checkpoint_name(cfg: ModelConfig, dst: tuple, layer: int | None = None) -> str:
    """The checkpoint's (HF) name of the params leaf `dst` (layer `layer`), from the family's weight table; the
    internal name `layers.wq[1]` when the table's pattern is not a plain name."""
    internal = ".".join(dst) + ("" if layer is None else f"[{layer}]")
    for rx, d, _ in FAMILIES[cfg.family].WEIGHT_TABLE:
        if tuple(d) == tuple(dst):
            name = rx.replace(r"(\d+)", str(layer)) if layer is not None else rx
            name = name.replace("\\.", ".")
            return internal if any(c in name for c in "()[]?*+|\\") else name
    return internal


def plan_checkpoint(path: str, cfg: ModelConfig) -> CheckpointPlan:
    """Validate a checkpoint against `cfg` from its headers alone: every shard readable and complete, every name
    known, every shape right, nothing missing, duplicated or left over. Raises CheckpointError."""
    if cfg.family == "llada2_moe":  # experts stacked [E, ...], fused q/k/v: its own reader (dllm_jax.moe_weights)
        from dllm_jax import moe_weights

        return moe_weights.plan_checkpoint(path, cfg)
    table = [(re.compile(rx + r"\Z"), dst, tr) for rx, dst, tr in FAMILIES[cfg.family].WEIGHT_TABLE]
    shapes = expected_shapes(cfg)
    files = shard_files(path)
    index = os.path.join(path, "model.safetensors.index.json")
    wm = _index_weight_map(index) if os.path.isfile(index) else None
    shards, dest, where, extra, src_dtypes, filled = [], {}, {}, [], set(), set()
    for fname in files:
        header = read_header(fname)
        shards.append((fname, header))
        for name, info in header.items():
            base = os.path.basename(fname)
            if name in where:
                raise CheckpointError(f"tensor {name} appears twice in the checkpoint ({where[name]} and {base})")
            where[name] = base
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
                want = shapes["layers"][dst[1]][1:]
                key = (dst[1], li)
            elif dst[0] not in shapes:
                if cfg.tie_embeddings and dst == ("lm_head",):
                    continue  # a tied head stored anyway: the model reads embed.T (models/transformer.py `_head`)
                extra.append(name)
                continue
            else:
                want = shapes[dst[0]]
                key = (dst[0], None)
            if info.dtype not in FLOAT_TAGS:
                raise CheckpointError(f"tensor {name} in {base} is stored as {info.dtype}; a weight must be a float "
                                      f"tensor ({'/'.join(sorted(FLOAT_TAGS))}) -- the checkpoint is corrupt or "
                                      f"not a plain float checkpoint")
            hf_want = tuple(reversed(want)) if tr else tuple(want)
            if tuple(info.shape) != hf_want:
                raise CheckpointError(f"tensor {name} in {base} has shape {tuple(info.shape)}, expected {hf_want} "
                                      f"for this config")
            if key in filled:
                raise CheckpointError(f"tensor {name} in {base} maps to a params leaf already filled "
                                      f"({key[0]}{'' if key[1] is None else f'[{key[1]}]'})")
            dest[name] = key + (tr,)
            filled.add(key)
            src_dtypes.add(info.dtype)
    if wm is not None:
        wrong = [n for n, fn in wm.items() if where.get(n) != os.path.basename(fn)]
        if wrong:
            raise CheckpointError(f"{index} does not match its shards: {len(wrong)} tensor(s) are not where the index "
                                  f"says, e.g. {wrong[:4]}")
    missing = []
    for k, v in shapes.items():
        if k == "layers":
            missing += [checkpoint_name(cfg, ("layers", lk), li) for lk in v for li in range(cfg.n_layers)
                        if (lk, li) not in filled]
        elif (k, None) not in filled:
            missing.append(checkpoint_name(cfg, (k,)))
    if missing:
        raise CheckpointError(f"checkpoint {path!r} is missing {len(missing)} tensor(s) the config needs: "
                              f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        raise CheckpointError(f"checkpoint {path!r} has {len(extra)} unexpected tensor(s) for a {cfg.family} model: "
                              f"{extra[:8]}{' ...' if len(extra) > 8 else ''}")
    return CheckpointPlan(shards, dest, src_dtypes)


def _aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """np.empty with a 64-byte aligned buffer, so that jax.device_put on CPU can adopt it without a copy."""
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    raw = np.empty(n + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + n].view(dtype).reshape(shape)


def load_hf_params(path: str, cfg: ModelConfig, dtype=np.float32,
                   on_shard: Callable[[str], None] | None = None,
                   on_tensor: Callable[[str, str], None] | None = None,
                   plan: CheckpointPlan | None = None, quantize=None, lora=None) -> dict:
    """Map every tensor of an HF checkpoint into a params pytree of numpy arrays (dtype `dtype`).

    The output buffers are allocated up front in `dtype`; each tensor is read, transposed and cast directly into
    its slot, then dropped. `on_tensor(file, name)` runs after each tensor, `on_shard(file)` after each file.
    quantize ("int8", "int8-all" or a dllm_jax.quant.QuantConfig): the quantized leaves are preallocated as
    `QArray(int8, float32 scales)` and each tensor is quantized from its source precision straight into its slot
    (dllm_jax.quant.quantize_np), so no float copy of those weights is ever held. lora: a `dllm_jax.lora.Adapter`
    merged into its weights as they are read (W + scale * B @ A in float32, checked against the plan first)."""
    from dllm_jax import quant

    if cfg.family == "llada2_moe":
        from dllm_jax import moe_weights

        return moe_weights.load_hf_params(path, cfg, dtype=dtype, on_shard=on_shard, on_tensor=on_tensor, plan=plan,
                                          quantize=quantize, lora=lora)
    qcfg = quant.resolve(quantize)
    if plan is None:
        plan = plan_checkpoint(path, cfg)
    if lora is not None:
        from dllm_jax.lora import check_against

        check_against(lora, plan)
    shapes = expected_shapes(cfg)
    qtop = qcfg.top_leaves() if qcfg is not None else ()
    qlayer = quant.LINEAR if qcfg is not None else ()

    def alloc(name, s, quantized):
        if not quantized:
            return _aligned_empty(s, dtype)
        ax = quant.reduce_axis(name) % len(s)
        return quant.QArray(_aligned_empty(s, np.int8),
                            _aligned_empty(tuple(1 if i == ax else d for i, d in enumerate(s)), np.float32),
                            np.dtype(dtype))

    out: dict = {"layers": {k: alloc(k, s, k in qlayer) for k, s in shapes["layers"].items()}}
    for k, s in shapes.items():
        if k != "layers":
            out[k] = alloc(k, s, k in qtop)
    for fname, header in plan.shards:
        for name, arr in _iter_shard(fname, header):
            if name not in plan.dest:  # ignored by the plan (a tied lm_head stored anyway)
                continue
            key, li, tr = plan.dest[name]
            if lora is not None and name in lora.pairs:
                arr = arr.astype(np.float32) + lora.delta(name)
            slot = out[key] if li is None else out["layers"][key]
            if isinstance(slot, quant.QArray):
                q, sc = (slot.q, slot.scale) if li is None else (slot.q[li], slot.scale[li])
                quant.quantize_np(arr.T if tr else arr, quant.reduce_axis(key), out=(q, sc))
            else:
                slot = slot if li is None else slot[li]
                slot[...] = arr.T if tr else arr  # one strided copy + cast into the final buffer
            del arr
            if on_tensor:
                on_tensor(fname, name)
        if on_shard:
            on_shard(fname)
    return out
