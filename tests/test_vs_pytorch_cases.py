"""benchmarks/vs_pytorch.py's Dream and Fast-dLLM v2 cases: each official call is mapped by the conformance tool to
the preset that reproduces it (the benchmark's own side uses the same mapping), with its arguments intact. The timed
comparison itself needs torch and the official checkouts (docs/benchmarks/vs_pytorch.md)."""

import dataclasses
import importlib.util
import os
import sys

import pytest

import dllm_jax
from dllm_jax.conformance import map_case
from dllm_jax.conformance_block import plan_block_case
from dllm_jax.presets import make_schedule

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


def _bench_module(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (dataclasses resolve their annotations through sys.modules)
    spec.loader.exec_module(mod)
    return mod


EXPECTED = {
    "dream_maskgit_g128": ("dream", dict(steps=128, alg="maskgit_plus")),
    "dream_entropy_g128_s64": ("dream", dict(steps=64, alg="entropy")),
    "fastdllm_dream_threshold_g128": ("fastdllm_dream_threshold", dict(steps=128, threshold=0.9)),
    "fastdllm_dream_prefix_g128": ("fastdllm_dream_prefix", dict(block_length=32, threshold=0.9)),
    "fastdllm_dream_dual_g128": ("fastdllm_dream_dual", dict(block_length=32, threshold=0.9)),
    "v2_generate_g128": ("fastdllm_v2", dict(use_block_cache=False, small_block_size=8)),
    "v2_generate_blockcache_g128": ("fastdllm_v2", dict(use_block_cache=True, small_block_size=8)),
    "v2_batch_sample_g128_b4": ("fastdllm_v2_batch", dict(use_block_cache=False)),
}


def test_every_qwen_case_maps_to_its_preset(fixtures):
    q = _bench_module("vs_pytorch_qwen")
    cases = q.qwen_cases(128)
    assert sorted(c.name for c in cases) == sorted(EXPECTED)
    models = {"dream": dllm_jax.load(str(fixtures / "dream_tiny")),
              "fastdllm_v2": dllm_jax.load(str(fixtures / "fastdllm_v2_tiny"))}
    for case in cases:
        model = models[case.family]
        cfg = model.cfg
        # the benchmark model's special ids, moved to the tiny checkpoint's
        args = {k: (cfg.mask_token_id if k == "mask_id" else cfg.eos_token_id if k == "stop_token" else v)
                for k, v in case.args.items()}
        case = dataclasses.replace(case, args=args)
        lens = case.prompt_lens or (40,) * case.batch
        rows = [[(7 * i + j) % 250 for j in range(n)] for i, n in enumerate(lens)]
        gc = q.golden_case(case, rows)
        want, want_kw = EXPECTED[case.name]
        if case.family == "dream":
            name, kw, gen_kw = map_case(gc, cfg)
            assert name == want, case.name
            assert gen_kw == {}
            assert kw.pop("gen_length") == 128
            for k, v in want_kw.items():
                assert kw[k] == v, (case.name, k)
            make_schedule(name, 128, cfg, **kw)
        else:
            name, m, sched, prompt_rows, layout = plan_block_case(model, gc)
            assert name == want, case.name
            assert prompt_rows == rows
            assert layout == ("right_masked" if want == "fastdllm_v2_batch" else "left")
            assert sched.gen_length == 128
            again = make_schedule(name, 128, cfg, **{k: v for k, v in want_kw.items()}, stop_token=cfg.eos_token_id,
                                  **({"pad_token_id": q.PAD_ID} if want == "fastdllm_v2_batch" else {}))
            assert sched == again, case.name


def test_every_case_is_offered_by_the_script():
    vs = _bench_module("vs_pytorch")
    q = _bench_module("vs_pytorch_qwen")
    names = set(vs.all_cases())
    assert {c.name for c in q.qwen_cases(128)} <= names
    assert {"llada_g128_b1", "fastdllm_dual_g128", "fastdllm_prefix_g128"} <= names
    with pytest.raises(SystemExit, match="unknown case"):
        vs.main(["--cases", "dream_nope"])


@pytest.mark.parametrize("argv, needs", [
    (["--cases", "dream_maskgit_g128"], "--fastdllm-repo"),
    (["--cases", "v2_generate_g128", "--fastdllm-repo", "x"], "--fastdllm-v2-model"),
    (["--cases", "llada_g128_b1", "--fastdllm-repo", "x"], "--llada-repo"),
])
def test_missing_checkout_is_named_before_anything_loads(argv, needs):
    vs = _bench_module("vs_pytorch")
    with pytest.raises(SystemExit, match=needs):
        vs.main(argv)


def test_both_sides_are_pinned_to_the_same_cores():
    """--threads N pins the process to N cores before torch or XLA start (XLA:CPU sizes its pool by the affinity), so
    the official side's N torch threads and ours share the same cores; a count beyond the visible cores is refused."""
    vs = _bench_module("vs_pytorch")
    before = os.sched_getaffinity(0)
    try:
        cores = vs.pin_cores(1)
        assert cores == [min(before)]
        assert os.sched_getaffinity(0) == {min(before)}
        with pytest.raises(SystemExit, match="--threads 2: expected 1 to 1"):
            vs.pin_cores(2)
    finally:
        os.sched_setaffinity(0, before)
    with pytest.raises(SystemExit, match="--threads 0"):
        vs.pin_cores(0)


def test_pack_official_copies_what_the_benchmark_imports_or_names_what_is_missing(tmp_path):
    """benchmarks/pack_official.sh: the official files vs_pytorch.py imports, packed into one folder for the device
    call; a missing file is named and nothing is left behind."""
    import subprocess

    files = ["LLaDA/generate.py", "Fast-dLLM/llada/generate.py", "Fast-dLLM/llada/model/modeling_llada.py",
             "Fast-dLLM/dream/model/generation_utils_block.py", "Fast-dLLM/dream/model/modeling_dream.py",
             "v2model/modeling.py", "v2model/configuration.py", "v2repo/v2/generation_functions.py"]
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text(f"# {f}\n")
    script = os.path.join(BENCH, "pack_official.sh")
    args = [str(tmp_path / d) for d in ("LLaDA", "Fast-dLLM", "v2model", "v2repo")]
    dest = tmp_path / "packed"
    r = subprocess.run(["bash", script, *args, str(dest)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*.py"))
    assert got == ["Fast-dLLM-v2/v2/generation_functions.py", "Fast-dLLM/dream/model/generation_utils_block.py",
                   "Fast-dLLM/dream/model/modeling_dream.py", "Fast-dLLM/llada/generate.py",
                   "Fast-dLLM/llada/model/modeling_llada.py", "Fast_dLLM_v2_7B/configuration.py",
                   "Fast_dLLM_v2_7B/modeling.py", "LLaDA/generate.py"]
    (tmp_path / "v2model/configuration.py").unlink()
    dest2 = tmp_path / "packed2"
    r = subprocess.run(["bash", script, *args, str(dest2)], capture_output=True, text=True)
    assert r.returncode == 2 and "configuration.py not found" in r.stderr
    assert not dest2.exists() and not list(tmp_path.glob("packed2*"))
