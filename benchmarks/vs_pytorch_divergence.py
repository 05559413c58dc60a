"""Why do official and our runs of a vs_pytorch case differ? Teacher-forced comparison, decision by decision.

    python benchmarks/vs_pytorch_divergence.py --llada-repo PATH/LLaDA --fastdllm-repo PATH/Fast-dLLM \
        --case fastdllm_prefix_g256 [--precision]

The official function runs as usual; every forward it makes is also fed, with the same input (and, for cached
forwards, a cache built by our full forward on the official refresh input), to our forward. Every decision the
official code takes (Fast-dLLM's `get_transfer_index`, patched at run time to record; LLaDA `generate`'s top-k rule,
re-evaluated from the logits) is re-taken on our logits and, where the two differ, on a float64 copy of the official
model (float64 weights, float64 RoPE tables and rotation, float64 cache from the same refresh input; see
exact_f64_copy). For each differing decision it prints the position, the gap between the two best logits (token
choice) and the confidence on the three logits (official fp32, ours fp32, fp64), to compare with the threshold
(threshold rule) or the runner-up candidate (top-k rule). The trajectory always follows the official run, so every
step is compared on identical inputs. The summary gives the number of differing decisions and the official
decisions' margins (closest candidate confidence to the threshold, gap between the two most confident candidates).

--precision: mean / max |logit - reference| of one full forward (T = --precision-len) for the official float32
model and ours, against the official model in float64 (which still applies RoPE in float32) and against float64
with float64 RoPE; repeated in a subprocess with XLA's YNNPACK dot fusion disabled
(XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=).
--layers: local float32 error of each attention / MLP half and the head, each fed the float64 input (layer_check).
torch is a benchmark-only requirement (not a dependency of dllm-jax).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # float64 and teacher forcing on the CPU
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vs_pytorch as V  # noqa: E402  (sets TORCHDYNAMO_DISABLE / OMP_WAIT_POLICY first)


def _softmax_conf(logits_t, x0, dtype):
    import torch
    p = torch.softmax(logits_t.to(dtype), dim=-1)
    return torch.gather(p, -1, x0[..., None])[..., 0]



class Forcer:
    def __init__(self, case, tmodel, jmodel, prompt_len):
        import jax.numpy as jnp
        import torch

        from dllm_jax.models import transformer as T
        self.c, self.t, self.j, self.P = case, tmodel, jmodel, prompt_len
        self.T, self.jnp, self.torch = T, jnp, torch
        self.m64 = exact_f64_copy(tmodel)  # before the hooks are installed (deepcopy)
        self.cache = None
        self.refresh_ids = None
        self.cache64 = None
        self.calls = 0
        self.last = None
        self.logit_diffs = []
        self.records = []
        self.margins = {"threshold": [], "rank0_gap": []}
        tmodel.register_forward_hook(self._hook, with_kwargs=True)
        self.counter = V.vs_pytorch_qwen.CallCounter(tmodel)

    def _ours(self, ids, past, rp, use_cache):
        jnp, T = self.jnp, self.T
        p, cfg = self.j.params, self.j.cfg
        x = jnp.asarray(ids.numpy().astype(np.int32))
        if past is None:
            lg, cache = T.forward(p, cfg, x)
            if use_cache:
                self.cache, self.refresh_ids, self.cache64 = cache, ids.clone(), None
            return np.asarray(lg), ("full", 0)
        L = self.refresh_ids.shape[1]
        B, W = x.shape
        if rp is None:  # prefix cache: the suffix [L - W, L) is recomputed and written
            start = L - W
        else:  # dual cache: the replaced positions (one contiguous block)
            idx = np.nonzero(rp[0].numpy())[0]
            start = int(idx[0])
        pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        lg, _ = T.forward_window(p, cfg, x, jnp.full((B,), start, jnp.int32), jnp.ones((B, W), bool), self.cache,
                                 pos, jnp.ones((B, L), bool))
        return np.asarray(lg), ("prefix" if rp is None else "dual", start)

    def _hook(self, module, args, kwargs, output):
        ids = args[0] if args else kwargs["input_ids"]
        past, rp = kwargs.get("past_key_values"), kwargs.get("replace_position")
        lg_u, (kind, start) = self._ours(ids, past, rp, bool(kwargs.get("use_cache")))
        lg_o = output.logits.detach().numpy()
        d = np.abs(lg_u - lg_o)
        self.logit_diffs.append((float(d.mean()), float(d.max())))
        self.last = dict(ids=ids.clone(), kind=kind, start=start, official=lg_o, ours=lg_u, call=self.calls,
                         rp=None if rp is None else rp.clone())
        self.calls += 1

    def f64_logits(self):
        """Float64 official-model logits of the last call (same input, float64 cache from the same refresh)."""
        torch = self.torch
        last = self.last
        with torch.no_grad():
            if last["kind"] == "full":
                return self.m64(last["ids"]).logits.numpy()
            if self.cache64 is None:
                self.cache64 = self.m64(self.refresh_ids, use_cache=True).past_key_values
            if last["kind"] == "prefix":
                past = [tuple(t[:, :, :last["start"]] for t in layer) for layer in self.cache64]
                return self.m64(last["ids"], past_key_values=past, use_cache=True).logits.numpy()
            past = [tuple(t.clone() for t in layer) for layer in self.cache64]
            return self.m64(last["ids"], past_key_values=past, use_cache=True,
                            replace_position=last["rp"]).logits.numpy()

    def describe(self, positions, row, conf_fn, threshold, rival=None):
        lg64 = self.f64_logits()
        out = []
        for pos in positions:
            e = {"position": int(pos), "generated_position": None}
            for name, lg in (("official_fp32", self.last["official"]), ("ours_fp32", self.last["ours"]),
                             ("fp64", lg64)):
                v = lg[row, pos]
                top = np.argsort(v)[::-1][:2]
                e[name] = {"top1": int(top[0]), "top2": int(top[1]), "top2_gap": float(v[top[0]] - v[top[1]]),
                           "conf": float(conf_fn(v))}
            out.append(e)
        rec = {"call": self.last["call"], "kind": self.last["kind"], "row": int(row), "threshold": threshold,
               "positions": out}
        if rival is not None:
            rec["rule"] = "top-k: chosen vs runner-up candidate"
        self.records.append(rec)
        return rec


def run(case, mods, tmodel, jmodel, prompt, forcer):
    """Run the official function with the decision checks installed; returns (official x, n differing)."""
    import torch
    llada_gen, fast_gen = mods
    P = prompt.shape[1]
    n_diff = [0, 0]

    def conf64(v):
        v = v.astype(np.float64)
        e = np.exp(v - v.max())
        return e.max() / e.sum()

    if case.fn.startswith("fastdllm."):
        orig = fast_gen.get_transfer_index

        def patched(logits, temperature, remasking, mask_index, x, num_transfer_tokens, threshold=None):
            x0_o, ti_o = orig(logits, temperature, remasking, mask_index, x, num_transfer_tokens, threshold)
            lg_u = torch.from_numpy(forcer.last["ours"])
            assert lg_u.shape == logits.shape
            x0_u, ti_u = orig(lg_u, temperature, remasking, mask_index, x, num_transfer_tokens, threshold)
            n_diff[1] += 1
            # margins of the official decision (official float32 logits, float64 softmax as the official code):
            # distance of every candidate's confidence to the threshold (rank 0 excluded: always committed), and
            # the gap between the two most confident candidates (which one is rank 0)
            p = torch.softmax(logits.to(torch.float64), -1).max(-1).values
            for row in range(p.shape[0]):
                c = p[row][mask_index[row]]
                if len(c) > 1:
                    srt = torch.sort(c, descending=True).values
                    forcer.margins["rank0_gap"].append(float(srt[0] - srt[1]))
                    if threshold is not None:
                        forcer.margins["threshold"].append(float((srt[1:] - threshold).abs().min()))
            if not torch.equal(ti_o, ti_u) or not torch.equal(x0_o[ti_o], x0_u[ti_u]):
                n_diff[0] += 1
                for row in range(ti_o.shape[0]):
                    bad = torch.nonzero((ti_o[row] != ti_u[row]) | (ti_o[row] & (x0_o[row] != x0_u[row])))[:, 0]
                    if len(bad):
                        rec = forcer.describe(bad.tolist(), row, conf64, threshold)
                        off = forcer.last["start"]
                        for e in rec["positions"]:
                            e["generated_position"] = e["position"] + off - P
                            e["committed_official"] = bool(ti_o[row, e["position"]])
                            e["committed_ours"] = bool(ti_u[row, e["position"]])
                        print(json.dumps(rec), flush=True)
            return x0_o, ti_o

        fast_gen.get_transfer_index = patched
        try:
            x, _, _ = V.run_official(case, mods, tmodel, forcer.counter, prompt)
        finally:
            fast_gen.get_transfer_index = orig
        return x, n_diff

    # LLaDA generate: one forward per step, top-k (k = quota) of the float32 softmax confidence inside the block
    bl, steps = case.kw["block_length"], case.kw["steps"]
    spb = steps // (case.gen // bl)
    assert spb == bl, "the divergence tool handles LLaDA generate with one token per step only"
    counter = {"i": 0}

    def check(module, args, kwargs, output):
        i = counter["i"]
        counter["i"] += 1
        ids = forcer.last["ids"]
        nb = i // spb
        end = P + (nb + 1) * bl
        chosen = []
        for name in ("official", "ours"):
            lg = torch.from_numpy(forcer.last[name])
            x0 = lg.argmax(-1)
            c = _softmax_conf(lg, x0, torch.float32)
            c[:, end:] = -np.inf
            c = torch.where(ids == V.MASK_ID, c, torch.tensor(-np.inf))
            chosen.append((c.argmax(-1), x0, c))
            if name == "official":
                for row in range(c.shape[0]):
                    srt = torch.sort(c[row], descending=True).values
                    if torch.isfinite(srt[1]):
                        forcer.margins["rank0_gap"].append(float(srt[0] - srt[1]))
        n_diff[1] += 1
        for row in range(ids.shape[0]):
            po, pu = int(chosen[0][0][row]), int(chosen[1][0][row])
            if po != pu or int(chosen[0][1][row, po]) != int(chosen[1][1][row, pu]):
                n_diff[0] += 1
                def conf32(v):
                    v = v.astype(np.float32)
                    e = np.exp(v - v.max())
                    return float(e.max() / e.sum())
                rec = forcer.describe(sorted({po, pu}), row, conf32, None, rival=True)
                for e in rec["positions"]:
                    e["generated_position"] = e["position"] - P
                    e["chosen_by"] = [n for n, p in (("official", po), ("ours", pu)) if p == e["position"]]
                print(json.dumps(rec), flush=True)

    h = tmodel.register_forward_hook(check, with_kwargs=True)
    try:
        x, _, _ = V.run_official(case, mods, tmodel, forcer.counter, prompt)
    finally:
        h.remove()
    return x, n_diff


def exact_f64_copy(tmodel):
    """A float64 copy of the official model whose RoPE is float64 too (the official code builds its sin/cos tables
    in float32 and, with rope_full_precision, rotates q and k in float32 even in a float64 model). Its RMSNorm
    still rounds the normalised activations to float32 (a ~3e-8 relative effect, kept: it is the model's code)."""
    import torch
    m = copy.deepcopy(tmodel).double()
    m._forward_pre_hooks.clear()
    m._forward_hooks.clear()
    hd = V.MODEL_SHAPE["d_model"] // V.MODEL_SHAPE["n_heads"]
    theta = m.config.rope_theta
    inv = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    fr = np.arange(m.config.max_sequence_length, dtype=np.float64)[:, None] * inv[None]
    emb = np.concatenate([fr, fr], -1)
    sin, cos = torch.from_numpy(np.sin(emb))[None, None], torch.from_numpy(np.cos(emb))[None, None]
    for blk in m.model.transformer.blocks:
        re = blk.rotary_emb
        re.config.rope_full_precision = False
        cache = re._RotaryEmbedding__cache
        cache["rope_pos_sin"], cache["rope_pos_cos"] = sin, cos
    return m


def precision_check(tmodel, jmodel, T_len, seed=0):
    """Mean / max |logit - reference| of one full forward for the official float32 model and ours, against the
    official model in float64 (its RoPE still float32) and against float64 with float64 RoPE (exact_f64_copy)."""
    import jax.numpy as jnp
    import torch

    from dllm_jax.models import transformer as T
    ids = np.random.default_rng(seed).integers(0, V.EOS_ID, (1, T_len))
    m64 = copy.deepcopy(tmodel).double()
    m64._forward_pre_hooks.clear()
    m64._forward_hooks.clear()
    with torch.no_grad():
        refs = {"official_f64": m64(torch.from_numpy(ids)).logits.numpy(),
                "f64_exact_rope": exact_f64_copy(tmodel)(torch.from_numpy(ids)).logits.numpy()}
        off = tmodel(torch.from_numpy(ids)).logits.numpy().astype(np.float64)
    ours = np.asarray(T.forward(jmodel.params, jmodel.cfg, jnp.asarray(ids.astype(np.int32)))[0], np.float64)
    r = {"T": T_len}
    for rn, ref in refs.items():
        for name, v in (("official_fp32", off), ("ours_fp32", ours)):
            r[f"{name}_vs_{rn}"] = (float(np.abs(v - ref).mean()), float(np.abs(v - ref).max()))
    r["official_f64_vs_f64_exact_rope"] = float(np.abs(refs["official_f64"] - refs["f64_exact_rope"]).mean())
    r["ours_vs_official_fp32"] = float(np.abs(ours - off).mean())
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llada-repo", required=True)
    ap.add_argument("--fastdllm-repo", required=True)
    ap.add_argument("--case", default="fastdllm_prefix_g256", help=", ".join(V.CASES))
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--weight-seed", type=int, default=1234)
    ap.add_argument("--prompt-seed", type=int, default=1001)
    ap.add_argument("--qk-scale", type=float, default=3.0, help="as in vs_pytorch.py")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint", default=os.path.join(os.path.expanduser("~"), ".cache", "dllm_jax",
                                                         "vs_pytorch_llada_d512"))
    ap.add_argument("--precision", action="store_true", help="only the float64 distance of one full forward")
    ap.add_argument("--precision-len", type=int, default=192)
    ap.add_argument("--layers", action="store_true", help="local float32 error per sub-layer (see layer_check)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    llada_gen, fast_gen, M, C = V.import_official(a.llada_repo, a.fastdllm_repo)
    import torch
    torch.set_num_threads(a.threads)
    tmodel = V.build_official_model(M, C, a.checkpoint, a.weight_seed, a.qk_scale)
    import dllm_jax
    jmodel = dllm_jax.load(a.checkpoint)
    if a.layers:
        for exact in (False, True):
            for r in layer_check(tmodel, jmodel, a.precision_len, exact_rope=exact):
                print(json.dumps({"reference": "f64_exact_rope" if exact else "official_f64", **r}), flush=True)
        return
    if a.precision:
        r = precision_check(tmodel, jmodel, a.precision_len)
        r["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
        print(json.dumps(r))
        if not os.environ.get("VS_PYTORCH_CHILD"):  # the same with XLA's YNNPACK dot fusion disabled
            env = dict(os.environ, XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=", VS_PYTORCH_CHILD="1")
            out = subprocess.run([sys.executable, os.path.abspath(__file__), *(sys.argv[1:] if argv is None
                                                                               else argv)],
                                 env=env, capture_output=True, text=True)
            lines = out.stdout.strip().splitlines()
            print(lines[-1] if lines else out.stderr[-2000:])
        return
    case = V.CASES[a.case]
    prompt = V.prompts_for(case.batch, a.prompt_len, a.prompt_seed)
    forcer = Forcer(case, tmodel, jmodel, a.prompt_len)
    x, (nd, nt) = run(case, (llada_gen, fast_gen), tmodel, jmodel, prompt, forcer)
    mean_d = float(np.mean([d[0] for d in forcer.logit_diffs]))
    max_d = float(np.max([d[1] for d in forcer.logit_diffs]))
    summary = {"case": a.case, "forwards": forcer.calls, "decisions": nt, "differing_decisions": nd,
               "ours_vs_official_logits_mean_abs": mean_d, "max_abs": max_d,
               **{f"min_{k}_margin": (min(v) if v else None) for k, v in forcer.margins.items()},
               **{f"{k}_margins_below_2e-3": sum(m < 2e-3 for m in v) for k, v in forcer.margins.items()},
               "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
    print(json.dumps(summary), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"summary": summary, "records": forcer.records}, f, indent=1)



def layer_check(tmodel, jmodel, T_len, seed=0, exact_rope=False):
    """Local float32 error of each sub-layer, official vs ours, both fed the float64 reference input of that
    sub-layer (so errors do not accumulate): attention half x + attn(norm(x)), MLP half x + mlp(norm(x)), head."""
    import jax
    import jax.numpy as jnp
    import torch

    from dllm_jax.models import transformer as T
    ids = torch.from_numpy(np.random.default_rng(seed).integers(0, V.EOS_ID, (1, T_len)))
    if exact_rope:  # reference: float64 with float64 RoPE
        m64 = exact_f64_copy(tmodel)
    else:  # reference: the official model in float64 (RoPE still float32)
        m64 = copy.deepcopy(tmodel).double()
        m64._forward_pre_hooks.clear()
        m64._forward_hooks.clear()
    cfg, params = jmodel.cfg, jmodel.params
    pos = jnp.arange(T_len, dtype=jnp.int32)[None]
    valid = jnp.ones((1, T_len), bool)

    def t_attn(blk, x):
        q, k, v = blk.q_proj(blk.attn_norm(x)), blk.k_proj(blk.attn_norm(x)), blk.v_proj(blk.attn_norm(x))
        return x + blk.attention(q, k, v, None)[0]

    def t_mlp(blk, x):
        h = blk.ff_norm(x)
        return x + blk.ff_out(blk.act(blk.ff_proj(h)) * blk.up_proj(h))

    @jax.jit
    def j_attn(lp, x):
        h = T.rms_norm(x, lp["attn_norm"], cfg.norm_eps)
        q, k, v = T._qkv(cfg, lp, h)
        o = T._attend(cfg, q, k, v, valid, pos, pos, pos, False)
        return x + T._proj(o.reshape(1, T_len, -1), lp["wo"])

    @jax.jit
    def j_mlp(lp, x):
        return x + T._mlp(cfg, lp, x)

    def err(a, ref):
        a = np.asarray(a, np.float64)
        return float(np.abs(a - ref).mean() / np.abs(ref).mean())

    rows = []
    with torch.no_grad():
        x64 = m64.model.transformer.wte(ids)
        blocks32, blocks64 = tmodel.model.transformer.blocks, m64.model.transformer.blocks
        for i in range(len(blocks64)):
            lp = jax.tree.map(lambda a: a[i], params["layers"])
            a64 = t_attn(blocks64[i], x64)
            a_t = t_attn(blocks32[i], x64.float()).numpy()
            a_j = j_attn(lp, jnp.asarray(x64.float().numpy()))
            m64_ = t_mlp(blocks64[i], a64)
            m_t = t_mlp(blocks32[i], a64.float()).numpy()
            m_j = j_mlp(lp, jnp.asarray(a64.float().numpy()))
            rows.append({"layer": i, "attn_official": err(a_t, a64.numpy()), "attn_ours": err(a_j, a64.numpy()),
                         "mlp_official": err(m_t, m64_.numpy()), "mlp_ours": err(m_j, m64_.numpy())})
            x64 = m64_
        tr64 = m64.model.transformer
        ref = tr64.ff_out(tr64.ln_f(x64)).numpy()
        h_t = tmodel.model.transformer.ff_out(tmodel.model.transformer.ln_f(x64.float())).numpy()
        h_j = jax.jit(lambda x: T._head(params, cfg, x))(jnp.asarray(x64.float().numpy()))
        rows.append({"layer": "head", "official": err(h_t, ref), "ours": err(h_j, ref)})
    return rows


if __name__ == "__main__":
    main()
