"""The Qwen-architecture families of benchmarks/vs_pytorch.py: official Dream samplers and Fast-dLLM v2.

Imported by vs_pytorch.py (run that script; `--cases dream_...,v2_...`). Official code, imported at run time from
checkouts, nothing of it copied here:

* Dream (`--fastdllm-repo`, the NVlabs/Fast-dLLM checkout the LLaDA cases use): the model `dream/model/
  modeling_dream.py`, the Dream sampler `dream/model/generation_utils.py` (`diffusion_generate`; identical to the hub
  Dream sampler for maskgit_plus/entropy, and Fast-dLLM's `confidence_threshold`), and Fast-dLLM's cached sampler
  `dream/model/generation_utils_block.py`, bound to the model as Fast-dLLM's dream/eval.py does (types.MethodType).
* Fast-dLLM v2 (`--fastdllm-v2-model`: a folder with the hub model code of Efficient-Large-Model/Fast_dLLM_v2_7B,
  `modeling.py` + `configuration.py`; weights are not needed), with `--fastdllm-v2-repo` for `v2/generation_functions.py`
  (`batch_sample`, the evaluation sampler, bound as v2/eval.py does). The repo defaults to --fastdllm-repo.

Our side runs the preset that `dllm-jax conformance` maps each official call to (dllm_jax.conformance.map_case and
conformance_block.plan_block_case), so the benchmark measures exactly what the conformance tool proves.

Model: random weights drawn as the golden checkpoints were (embeddings N(0,1); linear N(0,1)/sqrt(fan_in), q/k x3,
v/o x2; q/k/v biases 0.1 N(0,1); norms 1 + 0.1 N(0,1); LM head N(0,1)/sqrt(d) x6 with the rows of the mask and EOS
ids 0, so they are never predicted and no run stops early), saved as an HF safetensors dir that dllm_jax.load reads.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time
import types

import numpy as np

# Qwen2-style shape at the benchmark's size (d 512, like the LLaDA cases; GQA 8 query / 2 key-value heads as in
# Dream-7B's and Fast-dLLM v2-7B's 28 / 4).
QWEN_SHAPE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=1376, vocab_size=32000)
MASK_ID, EOS_ID, PAD_ID = 31999, 31998, 31997

DREAM_NOCACHE = "NVlabs/Fast-dLLM dream/model/generation_utils.py::DreamGenerationMixin.diffusion_generate"
DREAM_BLOCK = "NVlabs/Fast-dLLM dream/model/generation_utils_block.py::DreamGenerationMixin.diffusion_generate"
V2_GENERATE = "Efficient-Large-Model/Fast_dLLM_v2_7B hub modeling.py::Fast_dLLM_QwenForCausalLM.generate"
V2_BATCH = "NVlabs/Fast-dLLM v2/generation_functions.py::Fast_dLLM_QwenForCausalLM.batch_sample"


@dataclasses.dataclass(frozen=True)
class QwenCase:
    name: str
    label: str
    family: str      # "dream" | "fastdllm_v2"
    code: str        # the official function, as in the golden files' `code` (what conformance maps)
    args: dict       # its arguments, as the official call gets them
    gen: int
    batch: int
    prompt_lens: tuple = ()  # per row (batch_sample's right-padded rows); empty: all rows --prompt-len


def qwen_cases(gen: int = 128):
    dream = dict(attention_mask=None, max_new_tokens=gen, temperature=0.0, top_p=None, top_k=None, alg_temp=0.0,
                 output_history=False, return_dict_in_generate=True)
    v2 = dict(max_new_tokens=gen, mask_id=MASK_ID, block_size=32, small_block_size=8, threshold=0.9,
              stop_token=EOS_ID)
    return [
        QwenCase(f"dream_maskgit_g{gen}", f"Dream diffusion_generate, maskgit_plus, one token per step ({gen}, 1)",
                 "dream", DREAM_NOCACHE, dict(dream, steps=gen, eps=1e-3, alg="maskgit_plus"), gen, 1),
        QwenCase(f"dream_entropy_g{gen}_s{gen // 2}",
                 f"Dream diffusion_generate, entropy, two tokens per step ({gen}, 1)", "dream", DREAM_NOCACHE,
                 dict(dream, steps=gen // 2, eps=1e-3, alg="entropy"), gen, 1),
        QwenCase(f"fastdllm_dream_threshold_g{gen}", f"Fast-dLLM Dream, threshold 0.9, no cache ({gen}, 1)", "dream",
                 DREAM_NOCACHE, dict(dream, steps=gen, alg="confidence_threshold", threshold=0.9), gen, 1),
        QwenCase(f"fastdllm_dream_prefix_g{gen}", f"Fast-dLLM Dream prefix cache, threshold 0.9 ({gen}, 1)", "dream",
                 DREAM_BLOCK, dict(dream, steps=gen, eps=1e-3, alg="confidence_threshold", threshold=0.9,
                                   block_length=32, dual_cache=False), gen, 1),
        QwenCase(f"fastdllm_dream_dual_g{gen}", f"Fast-dLLM Dream dual cache, threshold 0.9 ({gen}, 1)", "dream",
                 DREAM_BLOCK, dict(dream, steps=gen, eps=1e-3, alg="confidence_threshold", threshold=0.9,
                                   block_length=32, dual_cache=True), gen, 1),
        QwenCase(f"v2_generate_g{gen}", f"Fast-dLLM v2 generate, threshold 0.9 ({gen}, 1)", "fastdllm_v2",
                 V2_GENERATE, dict(v2, temperature=0, use_block_cache=False), gen, 1),
        QwenCase(f"v2_generate_blockcache_g{gen}", f"Fast-dLLM v2 generate, block cache, threshold 0.9 ({gen}, 1)",
                 "fastdllm_v2", V2_GENERATE, dict(v2, temperature=0, use_block_cache=True), gen, 1),
        QwenCase(f"v2_batch_sample_g{gen}_b4", f"Fast-dLLM v2 batch_sample (eval.py), prompts 64/56/48/40 ({gen}, 4)",
                 "fastdllm_v2", V2_BATCH, dict(v2, use_block_cache=False), gen, 4, (64, 56, 48, 40)),
    ]


# ----------------------------------------------------------------------------------------------- official side
def _load(name, path, package_dir=None):
    """Import `path` as module `name`; with package_dir, as a package (its relative imports resolve inside it)."""
    kw = {"submodule_search_locations": [package_dir]} if package_dir else {}
    spec = importlib.util.spec_from_file_location(name, path, **kw)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _need(path, flag, what):
    if not os.path.isfile(path):
        raise SystemExit(f"{flag}: {path} not found (expected {what})")


def import_dream(fastdllm_repo: str):
    """(Dream package, no-cache sampler module, block sampler module) from NVlabs/Fast-dLLM's dream/model."""
    pkg = os.path.join(fastdllm_repo, "dream", "model")
    for f in ("__init__.py", "modeling_dream.py", "generation_utils.py", "generation_utils_block.py"):
        _need(os.path.join(pkg, f), "--fastdllm-repo", "a checkout of NVlabs/Fast-dLLM with dream/model/")
    # a package name of our own: Fast-dLLM's llada/ code is also a package called `model`
    dream = _load("official_fastdllm_dream", os.path.join(pkg, "__init__.py"), pkg)
    nocache = sys.modules["official_fastdllm_dream.generation_utils"]  # imported by the package's modeling_dream

    block = _load("official_fastdllm_dream.generation_utils_block", os.path.join(pkg, "generation_utils_block.py"))
    return dream, nocache, block


