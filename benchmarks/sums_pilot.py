"""Can the default model's network learn two-number sums, and from which rows? A from-scratch pilot.

    python benchmarks/sums_pilot.py --task sums --steps 1500 --work /tmp/sums_pilot         # dense rows
    python benchmarks/sums_pilot.py --task drillpad --steps 1500 --work /tmp/drill_pilot    # 5-equation rows

Trains the `default` preset's network (d_model 128, 6 layers) from random init on one training-only task
(`sums`: one zero-padded equation per row, `047+038=` -> `085`, batch 256 x 16 tokens; `drillpad` / `drill`: 4-6
equations per row, batch 32 x 144), lr 2e-3, then probes the last checkpoint with benchmarks/arith_probe.py
(teacher-forced, held-out problems, the result and everything after it masked): exact result and units digit.
Findings (docs/default_model.md, "Dense sums"): one run learned sums after a ~900-step plateau, a rerun with this
script was still on it at step 1200; the drill rows stay at chance.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="sums", choices=["sums", "drillpad", "drill"])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--work", required=True, help="work dir (checkpoints, log); resumable")
    ap.add_argument("--n", type=int, default=200, help="held-out problems per probe")
    a = ap.parse_args(argv)

    import argparse as _ap

    import arith_probe

    from dllm_jax import train

    dense = a.task == "sums"
    tc = train.TrainConfig(name=f"pilot_{a.task}", n_layers=6, steps=a.steps, lr=2e-3, warmup=min(100, a.steps // 2),
                           ckpt_every=a.ckpt_every, log_every=50, task_weights=((a.task, 1.0),),
                           seq_len=16 if dense else 144, batch_size=256 if dense else 32,
                           random_end_frac=0.0 if dense else 0.5)
    resume = os.path.exists(os.path.join(a.work, train.STATE_NAME))
    train.train(tc, work_dir=a.work, resume=resume, progress=False)
    params, cfg, name = arith_probe.load_params(_ap.Namespace(ckpt=os.path.join(a.work, "ckpt"), preset=tc,
                                                              model=None))
    r = arith_probe.probe(params, cfg, a.task, a.n, mask_rest=True)
    print(f"pilot {a.task} ({name}, from scratch), {r['n']} held-out problems, the result and everything after it "
          f"masked: exact {r['result_exact'] * 100:.1f} %, units digit {r['units_digit'] * 100:.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
