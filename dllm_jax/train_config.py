"""Training configurations of the embedded default model: `TrainConfig` and the named presets of
`dllm-jax train --preset NAME` (every run of the shipped model's chain is a preset here, so `training.json` can be
replayed; docs/default_model.md lists them)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    name: str = "default"
    # model
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int = 32
    mlp_hidden: int = 512
    seq_len: int = 160  # training buffer: chat-formatted prompt + response + EOS padding
    max_seq_len: int = 256  # recorded in the model config (inference buffer bound)
    # optimisation
    batch_size: int = 32
    steps: int = 1200
    lr: float = 2e-3
    warmup: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.1
    b2: float = 0.98
    clip: float = 1.0
    eps: float = 1e-3
    random_end_frac: float = 0.5  # rows whose buffer ends at a random length after the answer
    # rows masked as a suffix (everything from a cut point on, the masked share t as in the other rows) instead of
    # token by token: nothing after a masked token is visible, so a worked chain's result cannot be copied from the
    # next line and must be computed (benchmarks/arith_probe.py); 0 = plain LLaDA masking
    suffix_frac: float = 0.0
    # the tasks whose rows may be suffix-masked (`suffix_frac` of them); () = every task's. E.g. only `arith`: a
    # left-to-right noise on the chains, whose later results cannot be known before the earlier ones, while the
    # other tasks keep the plain masks
    suffix_tasks: tuple = ()
    # tasks' `ties` honoured: a result and its later copies masked together (`arith.ties`); False = independent
    tied_noise: bool = False
    # how a tied position draws: "shared" = its source's draw (a copy masked exactly when its source is); "min" = the
    # smaller of its own and its source's draw (masked whenever its source is, and also alone): the state "result
    # visible, its copy masked" is trained too, so copying a visible result is learned beside computing a masked one
    # (run 17 miscopied visible results into the next line's operand: docs/default_model.md, session 9)
    tie_mode: str = "shared"
    # dense auxiliary steps: every `aux_every`-th step (step % aux_every == aux_every - 1) trains on a batch of
    # `aux_batch` short rows of `aux_task` in an `aux_seq`-token buffer instead of the task mixture (e.g. `sums`:
    # hundreds of single equations per step, which the long mixture rows cannot hold); 0 = off
    aux_task: str = ""
    aux_every: int = 0
    aux_batch: int = 256
    aux_seq: int = 24
    seed: int = 0
    task_weights: tuple = (("arith", 0.45), ("code", 0.25), ("sort", 0.30))
    # warm restarts: ((steps, peak lr / lr, warmup), ...) summing to `steps`; () = one warmup + cosine cycle
    restarts: tuple = ()
    ckpt_every: int = 100
    log_every: int = 10
    # warm start: a converted checkpoint dir of the same shape whose params replace the random init at step 0
    init_from: str = ""

    def __post_init__(self):
        if self.tie_mode not in ("shared", "min"):
            raise ValueError(f"TrainConfig.tie_mode {self.tie_mode!r}: expected 'shared' or 'min'")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["task_weights"] = [list(p) for p in self.task_weights]
        d["restarts"] = [list(p) for p in self.restarts]
        d["suffix_tasks"] = list(self.suffix_tasks)
        return d

    @staticmethod
    def from_dict(d: dict) -> "TrainConfig":
        d = dict(d)
        d["task_weights"] = tuple(tuple(p) for p in d.get("task_weights", ()))
        d["restarts"] = tuple(tuple(p) for p in d.get("restarts", ()))
        d["suffix_tasks"] = tuple(d.get("suffix_tasks", ()))
        return TrainConfig(**d)


def _chain_preset(name: str, steps: int, seed: int, suffix_frac: float, weights, tied_noise: bool = False,
                  tie_mode: str = "shared", lr: float = 5e-4):
    """The session-8/9 continuations: lr 5e-4 unless given, `rawdrill` rows every 4th step, a `suffix_frac` share of
    the arith rows suffix-masked; `weights` = arith / chainstep / code / sort (`ask` 0.05)."""
    arith, chainstep, code, sort = weights
    return TrainConfig(name=name, n_layers=6, steps=steps, lr=lr, warmup=50, ckpt_every=200, log_every=50,
                       seed=seed, suffix_frac=suffix_frac, suffix_tasks=("arith",), tied_noise=tied_noise,
                       tie_mode=tie_mode,
                       task_weights=(("arith", arith), ("chainstep", chainstep), ("ask", 0.05), ("code", code),
                                     ("sort", sort)),
                       aux_task="rawdrill", aux_every=4, aux_batch=64, aux_seq=160)


PRESETS = {
    # 6 layers, one warmup + cosine cycle of 6000 steps (0.67 s/step on an unshared 2-core CPU: ~67 min)
    "default": TrainConfig(n_layers=6, steps=6000, warmup=200),
    # long run (hours on CPU, minutes on a GPU): the default model warm-started from a converted checkpoint
    # (--init-from), a low-peak cosine over many more sequences, more weight on the hardest task (code)
    "long": TrainConfig(name="long", n_layers=6, steps=60000, lr=1e-3, warmup=300, ckpt_every=250, log_every=50,
                        task_weights=(("arith", 0.40), ("code", 0.35), ("sort", 0.25))),
    # continuation (session 3): warm start from the shipped model (--init-from) at a low peak lr (the shipped run
    # ended at 1e-4; run 4's restart to 1e-3 pushed the loss up), 5000 more steps, sized for one CPU core in ~2 h
    "cont": TrainConfig(name="cont", n_layers=6, steps=5000, lr=5e-4, warmup=200, ckpt_every=250, log_every=50,
                        task_weights=(("arith", 0.40), ("code", 0.35), ("sort", 0.25))),
    # second continuation (session 4): as `cont`, from run 5, weighted towards the two tasks still at ~0 % exact
    # match (sort reached 46 % with 25 % of the data)
    "cont2": TrainConfig(name="cont2", n_layers=6, steps=5000, lr=5e-4, warmup=200, ckpt_every=250, log_every=50,
                         seed=1, task_weights=(("arith", 0.45), ("code", 0.45), ("sort", 0.10))),
    # third continuation (session 5): from run 6; arithmetic was stuck at ~1 % exact with multiplication facts right
    # and every addition/subtraction result wrong, so half the arithmetic data is the equation drill (tasks/drill.py)
    "cont3": TrainConfig(name="cont3", n_layers=6, steps=5000, lr=5e-4, warmup=200, ckpt_every=250, log_every=50,
                         seed=2, task_weights=(("arith", 0.30), ("drill", 0.35), ("code", 0.25), ("sort", 0.10))),
    # fourth continuation (next): cont3 with half the rows suffix-masked (`suffix_frac`), so a result is never
    # visible later in its own chain while it is masked (benchmarks/arith_probe.py: run 6 copies sums, never computes)
    "cont4": TrainConfig(name="cont4", n_layers=6, steps=5000, lr=5e-4, warmup=200, ckpt_every=250, log_every=50,
                         seed=3, suffix_frac=0.5,
                         task_weights=(("arith", 0.30), ("drill", 0.35), ("code", 0.25), ("sort", 0.10))),
    # fifth continuation (session 6): from run 7. Dense sums: every 2nd step is a batch of 256 single zero-padded
    # equations (`047+038=` -> `085`, task `sums`; a from-scratch pilot learned them in ~900 such steps, while 1500
    # steps of 5-equation drill rows stayed at chance), and `arith`'s chain is zero-padded the same way
    "cont5": TrainConfig(name="cont5", n_layers=6, steps=4000, lr=1e-3, warmup=200, ckpt_every=250, log_every=50,
                         seed=5, task_weights=(("arith", 0.45), ("code", 0.35), ("sort", 0.20)),
                         aux_task="sums", aux_every=2, aux_batch=256, aux_seq=16),
    # sixth continuation (session 7): from run 8, which learned `sums` (99.5 %) but not the chain's sums (1 %).
    # Its sum circuit is bound to the place: 92 % in the 16-token buffer it was trained in, 0 % in a 160-token one
    # (docs/default_model.md). So the dense rows are `rawdrill`: 6-12 sums a row all over the 160-token buffer, only
    # the results masked; plus `chainstep` (one chain result in its own context, the rest of the canvas <|mask|>)
    # and `ask` (`What is 12 + 35?`) in the mixture, and more sort (600 sort-only steps took run 8 to 96.5 %)
    "cont6": TrainConfig(name="cont6", n_layers=6, steps=1400, lr=1e-3, warmup=100, ckpt_every=200, log_every=50,
                         seed=6, task_weights=(("arith", 0.25), ("chainstep", 0.15), ("ask", 0.05), ("code", 0.25),
                                               ("sort", 0.30)),
                         aux_task="rawdrill", aux_every=2, aux_batch=64, aux_seq=160),
    # seventh continuation (session 7): from run 9, whose generations at its peak learning rate miscounted (sort
    # 1 %, n = 100, step 800) while its chain results were right teacher-forced: a short low-lr polish with the same
    # rows, the dense sums on every 4th step only (a balanced 600-step pilot at 5e-4 from run 8 sorted 77 %)
    "cont7": TrainConfig(name="cont7", n_layers=6, steps=600, lr=5e-4, warmup=50, ckpt_every=200, log_every=50,
                         seed=8, task_weights=(("arith", 0.25), ("chainstep", 0.15), ("ask", 0.05), ("code", 0.25),
                                               ("sort", 0.30)),
                         aux_task="rawdrill", aux_every=4, aux_batch=64, aux_seq=160),
    # eighth continuation (session 8): back to run 8 (code 79 %, sort 40.5 %), whose code and sort runs 9-10 (peak lr
    # 1e-3, dense sums) lost; a longer balanced low-lr run like the 600-step pilot from run 8 (4 / 74 / 77 %), more
    # sort (600 sort-only steps reached 96.5 %) and `ask` for the README's `What is 12 + 35?` prompts
    "cont8": TrainConfig(name="cont8", n_layers=6, steps=2000, lr=5e-4, warmup=50, ckpt_every=200, log_every=50,
                         seed=9, task_weights=(("arith", 0.20), ("ask", 0.05), ("code", 0.35), ("sort", 0.40))),
    # ninth continuation (session 8, pilot): from run 10, whose chain results are right teacher-forced but whose
    # left-to-right decoding (block 1) still fails: wrong operands copied, results committed before what they need.
    # Half of the `arith` rows suffix-masked (everything from a cut masked, as when decoding), the other tasks plain
    "cont9": _chain_preset("cont9", 600, 10, 0.5, (0.35, 0.10, 0.25, 0.25)),
    # session 8, from run 12 (`cont9`: left to right, block 1, arith 76 %; but block 32 only 5 %): `cont10` is
    # cont9 again with the `#### answer` zero-padded (the task's new format; block 1: 89 %, block 32: 3 %);
    # `cont11` adds tied noise (a result and its copies masked together, so no masking state lets a result be
    # copied instead of computed) with a quarter of the arith rows suffix-masked (block 32: 72 %, n = 100);
    # `cont12` continues it longer (run 15, shipped)
    "cont10": _chain_preset("cont10", 400, 12, 0.5, (0.35, 0.10, 0.25, 0.25)),
    "cont11": _chain_preset("cont11", 400, 14, 0.25, (0.35, 0.10, 0.25, 0.25), tied_noise=True),
    "cont12": _chain_preset("cont12", 1000, 15, 0.25, (0.35, 0.05, 0.25, 0.30), tied_noise=True),
    # `cont11` sorted only 36.5 % (n = 200; sort is data share): its 400 steps again with more sort
    "cont13": _chain_preset("cont13", 400, 16, 0.25, (0.25, 0.05, 0.25, 0.40), tied_noise=True),
    # next (started at the end of session 8, resumable): run 15 continued longer with more arith (68.5 % at n = 200,
    # the only task under 80 %); code and sort passed 80 % with 0.25 / 0.30
    "cont14": _chain_preset("cont14", 1500, 17, 0.25, (0.40, 0.05, 0.20, 0.35), tied_noise=True),
    # run 17 (`cont14`: arith 72 %) miscopied visible results into the next line's operand (~45 of its 56 errors):
    # shared ties never train "result visible, copy masked"; "min" ties do (session 9)
    "cont15": _chain_preset("cont15", 600, 18, 0.25, (0.40, 0.05, 0.20, 0.35), tied_noise=True, tie_mode="min"),
    # the same beside it with a larger arith share (code and sort had margin in run 17: 93 / 87 %)
    "cont16": _chain_preset("cont16", 600, 19, 0.25, (0.50, 0.05, 0.15, 0.30), tied_noise=True, tie_mode="min"),
    # run 18 (`cont15`) reached 87 % arith and 92 % sort, but code fell from 93 to 72 %: a short tail with more code
    "cont17": _chain_preset("cont17", 300, 20, 0.25, (0.30, 0.05, 0.40, 0.20), tied_noise=True, tie_mode="min"),
    "cont18": _chain_preset("cont18", 300, 21, 0.25, (0.30, 0.05, 0.40, 0.20), tied_noise=True, tie_mode="min",
                            lr=2e-4),
    # session 10: run 21 (`cont18`: 86 / 79 / 86 %) is one point under on code; its mixture three times as long
    "cont19": _chain_preset("cont19", 900, 22, 0.25, (0.30, 0.05, 0.40, 0.20), tied_noise=True, tie_mode="min",
                            lr=2e-4),
    "tiny": TrainConfig(name="tiny", d_model=32, n_layers=2, n_heads=2, head_dim=16, mlp_hidden=64, batch_size=8,
                        steps=20, lr=3e-3, warmup=2, ckpt_every=5, log_every=1),
}


def get_preset(preset) -> TrainConfig:
    if isinstance(preset, TrainConfig):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[preset]