def import_fastdllm_v2(model_dir: str, repo: str):
    """(modeling module, configuration module, generation_functions module)."""
    for f in ("modeling.py", "configuration.py"):
        _need(os.path.join(model_dir, f), "--fastdllm-v2-model",
              "the hub model code of Efficient-Large-Model/Fast_dLLM_v2_7B: modeling.py and configuration.py")
    _need(os.path.join(repo, "v2", "generation_functions.py"), "--fastdllm-v2-repo",
          "a checkout of NVlabs/Fast-dLLM with v2/generation_functions.py")
    # modeling.py imports `.configuration`: load the folder as a package of our own name
    pkg = types.ModuleType("official_fastdllm_v2")
    pkg.__path__ = [model_dir]
    sys.modules["official_fastdllm_v2"] = pkg
    conf = _load("official_fastdllm_v2.configuration", os.path.join(model_dir, "configuration.py"))
    modeling = _load("official_fastdllm_v2.modeling", os.path.join(model_dir, "modeling.py"))
    gen = _load("official_fastdllm_v2_generation_functions", os.path.join(repo, "v2", "generation_functions.py"))
    return modeling, conf, gen


def hf_config(family: str, max_pos: int = 4096) -> dict:
    s = QWEN_SHAPE
    common = {
        "attention_dropout": 0.0, "bos_token_id": EOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID,
        "hidden_act": "silu", "initializer_range": 0.02, "mask_token_id": MASK_ID, "max_position_embeddings": max_pos,
        "max_window_layers": s["num_hidden_layers"], "rms_norm_eps": 1e-6, "rope_scaling": None,
        "rope_theta": 1e6, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "float32",
        "use_sliding_window": False, **s,
    }
    if family == "dream":
        return {**common, "architectures": ["DreamModel"], "model_type": "Dream", "use_cache": False}
    return {**common, "architectures": ["Fast_dLLM_QwenForCausalLM"], "model_type": "Fast_dLLM_Qwen",
            "bd_size": 32, "use_cache": True, "layer_types": ["full_attention"] * s["num_hidden_layers"]}


