"""Does the default model compute sums, or copy them? A teacher-forced probe of the `arith` (and `drill`) tasks.

    python benchmarks/arith_probe.py [--model DIR | --ckpt WORK_DIR/ckpt --preset cont3] [--n 200]

For each held-out problem, the prompt and the target up to the first addition or subtraction's `=` are given, and
that result *and everything after it* are masked (in a worked chain the result reappears as the next line's first
operand and in `#### answer`, so a model can fill it by copying when the later lines are visible). One forward; the
result counts as right when the argmax at every one of its digits is right. Also reported: the units digit alone
(a lookup of the two operands' units digits: chance is ~10 %), and the same with only the result masked (the copy
route open), which separates "knows the sum" from "copies it".
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def first_sum_span(target: str):
    """(start, length) in `target` of the first +/- line's result digits, or None."""
    off = 0
    for line in target.split("\n"):
        if "=" in line and "*" not in line:
            eq = line.index("=")
            return off + eq + 1, len(line) - eq - 1
        off += len(line) + 1
    return None


def load_params(a):
    import jax

    from dllm_jax import train
    from dllm_jax.models.transformer import init_params

    if a.ckpt:
        tc = train.get_preset(a.preset)
        cfg = train.model_config(tc)
        params = init_params(cfg, jax.random.key(0))
        opt, _ = train.make_optimizer(tc)
        state = opt.init(params)
        steps = sorted(int(d) for d in os.listdir(a.ckpt) if d.isdigit())
        if not steps:
            raise SystemExit(f"error: no checkpoint steps in {a.ckpt}")
        tmp = tempfile.mkdtemp()
        try:  # a copy: the running trainer may delete this step meanwhile
            shutil.copytree(os.path.join(a.ckpt, str(steps[-1])), os.path.join(tmp, str(steps[-1])))
            params, _ = train._restore_state(train._manager(tmp), steps[-1], params, state)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return params, cfg, f"{a.ckpt} step {steps[-1]}"
    import dllm_jax
    from dllm_jax.evaluate import default_model_path

    m = dllm_jax.load(a.model or default_model_path())
    return m.params, m.cfg, a.model or "embedded default model"


SINGLE = ("sums", "rawsums")  # one equation a row: the whole response is the result, in a 16-token buffer


def _forward(cfg):
    import jax
    import jax.numpy as jnp

    from dllm_jax.models import transformer as tf

    return jax.jit(lambda p, x: tf.forward(p, cfg, x, jnp.arange(x.shape[1])[None], jnp.ones_like(x, bool))[0])


def probe(params, cfg, task: str, n: int, mask_rest: bool, buf: int = 160) -> dict:
    """`buf`: the canvas (masks after the row); `sums` rows use their 16-token training buffer (`cont5`'s aux_seq),
    where the result is followed by EOS."""
    import jax.numpy as jnp

    from dllm_jax import tasks
    from dllm_jax.tokenizer import CharTokenizer

    tok = CharTokenizer()
    fwd = _forward(cfg)
    full = units = total = 0
    for e in tasks.generate(task, "heldout", n, 0):
        span = (0, len(e.target)) if task in SINGLE else first_sum_span(e.target)
        if span is None:
            continue
        s, k = span
        p = tok.encode_prompt(e.prompt, chat=tasks.get_task(task).chat)
        ids = np.array(p + tok.encode(e.target) + [cfg.eos_token_id], np.int32)
        P = len(p)
        x = ids.copy()
        if mask_rest:
            x[P + s:] = cfg.mask_token_id
        else:
            x[P + s:P + s + k] = cfg.mask_token_id
        if task in SINGLE:
            x = np.concatenate([x, np.full(16 - len(x), cfg.eos_token_id, np.int32)])
        else:
            x = np.concatenate([x, np.full(buf - len(x), cfg.mask_token_id, np.int32)])  # one compiled shape
        pred = np.asarray(jnp.argmax(fwd(params, jnp.asarray(x)[None])[0, P + s:P + s + k], -1))
        ok = pred == ids[P + s:P + s + k]
        total, full, units = total + 1, full + bool(ok.all()), units + bool(ok[-1])
    return {"n": total, "result_exact": full / max(total, 1), "units_digit": units / max(total, 1)}


def place_probe(params, cfg, n: int, buf: int, k: int) -> dict:
    """Is the sum circuit bound to a place? `rawsums` rows (`<|bos|>047+038=085<|eos|>`) after `k` visible
    independent equations, in a `buf`-token buffer (EOS after the row); the result masked."""
    import jax.numpy as jnp

    from dllm_jax import tasks
    from dllm_jax.tokenizer import CharTokenizer

    tok = CharTokenizer()
    fwd = _forward(cfg)
    fill = tasks.generate("rawsums", "train", n + k, 1)
    full = units = 0
    for i, e in enumerate(tasks.generate("rawsums", "heldout", n, 0)):
        pre = "".join(f.prompt + f.target + "\n" for f in fill[i:i + k])
        ids = np.array([tok.bos_id] + tok.encode(pre + e.prompt + e.target) + [tok.eos_id], np.int32)
        P = len(ids) - 4
        x = ids.copy()
        x[P:P + 3] = cfg.mask_token_id
        x = np.concatenate([x, np.full(buf - len(x), cfg.eos_token_id, np.int32)])
        ok = np.asarray(jnp.argmax(fwd(params, jnp.asarray(x)[None])[0, P:P + 3], -1)) == ids[P:P + 3]
        full, units = full + bool(ok.all()), units + bool(ok[-1])
    return {"n": n, "result_exact": full / n, "units_digit": units / n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="converted model dir (default: the embedded model)")
    ap.add_argument("--ckpt", help="a training work dir's ckpt/ (latest step), with --preset")
    ap.add_argument("--preset", default="cont3", help="train preset of --ckpt (model shape and optimiser)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--tasks", default="arith,drill", help="comma-separated: arith, drill, drillpad, sums, rawsums")
    ap.add_argument("--place", action="store_true",
                    help="also: rawsums after k visible equations in 16- to 160-token buffers")
    a = ap.parse_args(argv)
    params, cfg, name = load_params(a)
    print(f"model: {name}; n = {a.n} held-out problems per task; first +/- result of each")
    for task in a.tasks.split(","):
        for mask_rest, label in ((True, "result and everything after it masked"),
                                 (False, "only the result masked (copy route open)")):
            if task in SINGLE and not mask_rest:
                continue  # one equation: nothing follows the result
            r = probe(params, cfg, task, a.n, mask_rest)
            print(f"  {task:8s} {label:42s} exact {r['result_exact'] * 100:5.1f} %   units digit "
                  f"{r['units_digit'] * 100:5.1f} %   (n {r['n']})")
    if a.place:
        print("  a sum after k visible equations, in a buffer of B tokens (result masked):")
        for buf, ks in ((16, (0,)), (32, (0, 1)), (64, (0, 1, 3)), (160, (0, 3, 10))):
            for k in ks:
                r = place_probe(params, cfg, a.n, buf, k)
                print(f"  B {buf:3d}  k {k:2d}   exact {r['result_exact'] * 100:5.1f} %   units digit "
                      f"{r['units_digit'] * 100:5.1f} %   (n {r['n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
