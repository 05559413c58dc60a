"""Side by side: the official PyTorch LLaDA / Fast-dLLM generate functions against our presets, same checkpoint.

    pip install torch==2.13.0 einops        # benchmark only: torch is NOT a dependency of dllm-jax
    python benchmarks/vs_pytorch.py --llada-repo PATH/LLaDA --fastdllm-repo PATH/Fast-dLLM \
        [--fastdllm-v2-model PATH/Fast_dLLM_v2_7B] [--cases llada_g128_b1,fastdllm_dual_g128,dream_maskgit_g128] \
        [--repeats 2] [--out docs/benchmarks/vs_pytorch.md]

The official code is imported at run time from the two checkouts (ML-GSAI/LLaDA `generate.py`; NVlabs/Fast-dLLM
`llada/generate.py` and its model `llada/model/modeling_llada.py`, which both functions run, as in the golden data);
nothing of it is copied here. The Dream and Fast-dLLM v2 cases (`dream_*`, `fastdllm_dream_*`, `v2_*`) live in
vs_pytorch_qwen.py (their official code, model and mapping); this script runs every case with the same protocol. The model is built from the official class directly (no `from_pretrained`, so any
transformers version works), given seeded random weights drawn the way the golden checkpoints were (embeddings
N(0,1); linear N(0,1)/sqrt(fan_in), q/k x3, v/out x2; norms 1 + 0.1 N(0,1); LM head N(0,1)/sqrt(d) x6 with the mask
row 0, so softmaxes are peaked and threshold decoding commits several tokens per forward), and saved as an HF
safetensors dir that `dllm_jax.load` reads: both sides run the same float32 weights.

Protocol per case: one untimed run of each side (ours: compile + run) whose tokens and NFE are compared; then
`--repeats` timed runs, alternating official / ours so both see the same machine load; min and median reported.
The process is pinned to `--threads` cores (default 2) before torch or XLA start: torch runs that many threads and
XLA:CPU sizes its pool by the affinity, so both sides compute on the same cores. TORCHDYNAMO_DISABLE=1 (Fast-dLLM wraps
SDPA in torch.compile; disabled, the eager kernel runs, same maths). `--device gpu` runs both sides on the first GPU
in float32 at full precision (TF32 off in torch, jax_default_matmul_precision='highest'), torch synchronised before
its timer stops. Our time is the compiled program's wall time
(`GenerateOutput.run_time_s`, device->host copy included, compile excluded). Counting rule: NFE = model forwards
(official: calls of the model, counted by a forward pre-hook, equal to the returned nfe where one is returned;
ours: `GenerateOutput.nfe`, forwards per row, batched forwards counted once per row).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
# On a machine loaded past its core count, OpenMP's default busy-waiting makes 2-thread torch 3-5x slower than
# 1-thread torch (measured here at load ~10 on 2 cores: one d512 forward 1.8-3.0 s vs 0.38-0.56 s); passive waiting
# removes most of that. Set before torch is imported; pass OMP_WAIT_POLICY=ACTIVE to measure the default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vs_pytorch_qwen  # noqa: E402 (Dream / Fast-dLLM v2 cases, CallCounter, TORCH_DEVICE; torch lazily)

# The benchmark's model (the issue's shape): LLaDA-8B architecture at d_model 512.
MODEL_SHAPE = dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, mlp_hidden_size=1376, vocab_size=32000)
MASK_ID, EOS_ID = 31999, 31998


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    label: str
    fn: str          # "llada.generate" | "fastdllm.generate" | "fastdllm.generate_with_prefix_cache" | ..._dual_cache
    preset: str
    gen: int
    batch: int
    kw: dict


def _cases():
    out = []
    for g, b in ((128, 1), (256, 1), (128, 4)):
        out.append(Case(f"llada_g{g}_b{b}", f"LLaDA generate, one token per step ({g}, {b})", "llada.generate",
                        "llada", g, b, dict(steps=g, block_length=32)))
    for g in (128, 256):
        for fn, preset, lab in (("generate_with_dual_cache", "fastdllm_dual", "dual cache"),
                                ("generate_with_prefix_cache", "fastdllm_prefix", "prefix cache"),
                                ("generate", "fastdllm", "no cache")):
            out.append(Case(f"{preset}_g{g}", f"Fast-dLLM {lab}, threshold 0.9 ({g}, 1)", f"fastdllm.{fn}", preset,
                            g, 1, dict(steps=g, block_length=32, threshold=0.9)))
    return out


CASES = {c.name: c for c in _cases()}


# ----------------------------------------------------------------------------------------------- official side
def import_official(llada_repo: str, fastdllm_repo: str):
    """(LLaDA generate module, Fast-dLLM generate module, LLaDAModelLM, LLaDAConfig), imported from the checkouts."""
    fl = os.path.join(fastdllm_repo, "llada")
    for p, what in ((os.path.join(llada_repo, "generate.py"), "--llada-repo"),
                    (os.path.join(fl, "generate.py"), "--fastdllm-repo"),
                    (os.path.join(fl, "model", "modeling_llada.py"), "--fastdllm-repo")):
        if not os.path.isfile(p):
            raise SystemExit(f"{what}: {p} not found (expected a checkout of "
                             f"{'ML-GSAI/LLaDA' if what == '--llada-repo' else 'NVlabs/Fast-dLLM'})")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise SystemExit("this benchmark needs torch (benchmark only): pip install torch==2.13.0 einops") from None
    if fl not in sys.path:
        sys.path.insert(0, fl)  # Fast-dLLM's generate.py imports `model.modeling_llada`

    def load(name, path):
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    llada_gen = load("official_llada_generate", os.path.join(llada_repo, "generate.py"))
    fast_gen = load("official_fastdllm_generate", os.path.join(fl, "generate.py"))
    from model.configuration_llada import LLaDAConfig
    from model.modeling_llada import LLaDAModelLM
    return llada_gen, fast_gen, LLaDAModelLM, LLaDAConfig


def hf_config(max_seq=4096) -> dict:
    s = MODEL_SHAPE
    return {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": s["d_model"],
        "embedding_dropout": 0.0, "embedding_size": s["vocab_size"], "eos_token_id": EOS_ID,
        "flash_attention": False, "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None,
        "init_device": "cpu", "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False,
        "layer_norm_type": "rms", "layer_norm_with_affine": True, "mask_token_id": MASK_ID,
        "max_sequence_length": max_seq, "mlp_hidden_size": s["mlp_hidden_size"], "mlp_ratio": 4,
        "model_type": "llada", "multi_query_attention": None, "n_heads": s["n_heads"],
        "n_kv_heads": s["n_kv_heads"], "n_layers": s["n_layers"], "pad_token_id": EOS_ID, "precision": "amp_bf16",
        "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
        "rope_theta": 500000.0, "scale_logits": False, "torch_dtype": "float32", "use_cache": False,
        "vocab_size": s["vocab_size"], "weight_tying": False,
    }


def build_official_model(LLaDAModelLM, LLaDAConfig, ckpt_dir: str, seed: int, qk_scale: float = 3.0):
    """The official model with golden-style random weights; writes ckpt_dir (config.json + model.safetensors) once
    and loads those weights back (so both sides run exactly the saved tensors)."""
    import torch
    from safetensors.torch import load_file, save_file

    cfg_dict = hf_config()
    config = LLaDAConfig(**cfg_dict)
    try:
        config.use_cache
    except AttributeError:  # transformers 5 drops it from the config; the model reads it when use_cache is None
        config.use_cache = False
    model = LLaDAModelLM(config, init_params=False).eval()
    st = os.path.join(ckpt_dir, "model.safetensors")
    meta = os.path.join(ckpt_dir, "vs_pytorch_seed.json")
    fresh = not (os.path.isfile(st) and os.path.isfile(meta) and json.load(open(meta)) == {"seed": seed, "shape": MODEL_SHAPE, "qk_scale": qk_scale})
    if fresh:
        g = torch.Generator().manual_seed(seed)
        sd = {}
        d = MODEL_SHAPE["d_model"]
        for name, p in sorted(model.state_dict().items()):
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("wte.weight"):
                w = r
            elif name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                w = 1.0 + 0.1 * r
            elif name == "model.transformer.ff_out.weight":  # LM head
                w = r / d ** 0.5 * 6.0
                w[MASK_ID] = 0.0
            else:
                w = r / p.shape[1] ** 0.5
                if name.endswith(("q_proj.weight", "k_proj.weight")):
                    w = w * qk_scale
                elif name.endswith(("v_proj.weight", "attn_out.weight")):
                    w = w * 2.0
            sd[name] = w.contiguous()
        os.makedirs(ckpt_dir, exist_ok=True)
        tmp = st + ".tmp"
        save_file(sd, tmp, metadata={"format": "pt"})
        with open(os.path.join(ckpt_dir, "config.json"), "w") as f:
            json.dump(cfg_dict, f, indent=2)
        os.replace(tmp, st)
        with open(meta, "w") as f:
            json.dump({"seed": seed, "shape": MODEL_SHAPE, "qk_scale": qk_scale}, f)
    model.load_state_dict(load_file(st), strict=True)
    return model.to(vs_pytorch_qwen.TORCH_DEVICE)


def run_official(case: Case, mods, model, counter, prompt_np):
    import torch

    llada_gen, fast_gen = mods
    prompt = torch.from_numpy(prompt_np.astype(np.int64)).to(vs_pytorch_qwen.TORCH_DEVICE)
    counter.n = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        if case.fn == "llada.generate":
            x = llada_gen.generate(model, prompt, steps=case.kw["steps"], gen_length=case.gen,
                                   block_length=case.kw["block_length"], temperature=0.0,
                                   remasking="low_confidence", mask_id=MASK_ID)
            nfe_ret = None
        else:
            fn = getattr(fast_gen, case.fn.split(".", 1)[1])
            x, nfe_ret = fn(model, prompt, steps=case.kw["steps"], gen_length=case.gen,
                            block_length=case.kw["block_length"], temperature=0.0, remasking="low_confidence",
                            mask_id=MASK_ID, threshold=case.kw["threshold"])
        vs_pytorch_qwen.torch_sync()
    dt = time.perf_counter() - t0
    if nfe_ret is not None and int(nfe_ret) != counter.n:
        raise RuntimeError(f"{case.name}: official nfe {nfe_ret} != counted forwards {counter.n}")
    return x.cpu().numpy(), counter.n, dt


# ----------------------------------------------------------------------------------------------------- our side
OURS_REFERENCE_WORK = False  # --reference-work


def run_ours(case: Case, model, prompt_np, reference_work=None):
    reference_work = OURS_REFERENCE_WORK if reference_work is None else reference_work
    from dllm_jax.generate import generate
    from dllm_jax.presets import make_schedule

    sched = make_schedule(case.preset, case.gen, model.cfg, **case.kw)
    if reference_work:  # the reference's work: LM head on every row, whole-generation prefix-cache windows
        sched = sched.replace(head_rows="all")
        if hasattr(sched.cache, "suffix_widths"):
            sched = sched.replace(cache=dataclasses.replace(sched.cache, suffix_widths=1))
    out = generate(model, prompt_np, gen_length=case.gen, schedule=sched, bucket=False)
    nfe = sorted(set(int(v) for v in out.nfe))
    return np.asarray(out.sequences), (nfe[0] if len(nfe) == 1 else nfe), out.run_time_s, out.compile_time_s


def compare_tokens(a, b, prompt_len):
    """'yes' or a description of where the generated tokens differ."""
    if a.shape != b.shape:
        return f"no: shapes {a.shape} vs {b.shape}"
    diff = a[:, prompt_len:] != b[:, prompt_len:]
    if not diff.any():
        return "yes"
    rows = np.nonzero(diff.any(1))[0]
    first = int(np.nonzero(diff[rows[0]])[0][0])
    return (f"no: {int(diff.sum())} positions in {len(rows)} row(s), first at generated position {first} "
            f"(row {int(rows[0])})")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, {platform.system()} {platform.release()}"


def pin_cores(n: int) -> list[int]:
    """Pin this process to the first n cores it may run on, before torch's or XLA's thread pools start: torch gets
    n threads and XLA:CPU sizes its pool by the affinity, so both sides compute on the same n cores (without it, XLA
    uses every core while torch uses n threads). Returns the cores."""
    visible = sorted(os.sched_getaffinity(0))
    if not 1 <= n <= len(visible):
        raise SystemExit(f"--threads {n}: expected 1 to {len(visible)}, the cores this process may run on "
                         f"({visible})")
    os.sched_setaffinity(0, visible[:n])
    return visible[:n]


def use_gpu(torch):
    """Both sides on the first GPU, float32 at full precision (TF32 would make tokens differ by round-off)."""
    import jax

    if not torch.cuda.is_available():
        raise SystemExit("--device gpu: torch sees no CUDA device (torch.cuda.is_available() is False)")
    if jax.default_backend() != "gpu":
        raise SystemExit(f"--device gpu: jax runs on {jax.default_backend()!r}, not a GPU (JAX_PLATFORMS="
                         f"{os.environ.get('JAX_PLATFORMS')!r}; a CUDA jaxlib plugin is needed)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    jax.config.update("jax_default_matmul_precision", "highest")
    vs_pytorch_qwen.TORCH_DEVICE = "cuda"


def load_avg() -> str:
    try:
        return "/".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "?"


def prompts_for(batch: int, plen: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, EOS_ID, size=(batch, plen)).astype(np.int32)


def _models_line(rows) -> str:
    fams = {r.get("family", "llada") for r in rows}
    out = []
    if "llada" in fams:
        s = MODEL_SHAPE
        out.append(f"random-weight LLaDA (d_model {s['d_model']}, {s['n_layers']} layers, {s['n_heads']} heads, "
                   f"MLP {s['mlp_hidden_size']}, vocab {s['vocab_size']})")
    for fam, what in (("dream", "Dream"), ("fastdllm_v2", "Fast-dLLM v2 (Qwen2.5)")):
        if fam in fams:
            q = vs_pytorch_qwen.QWEN_SHAPE
            out.append(f"random-weight {what} (hidden {q['hidden_size']}, {q['num_hidden_layers']} layers, "
                       f"{q['num_attention_heads']} heads / {q['num_key_value_heads']} KV heads, MLP "
                       f"{q['intermediate_size']}, vocab {q['vocab_size']}, q/k/v biases)")
    return "; ".join(out)


def write_table(path, rows, args, header_note):
    import jax
    import torch

    gpu = getattr(args, "device", "cpu") == "gpu"
    where = (f"GPU {torch.cuda.get_device_name(0)} (jax: {jax.devices()[0].device_kind}), float32 matmuls at full "
             f"precision on both sides (torch allow_tf32 off, jax_default_matmul_precision='highest')" if gpu
             else "CPU")
    lines = [
        "## Latest table written by benchmarks/vs_pytorch.py", "",
        f"Machine: {machine()}; shared with other jobs (load average 1/5/15 min after each case: last "
        f"column). Both sides pinned to the same {args.threads} core(s) {getattr(args, 'pinned', '?')}: torch "
        f"{torch.__version__} {where}, {args.threads} threads, TORCHDYNAMO_DISABLE="
        f"{os.environ.get('TORCHDYNAMO_DISABLE')}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
        f"jax {jax.__version__} {jax.default_backend()}, its CPU thread pool sized by that affinity (XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '')!r}).",
        f"Model: {_models_line(rows)}; weight seed {args.weight_seed}, q/k scale {getattr(args, 'qk_scale', 3.0)}; "
        f"prompt {args.prompt_len} random ids (seed {args.prompt_seed}) unless the case says, float32, "
        f"block length 32, temperature 0. Timed: best (min) and median of n runs per side (n in the torch column), "
        "official and ours alternated; compile and the untimed check run excluded.",
        "Counting rule: NFE = model forwards per row (official: counted calls of the model; ours: "
        "GenerateOutput.nfe). Ratio = official min / ours min (median ratio in brackets). A ratio is like for "
        "like only where tokens and NFE are identical.", "",
    ]
    if header_note:
        lines += [header_note, ""]
    cw = any(r.get("t_ours_reference_work") for r in rows)
    if cw:
        lines += ["Column 'ours, reference work': our engine doing the work the reference does (LM head and softmax on "
                  "every position, one whole-generation prefix-cache window), timed in the same alternation; "
                  "'saved' = its min / ours min.", ""]
    lines += ["| case (gen length, batch) | same tokens | NFE torch/ours | torch s (min / median) | "
              "ours s (min / median) | ratio | " + ("ours, reference work s (min) | saved | " if cw else "")
              + "load at the case |",
              "|---|---|---|---|---|---|" + ("---|---|" if cw else "") + "---|"]
    for r in rows:
        if r.get("t_official"):
            to, tu = r["t_official"], r["t_ours"]
            ratio = f"{min(to) / min(tu):.2f}x ({statistics.median(to) / statistics.median(tu):.2f}x)"
            ts = f"{min(to):.2f} / {statistics.median(to):.2f} (n={len(to)})"
            us = f"{min(tu):.2f} / {statistics.median(tu):.2f}"
        else:
            ratio, ts, us = "not timed", "-", "-"
        extra = ""
        if cw:
            tr = r.get("t_ours_reference_work")
            extra = (f"{min(tr):.2f}{'' if r.get('reference_work_same') else ' (tokens differ!)'} | "
                     f"{min(tr) / min(r['t_ours']):.2f}x | ") if tr else "- | - | "
        lines.append(f"| {r['label']} | {r['same']} | {r['nfe_official']}/{r['nfe_ours']} | {ts} | {us} | {ratio} "
                     f"| {extra}{r['load']} |")
    lines.append("")
    text = "\n".join(lines)
    full = f"{TABLE_START}\n{text}{TABLE_END}\n\n"
    old = open(path).read() if os.path.isfile(path) else ""
    if TABLE_START in old and TABLE_END in old:  # keep the hand-written analysis around the generated table
        head, rest = old.split(TABLE_START, 1)
        full = head + full + rest.split(TABLE_END, 1)[1].lstrip("\n")
    with open(path + ".tmp", "w") as f:
        f.write(full)
    os.replace(path + ".tmp", path)
    return text


TABLE_START, TABLE_END = "<!-- vs_pytorch.py table: start -->", "<!-- vs_pytorch.py table: end -->"


class _Sides:
    """The official and our runner of each family, built on first use (a family's checkpoint and code are only
    loaded when one of its cases is selected)."""

    def __init__(self, a):
        self.a, self.built = a, {}

    def get(self, family):
        if family not in self.built:
            self.built[family] = getattr(self, "_" + family)()
        return self.built[family]

    @staticmethod
    def check_flags(a, family):
        """The checkouts a family's cases need were given (before torch or any model is loaded)."""
        if family == "llada" and not (a.llada_repo and a.fastdllm_repo):
            raise SystemExit("the LLaDA cases need --llada-repo and --fastdllm-repo")
        if family == "dream" and not a.fastdllm_repo:
            raise SystemExit("the Dream cases need --fastdllm-repo (NVlabs/Fast-dLLM, its dream/model/)")
        if family == "fastdllm_v2":
            if not a.fastdllm_v2_model:
                raise SystemExit("the Fast-dLLM v2 cases need --fastdllm-v2-model (modeling.py + configuration.py "
                                 "of the hub repository Efficient-Large-Model/Fast_dLLM_v2_7B)")
            if not (a.fastdllm_v2_repo or a.fastdllm_repo):
                raise SystemExit("the Fast-dLLM v2 cases need --fastdllm-v2-repo or --fastdllm-repo "
                                 "(v2/generation_functions.py)")

    def _llada(self):
        a = self.a
        llada_gen, fast_gen, LLaDAModelLM, LLaDAConfig = import_official(a.llada_repo, a.fastdllm_repo)
        tmodel = build_official_model(LLaDAModelLM, LLaDAConfig, a.checkpoint, a.weight_seed, a.qk_scale)
        counter = vs_pytorch_qwen.CallCounter(tmodel)
        import dllm_jax

        jmodel = dllm_jax.load(a.checkpoint)
        return dict(
            prompt=lambda c, seed: prompts_for(c.batch, a.prompt_len, seed),
            official=lambda c, p: run_official(c, (llada_gen, fast_gen), tmodel, counter, p),
            ours=lambda c, p, ref=None: run_ours(c, jmodel, p, reference_work=ref),
            same=lambda x, y, p: compare_tokens(x, y, a.prompt_len))

    def _qwen(self, family):
        q, a = vs_pytorch_qwen, self.a
        if family == "dream":
            mods = q.import_dream(a.fastdllm_repo)
        else:
            mods = q.import_fastdllm_v2(a.fastdllm_v2_model, a.fastdllm_v2_repo or a.fastdllm_repo)
        ckpt = os.path.join(os.path.dirname(os.path.abspath(a.checkpoint)), f"vs_pytorch_{family}_d512")
        tmodel = q.build_official(family, mods, ckpt, a.weight_seed, a.qk_scale)
        off = q.OfficialQwen(family, mods, tmodel)
        import dllm_jax

        jmodel = dllm_jax.load(ckpt)
        return dict(
            prompt=lambda c, seed: q.prompts_for(c, a.prompt_len, seed),
            official=off.run,
            ours=lambda c, p, ref=None: q.run_ours(c, jmodel, p, reference_work=bool(
                OURS_REFERENCE_WORK if ref is None else ref)),
            same=lambda x, y, p: q.compare_rows(x, y, [len(r) for r in p]))

    def _dream(self):
        return self._qwen("dream")

    def _fastdllm_v2(self):
        return self._qwen("fastdllm_v2")


