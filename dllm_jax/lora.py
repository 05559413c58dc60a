"""Merge a PEFT LoRA adapter into a checkpoint's weights while they are read (D2F ships its models this way:
a LoRA on LLaDA-Instruct / Dream-Base, e.g. SJTU-Deng-Lab/D2F_LLaDA_Instruct_8B_Lora).

An adapter directory holds `adapter_config.json` (r, lora_alpha, use_rslora, target_modules, ...) and
`adapter_model.safetensors` with, for every adapted linear layer `<module>`, the pair
`base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r]. The merged weight, in the
checkpoint's own [out, in] layout, is

    W + scale * B @ A,   scale = lora_alpha / r   (lora_alpha / sqrt(r) with use_rslora)

computed in float32 from the source precision and written into the model's buffer (transposed like the base weight,
or quantized), so nothing beyond one layer's delta is held. Only plain LoRA on linear weights is supported: DoRA,
trained biases, `modules_to_save`, per-module rank/alpha patterns and `fan_in_fan_out` adapters are refused with a
clear error rather than merged wrongly. The tensor names and shapes are checked against the checkpoint's before a
single weight is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

from dllm_jax.hf_weights import CheckpointError, _iter_shard, read_header

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


class AdapterError(CheckpointError):
    """A LoRA adapter that cannot be merged into this checkpoint."""


@dataclasses.dataclass
class Adapter:
    path: str
    scale: float
    rank: int
    # base weight name (as in the checkpoint) -> (A [r, in], B [out, r]) float32
    pairs: dict

    def delta(self, name: str) -> np.ndarray:
        a, b = self.pairs[name]
        return (self.scale * (b @ a)).astype(np.float32)


def _fail(path, msg):
    raise AdapterError(f"LoRA adapter {path!r}: {msg}")


def _base_name(name: str):
    """`base_model.model.<module>.lora_A.weight` -> (`<module>.weight`, "lora_A"); None for any other tensor."""
    for part in ("lora_A", "lora_B"):
        suffix = f".{part}.weight"
        if name.endswith(suffix):
            module = name[: -len(suffix)]
            return (module[len(PREFIX):] if module.startswith(PREFIX) else module) + ".weight", part
    return None


def read_adapter(path: str) -> Adapter:
    """Read and validate a PEFT LoRA adapter directory (config + safetensors weights)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise AdapterError(f"LoRA adapter {path!r} is not a directory (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    path = os.fspath(path)
    cfg_file, w_file = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(cfg_file):
        _fail(path, f"no {CONFIG_NAME}")
    if not os.path.isfile(w_file):
        other = [f for f in os.listdir(path) if f.startswith("adapter_model")]
        _fail(path, f"no {WEIGHTS_NAME}" + (f" (found {other}: re-save the adapter with safetensors)" if other else ""))
    try:
        with open(cfg_file) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        _fail(path, f"{CONFIG_NAME} is not valid JSON ({e})")
    if not isinstance(cfg, dict):
        _fail(path, f"{CONFIG_NAME} must hold a JSON object")
    ptype = str(cfg.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        _fail(path, f"peft_type {ptype!r} is not supported (only LORA)")
    for key, ok, what in (("use_dora", lambda v: not v, "DoRA"), ("bias", lambda v: v in (None, "none"), "trained biases"),
                          ("modules_to_save", lambda v: not v, "modules_to_save (fully trained modules)"),
                          ("rank_pattern", lambda v: not v, "per-module ranks (rank_pattern)"),
                          ("alpha_pattern", lambda v: not v, "per-module alphas (alpha_pattern)"),
                          ("fan_in_fan_out", lambda v: not v, "fan_in_fan_out (Conv1D-style) layers")):
        if not ok(cfg.get(key)):
            _fail(path, f"{what} is not supported ({key}={cfg.get(key)!r})")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        _fail(path, f"r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        _fail(path, f"lora_alpha must be a number, got {alpha!r}")
    scale = float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)

    header = read_header(w_file)
    halves: dict = {}
    for name, info in header.items():
        split = _base_name(name)
        if split is None:
            _fail(path, f"unexpected tensor {name!r} (only lora_A / lora_B weights can be merged)")
        halves.setdefault(split[0], {})[split[1]] = info
    if not halves:
        _fail(path, "holds no lora_A / lora_B weights")
    for base, parts in halves.items():
        if set(parts) != {"lora_A", "lora_B"}:
            _fail(path, f"{base}: has {sorted(parts)} but needs both lora_A and lora_B")
        a, b = parts["lora_A"], parts["lora_B"]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != r or b.shape[1] != r:
            _fail(path, f"{base}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not have rank r={r} "
                        "(expected [r, in] and [out, r])")
    pairs = {base: [None, None] for base in halves}
    for name, arr in _iter_shard(w_file, header):
        base, part = _base_name(name)
        pairs[base][0 if part == "lora_A" else 1] = np.asarray(arr, np.float32)
    return Adapter(path, scale, r, {k: tuple(v) for k, v in pairs.items()})


def check_against(adapter: Adapter, plan) -> None:
    """Every adapted weight must be a 2-D weight of the checkpoint with shape [out, in] = [B rows, A columns]."""
    shapes = {n: tuple(i.shape) for _, h in plan.shards for n, i in h.items()}
    unknown = [n for n in adapter.pairs if n not in plan.dest]
    if unknown:
        _fail(adapter.path, f"{len(unknown)} adapted weight(s) are not in the checkpoint, e.g. {unknown[:3]} "
                            "(an adapter for another model family?)")
    for name, (a, b) in adapter.pairs.items():
        want = shapes[name]
        if len(want) != 2 or want != (b.shape[0], a.shape[1]):
            _fail(adapter.path, f"{name}: the delta B @ A is {(b.shape[0], a.shape[1])} but the checkpoint's weight is "
                                f"{want}")
