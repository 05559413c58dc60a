"""Where the default model's arithmetic goes wrong: vanilla-decode N held-out `arith` problems and classify each
miss by its first wrong line (a wrong operand -- an earlier result copied wrong --, a wrong result with or without a
carry/borrow, a broken line, the answer line). Used for docs/default_model.md, session 9.

    python benchmarks/arith_errors.py MODEL_DIR N [BLOCK [N_SHOW]]     # e.g. dllm_jax/assets/default_model 200
"""
import re, sys, collections
import numpy as np
import dllm_jax
from dllm_jax import tasks
from dllm_jax.evaluate import TextCodec, gen_length_for
from dllm_jax.presets import make_schedule
path, n = sys.argv[1], int(sys.argv[2]); block = int(sys.argv[3]) if len(sys.argv) > 3 else 32
m = dllm_jax.load(path); codec = TextCodec(m.tokenizer_path, m.cfg.eos_token_id)
exs = tasks.generate("arith", "heldout", n, 0); g = gen_length_for("arith")
sched = make_schedule("vanilla", g, m.cfg, block_length=block).replace(eos_early_stop=True)
texts = []
for s in range(0, n, 100):
    out = dllm_jax.generate(m, [codec.encode(e.prompt) for e in exs[s:s+100]], gen_length=g, schedule=sched)
    texts += [codec.decode(x) for x in out.generated]
kinds = collections.Counter(); ok = 0; shown = 0
for e, t in zip(exs, texts):
    good = bool(tasks.score("arith", t, e)); ok += good
    if good: continue
    tl, gl = e.target.strip().split("\n"), t.strip().split("\n")
    for i, (a, b) in enumerate(zip(tl, gl + [""] * len(tl))):
        if a != b:
            mm = re.match(r"(\d+)([-+*])(\d+)=(\d+)", a); mg = re.match(r"(\d+)([-+*])(\d+)=(\d+)", b)
            if a.startswith("####"): k = "answer line"
            elif mm and mg and mm.group(1, 2, 3) == mg.group(1, 2, 3):
                x, op, y = int(mm.group(1)), mm.group(2), int(mm.group(3))
                carry = (x % 10 + y % 10 >= 10) if op == "+" else (x % 10 < y % 10) if op == "-" else None
                k = f"result {op} carry={carry} line{i}"
            elif mm and mg: k = f"operand {mm.group(2)} line{i}"
            else: k = f"format line{i}"
            kinds[k] += 1
            if shown < 12:
                print(repr(a), "->", repr(b)); shown += 1
            break
print(f"exact {ok}/{n}")
for k, v in kinds.most_common(): print(f"{v:4d}  {k}")
if len(sys.argv) > 4:
    c = 0
    for e, t in zip(exs, texts):
        if not tasks.score("arith", t, e) and c < int(sys.argv[4]):
            print("PROMPT", e.prompt); print("TARGET", e.target.replace("\n", " | ")); print("GOT   ", t.replace("\n", " | ")); c += 1
