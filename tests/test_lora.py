"""Merging PEFT LoRA adapters at load / conversion (dllm_jax.lora)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import dllm_jax
from dllm_jax.lora import AdapterError, read_adapter

LLADA_TARGETS = {"q_proj": "wq", "v_proj": "wv", "attn_out": "wo", "ff_out": "w_down"}


def make_adapter(path, model, module_names, r=4, alpha=8, rslora=False, zero_b=False, dtype=np.float32, seed=0,
                 **extra_cfg):
    """A PEFT-style adapter for `model` (HF names as in the checkpoint): returns {hf weight name: (A, B)}."""
    from dllm_jax.hf_weights import read_header

    header = read_header(str(model.path) + "/model.safetensors")
    rng = np.random.default_rng(seed)
    tensors, pairs = {}, {}
    for name, info in header.items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module is None or not any(module.endswith("." + m) for m in module_names):
            continue
        out_f, in_f = info.shape
        a = rng.normal(0, 0.3, (r, in_f)).astype(dtype)
        b = np.zeros((out_f, r), dtype) if zero_b else rng.normal(0, 0.3, (out_f, r)).astype(dtype)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
        pairs[name] = (a.astype(np.float32), b.astype(np.float32))
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora, "bias": "none",
           "target_modules": sorted(module_names), "task_type": "CAUSAL_LM", **extra_cfg}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return pairs


def _leaf(params, name):
    return np.asarray(params["layers"][name], np.float32)


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_weights_equal_the_lora_forward(llada_model, tmp_path, rslora):
    """For every adapted linear layer, x @ W_merged == x @ W_base + scale * (x @ A^T) @ B^T (PEFT's unmerged forward,
    computed from the adapter's own A and B), and every other leaf is untouched."""
    pairs = make_adapter(tmp_path / "ad", llada_model, list(LLADA_TARGETS), r=4, alpha=8, rslora=rslora)
    merged = dllm_jax.load(str(llada_model.path), lora=str(tmp_path / "ad"))
    scale = 8 / (math.sqrt(4) if rslora else 4)
    x = np.random.default_rng(1).normal(size=(3, 128)).astype(np.float32)
    seen = set()
    for name, (a, b) in pairs.items():
        if name == "model.transformer.ff_out.weight":  # LLaDA's LM head is also named ff_out: PEFT adapts it too
            leaf = "lm_head"
            w_base, w_new = (np.asarray(m.params["lm_head"], np.float32) for m in (llada_model, merged))
        else:
            li = int(name.split(".")[3])
            leaf = LLADA_TARGETS[name.split(".")[4]]
            w_base, w_new = _leaf(llada_model.params, leaf)[li], _leaf(merged.params, leaf)[li]
        seen.add(leaf)
        xi = x[:, : w_base.shape[0]]
        np.testing.assert_allclose(xi @ w_new, xi @ w_base + scale * (xi @ a.T) @ b.T, rtol=1e-5, atol=1e-5)
        assert np.abs(w_new - w_base).max() > 1e-3
    assert seen == set(LLADA_TARGETS.values()) | {"lm_head"}
    for leaf in ("wk", "w_gate", "w_up", "attn_norm"):
        np.testing.assert_array_equal(_leaf(merged.params, leaf), _leaf(llada_model.params, leaf))
    for top in ("embed", "final_norm"):
        np.testing.assert_array_equal(np.asarray(merged.params[top]), np.asarray(llada_model.params[top]))


def test_zero_b_adapter_changes_nothing_and_logits_move_otherwise(dream_model, tmp_path):
    """PEFT initialises B = 0: such an adapter merges to the base model exactly. A trained one changes the logits
    (Dream: q/k/v with biases, o_proj, MLP)."""
    ids = jnp.asarray([[11, 23, 5, 77, 100, 3, 42, 9]])
    mods = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    make_adapter(tmp_path / "zero", dream_model, mods, zero_b=True)
    make_adapter(tmp_path / "trained", dream_model, mods, dtype=np.float16)
    base = np.asarray(dream_model.logits(ids))
    np.testing.assert_array_equal(np.asarray(dllm_jax.load(str(dream_model.path), lora=str(tmp_path / "zero"))
                                             .logits(ids)), base)
    moved = np.asarray(dllm_jax.load(str(dream_model.path), lora=str(tmp_path / "trained")).logits(ids))
    assert np.abs(moved - base).max() > 1e-2


def test_convert_with_lora_and_int8(llada_model, tmp_path):
    """`dllm-jax convert --lora` writes the merged weights (and records the adapter); with --quantize int8 the merged
    weight is what gets quantized."""
    from convert.hf_to_flax import main as convert_main

    make_adapter(tmp_path / "ad", llada_model, list(LLADA_TARGETS))
    ref = dllm_jax.load(str(llada_model.path), lora=str(tmp_path / "ad"))
    assert convert_main([str(llada_model.path), str(tmp_path / "out"), "--lora", str(tmp_path / "ad"),
                         "--no-progress"]) == 0
    conv = dllm_jax.load(str(tmp_path / "out"))
    for a, b in zip(jax.tree.leaves(conv.params), jax.tree.leaves(ref.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    meta = json.loads((tmp_path / "out" / "dllm_jax_config.json").read_text())
    assert meta["source"]["lora"]["r"] == 4 and meta["source"]["lora"]["merged_weights"] == 4 * 2 + 1  # + LM head
    q = dllm_jax.load(str(llada_model.path), lora=str(tmp_path / "ad"), quantize="int8")
    wq = q.params["layers"]["wq"]
    deq = np.asarray(wq.q, np.float32) * np.asarray(wq.scale)
    np.testing.assert_allclose(deq, _leaf(ref.params, "wq"), atol=float(np.abs(_leaf(ref.params, "wq")).max()) / 100)


@pytest.mark.parametrize("edit,msg", [
    (lambda p: (p / "adapter_config.json").unlink(), "no adapter_config.json"),
    (lambda p: (p / "adapter_model.safetensors").rename(p / "adapter_model.bin"), "re-save the adapter"),
    (lambda p: _cfg(p, use_dora=True), "DoRA"),
    (lambda p: _cfg(p, bias="lora_only"), "trained biases"),
    (lambda p: _cfg(p, modules_to_save=["lm_head"]), "modules_to_save"),
    (lambda p: _cfg(p, r=0), "r must be a positive integer"),
    (lambda p: _cfg(p, r=3), "rank r=3"),
    (lambda p: _cfg(p, peft_type="IA3"), "only LORA"),
    (lambda p: (p / "adapter_config.json").write_text("{not json"), "not valid JSON"),
    (lambda p: _drop(p, "lora_B"), "needs both lora_A and lora_B"),
    (lambda p: _rename(p, "q_proj", "qkv_proj"), "not in the checkpoint"),
])
def test_bad_adapters_are_clear_errors(llada_model, tmp_path, edit, msg):
    from convert.hf_to_flax import main as convert_main

    make_adapter(tmp_path / "ad", llada_model, ["q_proj"])
    edit(tmp_path / "ad")
    with pytest.raises(AdapterError, match=msg):
        dllm_jax.load(str(llada_model.path), lora=str(tmp_path / "ad"))
    assert convert_main([str(llada_model.path), str(tmp_path / "out"), "--lora", str(tmp_path / "ad"),
                         "--no-progress"]) == 2
    assert not (tmp_path / "out").exists()


def test_adapter_shape_mismatch_and_converted_checkpoints(llada_model, dream_model, tmp_path, capsys):
    make_adapter(tmp_path / "dream_ad", dream_model, ["q_proj"])
    with pytest.raises(AdapterError, match="not in the checkpoint"):  # Dream names on a LLaDA checkpoint
        dllm_jax.load(str(llada_model.path), lora=str(tmp_path / "dream_ad"))
    from safetensors.numpy import load_file

    make_adapter(tmp_path / "ad", llada_model, ["q_proj"])
    t = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    key = next(k for k in t if k.endswith("lora_A.weight"))
    t[key] = np.zeros((4, 48), np.float32)  # in_features 48 instead of 64
    save_file(t, str(tmp_path / "ad" / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="delta B @ A"):
        dllm_jax.load(str(llada_model.path), lora=str(tmp_path / "ad"))
    with pytest.raises(AdapterError, match="not a directory"):
        read_adapter(str(tmp_path / "missing"))
    from convert.hf_to_flax import main as convert_main

    assert convert_main([str(llada_model.path), str(tmp_path / "conv"), "--no-progress"]) == 0
    with pytest.raises(ValueError, match="merge a LoRA adapter while converting"):
        dllm_jax.load(str(tmp_path / "conv"), lora=str(tmp_path / "dream_ad"))


def _cfg(path, **kw):
    c = json.loads((path / "adapter_config.json").read_text())
    c.update(kw)
    (path / "adapter_config.json").write_text(json.dumps(c))


def _drop(path, part):
    from safetensors.numpy import load_file

    t = load_file(str(path / "adapter_model.safetensors"))
    save_file({k: v for k, v in t.items() if part not in k}, str(path / "adapter_model.safetensors"))


def _rename(path, old, new):
    from safetensors.numpy import load_file

    t = load_file(str(path / "adapter_model.safetensors"))
    save_file({k.replace(old, new): v for k, v in t.items()}, str(path / "adapter_model.safetensors"))