def _random_state(model, seed: int, qk_scale: float):
    import torch

    g = torch.Generator().manual_seed(seed)
    d = QWEN_SHAPE["hidden_size"]
    sd = {}
    for name, p in sorted(model.state_dict().items()):
        r = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if name.endswith("embed_tokens.weight"):
            w = r
        elif name.endswith("norm.weight"):
            w = 1.0 + 0.1 * r
        elif name.endswith(".bias"):
            w = 0.1 * r
        elif name == "lm_head.weight":
            w = r / d ** 0.5 * 6.0
            w[MASK_ID] = 0.0
            w[EOS_ID] = 0.0
        else:
            w = r / p.shape[1] ** 0.5
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                w = w * qk_scale
            elif name.endswith(("v_proj.weight", "o_proj.weight")):
                w = w * 2.0
        sd[name] = w.contiguous()
    return sd


def build_official(family: str, mods, ckpt_dir: str, seed: int, qk_scale: float = 3.0):
    """The official model of `family` with golden-style random weights; writes ckpt_dir once (reused while the seed
    and shape match) and loads those exact tensors back."""
    import torch
    from safetensors.torch import load_file, save_file

    cfg = hf_config(family)
    if family == "dream":
        config = mods[0].DreamConfig(**cfg)
        model = mods[0].DreamModel(config)
    else:
        config = mods[1].Fast_dLLM_QwenConfig(**cfg)
        model = mods[0].Fast_dLLM_QwenForCausalLM(config)
    model = model.float().eval()
    st = os.path.join(ckpt_dir, "model.safetensors")
    meta_path = os.path.join(ckpt_dir, "vs_pytorch_seed.json")
    meta = {"seed": seed, "shape": QWEN_SHAPE, "qk_scale": qk_scale, "family": family}
    if not (os.path.isfile(st) and os.path.isfile(meta_path) and json.load(open(meta_path)) == meta):
        os.makedirs(ckpt_dir, exist_ok=True)
        save_file(_random_state(model, seed, qk_scale), st + ".tmp", metadata={"format": "pt"})
        with open(os.path.join(ckpt_dir, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        with open(os.path.join(ckpt_dir, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": EOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID}, f)
        os.replace(st + ".tmp", st)
        with open(meta_path, "w") as f:
            json.dump(meta, f)
    model.load_state_dict(load_file(st), strict=True)
    return model


TORCH_DEVICE = "cpu"  # vs_pytorch.py --device gpu sets "cuda": both families' official models and inputs go there


def torch_sync():
    """Wait for the official side's queued GPU work (before its timer stops); nothing to wait for on the CPU."""
    if TORCH_DEVICE != "cpu":
        import torch

        torch.cuda.synchronize()


class CallCounter:
    """Counts forwards of a torch module (a forward pre-hook); used by the LLaDA cases of vs_pytorch.py too."""

    def __init__(self, module):
        self.n = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.n += 1


class _TokStub:
    """batch_sample reads only `tokenizer.pad_token_id` (as the golden data's stub)."""
    pad_token_id = PAD_ID


class OfficialQwen:
    """Runs one family's official functions on its model; counts forwards."""

    def __init__(self, family, mods, model):
        self.family, self.mods, self.model = family, mods, model
        # v2's functions call self.forward(...) directly (hooks on the top module never fire): count the inner model
        self.counter = CallCounter(model if family == "dream" else model.model)

    def run(self, case: QwenCase, prompt_rows):
        import torch

        m, args = self.model, dict(case.args)
        self.counter.n = 0
        t0 = time.perf_counter()
        with torch.no_grad():
            if case.family == "dream":
                mod = self.mods[2] if case.code == DREAM_BLOCK else self.mods[1]
                m.diffusion_generate = types.MethodType(mod.DreamGenerationMixin.diffusion_generate, m)
                m._sample = types.MethodType(mod.DreamGenerationMixin._sample, m)
                ids = torch.tensor(np.asarray(prompt_rows, np.int64), device=TORCH_DEVICE)
                out = m.diffusion_generate(ids, **args)
                rows = [r.tolist() for r in out.sequences]
            elif case.code == V2_GENERATE:
                out = m.generate(torch.tensor(np.asarray(prompt_rows, np.int64), device=TORCH_DEVICE), **args)
                rows = [r.tolist() for r in out]
            else:
                lens = [len(r) for r in prompt_rows]
                ids = torch.tensor([list(r) + [MASK_ID] * (max(lens) - len(r)) for r in prompt_rows],
                                   device=TORCH_DEVICE)
                fn = types.MethodType(self.mods[2].Fast_dLLM_QwenForCausalLM.batch_sample, m)
                out = fn(ids, _TokStub(), min_len=min(lens), seq_len=torch.tensor(lens, device=TORCH_DEVICE), **args)
                rows = [out[i].tolist() for i in range(len(prompt_rows))]
            torch_sync()
        return rows, self.counter.n, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------- our side
def golden_case(case: QwenCase, prompt_rows) -> dict:
    """The case in the golden files' format (what `dllm-jax conformance` reads)."""
    args = dict(case.args)
    if case.code == V2_BATCH:
        args.update({"min_len": min(len(r) for r in prompt_rows), "seq_len": [len(r) for r in prompt_rows],
                     "tokenizer.pad_token_id": PAD_ID})
    prompt = [list(map(int, r)) for r in prompt_rows]
    return {"id": case.name, "code": case.code, "args": args, "prompt": prompt if len(prompt) > 1 else prompt[0]}


def run_ours(case: QwenCase, model, prompt_rows, reference_work: bool = False):
    """(rows of tokens, NFE per row, run seconds, compile seconds) of our preset for the official call."""
    from dllm_jax.conformance import map_case
    from dllm_jax.conformance_block import plan_block_case
    from dllm_jax.engine.block_runner import generate_blocks
    from dllm_jax.generate import generate
    from dllm_jax.presets import make_schedule

    gc = golden_case(case, prompt_rows)
    if case.family == "fastdllm_v2":
        name, m, sched, rows, layout = plan_block_case(model, gc)
        if reference_work:
            sched = sched.replace(head_rows="all")
        out = generate_blocks(m, rows, schedule=sched, layout=layout)
        return [s.tolist() for s in out.sequences], int(out.nfe), out.run_time_s, out.compile_time_s
    name, kw, gen_kw = map_case(gc, model.cfg)
    sched = make_schedule(name, kw.pop("gen_length"), model.cfg, **kw)
    if reference_work:
        sched = sched.replace(head_rows="all")
        if hasattr(sched.cache, "suffix_widths"):
            sched = sched.replace(cache=dataclasses.replace(sched.cache, suffix_widths=1))
    out = generate(model, np.asarray(prompt_rows, np.int32), gen_length=case.gen, schedule=sched, bucket=False,
                   **gen_kw)
    nfe = sorted(set(int(v) for v in out.nfe))
    return ([r.tolist() for r in np.asarray(out.sequences)], nfe[0] if len(nfe) == 1 else nfe, out.run_time_s,
            out.compile_time_s)


def compare_rows(a, b, prompt_lens) -> str:
    """'yes' or where the generated tokens of two lists of rows first differ."""
    if len(a) != len(b):
        return f"no: {len(a)} vs {len(b)} rows"
    for i, (x, y, p) in enumerate(zip(a, b, prompt_lens)):
        if x != y:
            if len(x) != len(y) and x[:min(len(x), len(y))] == y[:min(len(x), len(y))]:
                return f"no: row {i} lengths {len(x)} vs {len(y)}"
            first = next(j for j in range(min(len(x), len(y))) if x[j] != y[j])
            n = sum(u != v for u, v in zip(x, y))
            return f"no: row {i}: {n} positions, first at generated position {first - p}"
    return "yes"


def prompts_for(case: QwenCase, plen: int, seed: int):
    rng = np.random.default_rng(seed)
    lens = case.prompt_lens or (plen,) * case.batch
    return [rng.integers(0, PAD_ID, size=n).astype(np.int32).tolist() for n in lens]