def all_cases():
    out = {n: (c, "llada") for n, c in CASES.items()}
    out.update({c.name: (c, c.family) for g in (128,) for c in vs_pytorch_qwen.qwen_cases(g)})
    return out


def main(argv=None):
    cases = all_cases()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llada-repo", help="checkout of github.com/ML-GSAI/LLaDA (the llada_* cases)")
    ap.add_argument("--fastdllm-repo", help="checkout of github.com/NVlabs/Fast-dLLM (fastdllm_* and dream cases)")
    ap.add_argument("--fastdllm-v2-model", help="folder with the hub model code of Efficient-Large-Model/"
                                                "Fast_dLLM_v2_7B (modeling.py, configuration.py; no weights needed)")
    ap.add_argument("--fastdllm-v2-repo", help="checkout of NVlabs/Fast-dLLM holding v2/generation_functions.py "
                                               "(default: --fastdllm-repo)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of: {', '.join(cases)} "
                                                             "(default: the LLaDA ones)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side (best and median reported)")
    ap.add_argument("--threads", type=int, default=2,
                    help="CPU cores for each side: the process is pinned to this many cores before torch or XLA "
                         "starts, torch runs this many threads, XLA's pool follows the affinity")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                    help="where both sides run: cpu, or gpu (torch on cuda:0, jax on its first GPU; float32 at full "
                         "precision on both: TF32 off in torch, jax_default_matmul_precision='highest')")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--weight-seed", type=int, default=1234)
    ap.add_argument("--prompt-seed", type=int, default=1001)
    ap.add_argument("--qk-scale", type=float, default=3.0,
                    help="q/k projection scale of the random weights (golden style 3: sharp attention, float32 "
                         "forwards ~5e-4 relative from float64; smaller is better conditioned)")
    ap.add_argument("--checkpoint", default=os.path.join(os.path.expanduser("~"), ".cache", "dllm_jax",
                                                         "vs_pytorch_llada_d512"),
                    help="where the random LLaDA checkpoint is written (reused when the seed matches); the Dream "
                         "and v2 checkpoints go beside it")
    ap.add_argument("--retry-seeds", type=int, default=0,
                    help="when tokens or NFE differ (a float32 near-tie of a decision), try up to N further prompt "
                         "seeds and time the first that matches (the table says which seeds differed)")
    ap.add_argument("--time-differing", action="store_true",
                    help="also time cases whose tokens or NFE differ (not like for like)")
    ap.add_argument("--reference-work", action="store_true",
                    help="run ours with head_rows='all' and one whole-generation prefix-cache width (the work the "
                         "reference does; to measure what computing only what is read saves)")
    ap.add_argument("--compare-work", action="store_true",
                    help="also time ours doing the reference's work (as --reference-work), alternated with the "
                         "other two, and report what computing only what is read saves")
    ap.add_argument("--note", default="", help="a line written above the table")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs",
                                                  "benchmarks", "vs_pytorch.md"))
    ap.add_argument("--json", default=None, help="also write the raw rows here")
    a = ap.parse_args(argv)
    global OURS_REFERENCE_WORK
    OURS_REFERENCE_WORK = a.reference_work
    names = [n.strip() for n in a.cases.split(",") if n.strip()]
    bad = [n for n in names if n not in cases]
    if bad:
        raise SystemExit(f"unknown case(s) {bad}; available: {', '.join(cases)}")
    if a.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    for fam in sorted({cases[n][1] for n in names}):
        _Sides.check_flags(a, fam)
    a.pinned = pin_cores(a.threads)  # before torch's and XLA's thread pools exist
    os.environ.setdefault("JAX_PLATFORMS", "cpu" if a.device == "cpu" else "cuda")
    try:
        import torch
    except ImportError:
        raise SystemExit("this benchmark needs torch (benchmark only): pip install torch==2.13.0 einops") from None

    torch.set_num_threads(a.threads)
    if a.device == "gpu":
        use_gpu(torch)
    sides = _Sides(a)
    for n in names:  # import every selected family's code (and fail on a missing path) before anything runs
        sides.get(cases[n][1])
    rows = []
    for name in names:
        c, family = cases[name]
        side = sides.get(family)
        differing_seeds = []
        for seed in range(a.prompt_seed, a.prompt_seed + 1 + a.retry_seeds):
            prompt = side["prompt"](c, seed)
            xo, nfe_o, t_o0 = side["official"](c, prompt)
            xu, nfe_u, t_u0, comp = side["ours"](c, prompt)
            same = side["same"](xo, xu, prompt)
            like = same == "yes" and nfe_o == nfe_u
            print(f"[{c.name}] prompt seed {seed}: same tokens: {same}; NFE {nfe_o}/{nfe_u}; first run "
                  f"{t_o0:.2f}s / {t_u0:.2f}s (+{comp:.1f}s compile); load {load_avg()}", flush=True)
            if like:
                break
            differing_seeds.append(seed)
        if differing_seeds and like:  # a float32 near-tie at the other seeds (vs_pytorch_divergence.py tells)
            same = f"yes at prompt seed {seed} (differs at {', '.join(map(str, differing_seeds))})"
        row = dict(name=c.name, label=c.label, family=family, same=same, nfe_official=nfe_o, nfe_ours=nfe_u,
                   prompt_seed=seed, compile_s=comp, first_official_s=t_o0, first_ours_s=t_u0)
        if like or a.time_differing:
            to, tu, tr = [], [], []
            if a.compare_work:
                xr, nfe_r = side["ours"](c, prompt, True)[:2]  # compile + check
                row["reference_work_same"] = bool(side["same"](xr, xu, prompt) == "yes" and nfe_r == nfe_u)
            for _ in range(a.repeats):
                to.append(side["official"](c, prompt)[2])
                tu.append(side["ours"](c, prompt)[2])
                if a.compare_work:
                    tr.append(side["ours"](c, prompt, True)[2])
            row.update(t_official=to, t_ours=tu)
            if tr:
                row["t_ours_reference_work"] = tr
                print(f"[{c.name}] ours doing the reference's work {['%.2f' % t for t in tr]} "
                      f"(same tokens: {row['reference_work_same']})", flush=True)
            print(f"[{c.name}] torch {['%.2f' % t for t in to]} ours {['%.2f' % t for t in tu]} -> "
                  f"{min(to) / min(tu):.2f}x", flush=True)
        row["load"] = load_avg()
        rows.append(row)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)
    print(write_table(a.out, rows, a, a.note))


if __name__ == "__main__":
    main()
