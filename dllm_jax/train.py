"""Train the embedded default model: a small LLaDA-family masked-diffusion LM on the synthetic tasks.

    dllm-jax train --preset default|tiny --out DIR [--steps N] [--resume] [--eval N]

Objective (LLaDA SFT): per sequence t ~ U(eps, 1] (stratified over the batch), every response token (the EOS
padding included) is masked with probability t, the prompt never; loss = sum over masked tokens of CE / t, divided
by the response length, averaged over the batch. To make the model indifferent to the generation length, half the
rows end (attention mask) at a random length between the end of the answer and the buffer end.

Determinism: the batch of step s is drawn from numpy's generator seeded (seed, s) and the masking key is
fold_in(key(seed), s), so a resumed run reproduces an uninterrupted one. Training state (params + AdamW state) is
checkpointed with orbax into `work_dir` (default: OUT.work); the final converted checkpoint + tokenizer are written
to a temp dir that is renamed to OUT at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from dllm_jax import tasks as tasks_mod
from dllm_jax.evaluate import gen_length_for
from dllm_jax.models.config import ModelConfig
from dllm_jax.models import transformer as tf
from dllm_jax.models.transformer import forward, init_params
from dllm_jax.tokenizer import CharTokenizer
from dllm_jax.train_config import PRESETS, TrainConfig, get_preset  # noqa: F401  (re-exported)

LOG_NAME = "train_log.jsonl"
STATE_NAME = "train_config.json"


def model_config(tc: TrainConfig, tok: CharTokenizer | None = None) -> ModelConfig:
    tok = tok or CharTokenizer()
    return ModelConfig(
        family="llada", vocab_size=tok.vocab_size, d_model=tc.d_model, n_layers=tc.n_layers, n_heads=tc.n_heads,
        n_kv_heads=tc.n_heads, head_dim=tc.head_dim, mlp_hidden=tc.mlp_hidden, rope_theta=10000.0, norm_eps=1e-5,
        qkv_bias=False, mask_token_id=tok.mask_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
        max_seq_len=max(tc.max_seq_len, tc.seq_len), logit_shift=False, block_causal=0,
        extra=(("bos_token_id", tok.bos_id), ("eot_token_id", tok.eot_id),
               # the canvas `dllm-jax generate` uses unless told: the longest answer of the evaluated tasks fits
               ("default_gen_length", max(gen_length_for(t) for t in tasks_mod.list_tasks()))))


# ---------------------------------------------------------------- data
def make_batch(tc: TrainConfig, step: int, tok: CharTokenizer, split: str = "train"):
    """The batch of `step`: tokens [B, T], prompt_len [B], valid_len [B] (int32 numpy), maskable [B, T] (bool:
    the positions the noise may mask, prompt_len <= pos < valid_len, narrowed by a task's `Task.maskable`) and tie
    [B, T] (int32: the position whose noise draw each position shares, `Task.ties` under `tied_noise`; its own
    elsewhere),
    deterministic."""
    rng, names, choice, T, end_frac = _batch_plan(tc, step)
    B = len(choice)
    tokens = np.full((B, T), tok.eos_id, np.int32)
    prompt_len = np.zeros(B, np.int32)
    valid_len = np.full(B, T, np.int32)
    maskable = np.zeros((B, T), bool)
    tie = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    for b in range(B):
        for _ in range(100):  # redraw the (rare) examples that do not fit the buffer
            ex = tasks_mod.sample(names[choice[b]], rng, split)
            task = tasks_mod.get_task(ex.task)
            p = tok.encode_prompt(ex.prompt, chat=task.chat)
            r = tok.encode(ex.target) + ([] if task.mask_after else [tok.eos_id])
            if len(p) + len(r) <= T:
                break
        else:
            raise ValueError(f"seq_len={T} is too short for task {names[choice[b]]!r}")
        tokens[b, :len(p)] = p
        tokens[b, len(p):len(p) + len(r)] = r
        prompt_len[b] = len(p)
        if rng.random() < end_frac:
            valid_len[b] = rng.integers(len(p) + len(r), T + 1)
        maskable[b, len(p):valid_len[b]] = True
        if task.maskable is not None:  # e.g. `rawdrill`: only the results' digits, the response's rest always visible
            maskable[b, len(p):] = False
            maskable[b, len(p):len(p) + len(ex.target)] = task.maskable(ex.target)
        if tc.tied_noise and task.ties is not None:  # `arith`: a result and its copies masked together
            tie[b, len(p):len(p) + len(ex.target)] = len(p) + np.asarray(task.ties(ex.target), np.int32)
        if task.mask_after:  # `chainstep`: the rest of the canvas is still masked, as when decoding; not scored
            tokens[b, len(p) + len(r):] = tok.mask_id
            maskable[b, len(p) + len(r):] = False
    return tokens, prompt_len, valid_len, maskable, tie


def _batch_plan(tc: TrainConfig, step: int):
    """The seeded generator of `step`'s batch after its first draw (each row's task), the task names, the rows'
    task indices [B], the buffer length and the random-end share."""
    rng = np.random.default_rng([tc.seed, step])
    if is_aux_step(tc, step):
        names, w, B, T, end_frac = [tc.aux_task], np.ones(1), tc.aux_batch, tc.aux_seq, 0.0
    else:
        names = [n for n, _ in tc.task_weights]
        w = np.asarray([x for _, x in tc.task_weights], np.float64)
        B, T, end_frac = tc.batch_size, tc.seq_len, tc.random_end_frac
    return rng, names, rng.choice(len(names), size=B, p=w / w.sum()), T, end_frac


def suffix_rows(tc: TrainConfig, step: int) -> np.ndarray:
    """[B] bool: the rows of `step`'s batch that `suffix_frac` may suffix-mask (rows of `suffix_tasks`, or all)."""
    _, names, choice, _, _ = _batch_plan(tc, step)
    if not tc.suffix_tasks:
        return np.ones(len(choice), bool)
    return np.asarray([names[c] in tc.suffix_tasks for c in choice], bool)


def is_aux_step(tc: TrainConfig, step: int) -> bool:
    """Whether `step` trains on the dense auxiliary batch (`TrainConfig.aux_task`)."""
    return bool(tc.aux_task) and tc.aux_every > 0 and step % tc.aux_every == tc.aux_every - 1


# ---------------------------------------------------------------- objective
def train_forward(params, cfg: ModelConfig, tokens_BxT, key_valid_BxT):
    """Logits of `transformer.forward` (same params, same math), with the layer loop unrolled and plain
    bidirectional attention: its backward pass is faster on CPU than the scanned inference body."""
    B, T = tokens_BxT.shape
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    cos, sin = tf.rope_tables(pos, cfg.head_dim, cfg.rope_theta)
    bias = jnp.where(key_valid_BxT[:, None, None, :], 0.0, -1e30).astype(jnp.float32)
    G = cfg.n_heads // cfg.n_kv_heads
    x = tf._embed(params, tokens_BxT)
    for i in range(cfg.n_layers):
        lp = jax.tree.map(lambda a: a[i], params["layers"])
        h = tf.rms_norm(x, lp["attn_norm"], cfg.norm_eps)
        q, k, v = tf._qkv(cfg, lp, h)
        q, k = tf.apply_rope(q, cos, sin), tf.apply_rope(k, cos, sin)
        if G > 1:
            k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
        s = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * cfg.head_dim ** -0.5
        p = jax.nn.softmax(s + bias, axis=-1)
        o = jnp.einsum("bhts,bshd->bthd", p.astype(v.dtype), v)
        x = x + tf._proj(o.reshape(B, T, -1), lp["wo"])
        x = x + tf._mlp(cfg, lp, x)
    return tf._head(params, cfg, x)


def noise_mask(key, T: int, prompt_len, valid_len, eps=1e-3, suffix_frac: float = 0.0, maskable=None,
               suffix_ok=None, tie=None, tie_mode: str = "shared"):
    """The masked positions [B, T] and each row's masking ratio t [B] of one training step: response positions
    (prompt_len <= pos < valid_len, and `maskable` [B, T] where given) masked independently with probability t
    (LLaDA), or, in a `suffix_frac` share of the rows, every response position from a cut point on, the cut leaving
    round(t * response length) masked; `suffix_ok` [B] bool (`suffix_rows`) limits the suffix rows to those;
    `tie` [B, T] (`make_batch`) ties positions' draws: `tie_mode` "shared" = a position takes its source's draw,
    "min" = the smaller of its own and its source's (masked whenever its source is, and sometimes alone)."""
    B = prompt_len.shape[0]
    k_t, k_p, k_m = jax.random.split(key, 3)
    u = (jnp.arange(B, dtype=jnp.float32) + jax.random.uniform(k_t, (B,))) / B  # stratified U(0, 1)
    t = eps + (1.0 - eps) * jax.random.permutation(k_p, u)
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    valid = pos < valid_len[:, None]
    resp = (pos >= prompt_len[:, None]) & valid
    if maskable is not None:
        resp = resp & maskable
    u = jax.random.uniform(k_m, (B, T))
    if tie is not None:
        u_src = jnp.take_along_axis(u, tie, axis=1)
        if tie_mode == "shared":
            u = u_src
        elif tie_mode == "min":
            u = jnp.minimum(u, u_src)
        else:
            raise ValueError(f"tie_mode {tie_mode!r}: expected 'shared' or 'min'")
    masked = (u < t[:, None]) & resp
    if suffix_frac > 0:  # its own key: plain rows draw exactly what they drew without the option
        resp_len = (valid_len - prompt_len).astype(jnp.float32)
        cut = valid_len - jnp.maximum(jnp.round(t * resp_len), 1.0).astype(jnp.int32)
        suffix = jax.random.uniform(jax.random.fold_in(key, 7), (B,)) < suffix_frac
        if suffix_ok is not None:
            suffix = suffix & suffix_ok
        masked = jnp.where(suffix[:, None], resp & (pos >= cut[:, None]), masked)
    return masked, t


def diffusion_loss(params, cfg: ModelConfig, tokens, prompt_len, valid_len, key, eps=1e-3, suffix_frac=0.0,
                   maskable=None, suffix_ok=None, tie=None, tie_mode="shared"):
    """LLaDA SFT masked-diffusion loss (`noise_mask`), normalised by each row's maskable length. Returns
    (loss, metrics)."""
    B, T = tokens.shape
    masked, t = noise_mask(key, T, prompt_len, valid_len, eps, suffix_frac, maskable, suffix_ok, tie, tie_mode)
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    valid = pos < valid_len[:, None]
    resp = (pos >= prompt_len[:, None]) & valid
    if maskable is not None:
        resp = resp & maskable
    noisy = jnp.where(masked, cfg.mask_token_id, tokens)
    logits = train_forward(params, cfg, noisy, valid)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    ce = jnp.where(masked, ce, 0.0)
    resp_len = jnp.maximum(resp.sum(1), 1).astype(jnp.float32)
    loss = jnp.mean(jnp.sum(ce / t[:, None], axis=1) / resp_len)
    n_masked = jnp.maximum(masked.sum(), 1)
    acc = jnp.sum(jnp.where(masked, jnp.argmax(logits, -1) == tokens, False)) / n_masked
    return loss, {"loss": loss, "masked_ce": ce.sum() / n_masked, "masked_acc": acc}


def make_optimizer(tc: TrainConfig):
    import optax

    cycles = tc.restarts or ((tc.steps, 1.0, tc.warmup),)
    if sum(c[0] for c in cycles) != tc.steps:
        raise ValueError(f"restarts {cycles} do not add up to steps={tc.steps}")
    parts, bounds, at = [], [], 0
    for i, (n, peak, warm) in enumerate(cycles):
        init = 0.0 if i == 0 else tc.lr * tc.min_lr_ratio
        parts.append(optax.warmup_cosine_decay_schedule(init, tc.lr * peak, max(warm, 1), max(n, warm + 1),
                                                        end_value=tc.lr * tc.min_lr_ratio))
        at += n
        bounds.append(at)
    sched = parts[0] if len(parts) == 1 else optax.join_schedules(parts, bounds[:-1])
    decay_mask = lambda p: jax.tree.map(lambda a: a.ndim >= 2, p)  # noqa: E731 - no decay on norms
    return optax.chain(optax.clip_by_global_norm(tc.clip),
                       optax.adamw(sched, b1=0.9, b2=tc.b2, weight_decay=tc.weight_decay, mask=decay_mask)), sched


@functools.lru_cache(maxsize=8)
def _cached_train_step(cfg: ModelConfig, tc: TrainConfig):
    return make_train_step(cfg, tc, make_optimizer(tc)[0])


def _step_fn_key(tc: TrainConfig) -> TrainConfig:
    """The fields the jitted step depends on (others zeroed so runs differing only in them share a compile)."""
    return dataclasses.replace(tc, name="", seed=0, task_weights=(), ckpt_every=1, log_every=1, random_end_frac=0.0,
                               init_from="", aux_task="", aux_every=0, aux_batch=0, aux_seq=0, suffix_tasks=(),
                               tied_noise=False)


def make_train_step(cfg: ModelConfig, tc: TrainConfig, opt):
    import optax

    @partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, tokens, prompt_len, valid_len, maskable, key, suffix_ok=None, tie=None):
        (_, metrics), grads = jax.value_and_grad(diffusion_loss, has_aux=True)(
            params, cfg, tokens, prompt_len, valid_len, key, tc.eps, tc.suffix_frac, maskable, suffix_ok, tie,
            tc.tie_mode)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return params, opt_state, metrics

    return train_step


def step_key(tc: TrainConfig, step: int):
    return jax.random.fold_in(jax.random.key(tc.seed + 1), step)


_diffusion_loss_jit = jax.jit(diffusion_loss, static_argnames=("cfg", "eps", "suffix_frac"))


def eval_loss(params, cfg: ModelConfig, tc: TrainConfig, n_batches: int = 2, step0: int = 10**6) -> float:
    """Objective on fixed held-out batches with fixed masks (a low-noise loss for comparisons)."""
    tok = CharTokenizer()
    fn = _diffusion_loss_jit
    mix = dataclasses.replace(tc, aux_task="")  # the task mixture only
    out = []
    for i in range(n_batches):
        tokens, pl, vl, mk, _ = make_batch(mix, step0 + i, tok, split="heldout")
        loss, _ = fn(params, cfg, tokens, pl, vl, step_key(tc, step0 + i), eps=tc.eps, maskable=mk)
        out.append(float(loss))
    return float(np.mean(out))


# ---------------------------------------------------------------- greedy evaluation decoder
@partial(jax.jit, static_argnames=("cfg", "gen_length", "block_length"))
def greedy_decode(params, cfg: ModelConfig, prompt_BxP, prompt_valid_BxP, gen_length: int, block_length: int = 32):
    """One token per step: full forward, commit the most confident masked token of the current block.

    Blocks of `block_length` are decoded left to right (semi-autoregressive); prompts are left-padded
    (prompt_valid_BxP False on the padding). Returns the generated ids [B, gen_length].
    """
    B, P = prompt_BxP.shape
    S = P + gen_length
    x0 = jnp.concatenate([prompt_BxP, jnp.full((B, gen_length), cfg.mask_token_id, prompt_BxP.dtype)], axis=1)
    valid = jnp.concatenate([prompt_valid_BxP, jnp.ones((B, gen_length), bool)], axis=1)
    positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
    gen_idx = jnp.arange(S, dtype=jnp.int32) - P
    rows = jnp.arange(B)

    def body(i, x):
        logits, _ = forward(params, cfg, x, positions, valid)
        logits = logits.at[..., cfg.mask_token_id].set(-jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1)
        conf, tok = jnp.max(probs, -1), jnp.argmax(probs, -1).astype(x.dtype)
        blk = i // block_length
        cand = (x == cfg.mask_token_id) & (gen_idx >= blk * block_length) & (gen_idx < (blk + 1) * block_length)
        j = jnp.argmax(jnp.where(cand, conf, -1.0), axis=1)
        return x.at[rows, j].set(jnp.where(cand[rows, j], tok[rows, j], x[rows, j]))

    x = jax.lax.fori_loop(0, gen_length, body, x0)
    return x[:, P:]


def default_gen_length(task: str, block_length: int = 32) -> int:
    n = tasks_mod.get_task(task).max_target_chars
    return -(-n // block_length) * block_length


def evaluate(params, cfg: ModelConfig, task_names=None, n: int = 200, seed: int = 0, batch_size: int = 100,
             block_length: int = 32, gen_length: int | None = None, split: str = "heldout",
             return_samples: bool = False):
    """Exact-match accuracy per task on `n` examples of `split`, with `greedy_decode`."""
    tok = CharTokenizer()
    task_names = task_names or tasks_mod.list_tasks()
    result, samples = {}, {}
    for task in task_names:
        exs = tasks_mod.generate(task, split, n, seed)
        gl = gen_length or default_gen_length(task, block_length)
        hits, outs = 0, []
        for s in range(0, n, batch_size):
            chunk = exs[s:s + batch_size]
            ids = [tok.encode_prompt(e.prompt) for e in chunk]
            P = max(len(i) for i in ids)
            arr = np.full((len(ids), P), tok.eos_id, np.int32)
            val = np.zeros((len(ids), P), bool)
            for r, i in enumerate(ids):
                arr[r, P - len(i):] = i
                val[r, P - len(i):] = True
            gen = np.asarray(greedy_decode(params, cfg, jnp.asarray(arr), jnp.asarray(val), gl, block_length))
            for e, g in zip(chunk, gen):
                text = tok.decode(g)
                ok = tasks_mod.score(task, text, e)
                hits += ok
                outs.append((e.prompt, text, e.answer, ok))
        result[task] = hits / len(exs)
        samples[task] = outs
    return (result, samples) if return_samples else result


# ---------------------------------------------------------------- checkpoints
def _manager(ckpt_dir: str, max_to_keep: int = 2):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(os.path.abspath(ckpt_dir),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def _save_state(mngr, step, params, opt_state):
    import orbax.checkpoint as ocp

    mngr.save(step, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}), force=True)
    mngr.wait_until_finished()


def _restore_state(mngr, step, params, opt_state):
    import orbax.checkpoint as ocp

    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), {"params": params,
                                                                            "opt_state": opt_state})
    st = mngr.restore(step, args=ocp.args.StandardRestore(target))
    return st["params"], st["opt_state"]


def _truncate_log(path: str, step: int) -> None:
    if not os.path.isfile(path):
        return
    with open(path) as f:
        keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
    with open(path, "w") as f:
        f.writelines(keep)


def write_final(out_dir: str, cfg: ModelConfig, params, meta: dict) -> None:
    """Converted checkpoint + tokenizer + training.json into a temp dir, then renamed to `out_dir`."""
    from dllm_jax.checkpoint import save_converted

    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_converted(tmp, cfg, jax.device_get(params), dtype_name="float32", trained_by="dllm_jax.train")
    CharTokenizer().save(tmp)
    with open(os.path.join(tmp, "training.json"), "w") as f:
        json.dump(meta, f, indent=1)
    old = None
    if os.path.exists(out_dir):
        old = f"{out_dir}.old-{os.getpid()}"
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- training loop
def train(preset="default", out_dir: str | None = None, steps: int | None = None, resume: bool = False,
          work_dir: str | None = None, progress: bool = True, stop_after: int | None = None, eval_n: int = 0,
          **overrides):
    """Train `preset` (a name in PRESETS or a TrainConfig; `overrides` replace its fields, `steps` its length).

    Checkpoints go to `work_dir` (default OUT.work) every `ckpt_every` steps; `resume=True` continues from the
    latest one (the saved train config is reused). `stop_after` ends the run early at that step (checkpointed,
    no final export: for tests and interrupted runs). At the end the converted model + tokenizer are written to
    `out_dir` (if given). Returns a dict: params, cfg, train_config, step, history (logged metrics), seconds.
    """
    from tqdm.auto import tqdm

    tc = get_preset(preset)
    if steps is not None:
        overrides["steps"] = int(steps)
    if overrides:
        tc = dataclasses.replace(tc, **overrides)
    if tc.aux_task:
        tasks_mod.get_task(tc.aux_task)  # a clear error for an unknown task
        if tc.aux_every < 2 or tc.aux_batch < 1 or tc.aux_seq < 8:
            raise ValueError(f"aux_task {tc.aux_task!r} needs aux_every >= 2, aux_batch >= 1 and aux_seq >= 8 "
                             f"(got {tc.aux_every}, {tc.aux_batch}, {tc.aux_seq})")
    mixture = {n for n, _ in tc.task_weights}
    if set(tc.suffix_tasks) - mixture:
        raise ValueError(f"suffix_tasks {sorted(set(tc.suffix_tasks) - mixture)} are not in the task mixture "
                         f"{sorted(mixture)}")
    if work_dir is None:
        if out_dir is None:
            raise ValueError("train needs out_dir or work_dir")
        work_dir = os.path.abspath(out_dir).rstrip("/") + ".work"
    os.makedirs(work_dir, exist_ok=True)
    state_path = os.path.join(work_dir, STATE_NAME)
    log_path = os.path.join(work_dir, LOG_NAME)
    mngr = _manager(os.path.join(work_dir, "ckpt"))
    latest = mngr.latest_step()
    if latest is not None and not resume:
        raise FileExistsError(f"{work_dir} already holds checkpoints (latest step {latest}); pass resume=True "
                              "(--resume) to continue, or remove it")
    if resume and os.path.isfile(state_path):
        with open(state_path) as f:
            saved = TrainConfig.from_dict(json.load(f)["train_config"])
        if steps is not None and saved.steps != tc.steps:
            raise ValueError(f"resume: the run was started with steps={saved.steps}, not {tc.steps}")
        tc = saved
    tok = CharTokenizer()
    cfg = model_config(tc, tok)
    opt, sched = make_optimizer(tc)
    params = init_params(cfg, jax.random.key(tc.seed), dtype=jnp.float32)
    opt_state = opt.init(params)
    start = 0
    prior_seconds = 0.0
    if tc.init_from and not (resume and latest is not None):
        params = _init_from(tc.init_from, cfg, params)
    if resume and latest is not None:
        params, opt_state = _restore_state(mngr, latest, params, opt_state)
        start = latest
        _truncate_log(log_path, start)
        if os.path.isfile(state_path):
            with open(state_path) as f:
                prior_seconds = float(json.load(f).get("seconds", {}).get(str(start), 0.0))
    elif not resume and os.path.isfile(log_path):
        os.remove(log_path)
    seconds_at = {}
    if os.path.isfile(state_path) and resume:
        with open(state_path) as f:
            seconds_at = {k: v for k, v in json.load(f).get("seconds", {}).items() if int(k) <= start}

    def write_state():
        with open(state_path, "w") as f:
            json.dump({"train_config": tc.to_dict(), "model": cfg.to_dict(), "seconds": seconds_at}, f, indent=1)

    write_state()
    train_step = _cached_train_step(cfg, _step_fn_key(tc))
    end = tc.steps if stop_after is None else min(tc.steps, stop_after)
    history = []
    t0 = time.time()
    bar = tqdm(total=tc.steps, initial=start, desc=f"train[{tc.name}]", disable=not progress, dynamic_ncols=True)
    logf = open(log_path, "a")
    m = last_aux = None
    try:
        for step in range(start, end):
            tokens, pl, vl, mk, tie = make_batch(tc, step, tok)
            sok = suffix_rows(tc, step) if tc.suffix_frac > 0 and tc.suffix_tasks else None
            tie = tie if tc.tied_noise else None
            params, opt_state, m_step = train_step(params, opt_state, tokens, pl, vl, mk, step_key(tc, step), sok,
                                                   tie)
            if is_aux_step(tc, step):
                last_aux = m_step
            else:
                m = m_step
            done = step + 1
            if done % tc.log_every == 0 or done == end:
                # the mixture's metrics of its latest step (+ the dense auxiliary batch's, prefixed `aux_`)
                m = {k: float(v) for k, v in (m if m is not None else m_step).items()}
                if last_aux is not None:
                    m.update({f"aux_{k}": float(v) for k, v in last_aux.items() if k in ("loss", "masked_acc")})
                rec = {"step": done, **m, "lr": float(sched(step)), "seconds": prior_seconds + time.time() - t0}
                history.append(rec)
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                bar.set_postfix(loss=f"{m['loss']:.3f}", ce=f"{m['masked_ce']:.3f}")
            bar.update(1)
            if done % tc.ckpt_every == 0 or done == end:
                _save_state(mngr, done, params, opt_state)
                seconds_at[str(done)] = prior_seconds + time.time() - t0
                write_state()
    finally:
        bar.close()
        logf.close()
        mngr.close()
    seconds = prior_seconds + time.time() - t0
    result = {"params": params, "cfg": cfg, "train_config": tc, "step": end, "history": history,
              "seconds": seconds}
    if out_dir is not None and end == tc.steps:
        meta = {"train_config": tc.to_dict(), "steps": end, "train_seconds": round(seconds, 1),
                "final": history[-1] if history else None, "machine": _machine()}
        if eval_n:
            t1 = time.time()
            meta["heldout_exact_match"] = evaluate(params, cfg, n=eval_n)
            meta["eval"] = {"n": eval_n, "decoder": "greedy_decode: 1 token/step, block 32, most confident",
                            "seconds": round(time.time() - t1, 1)}
            result["accuracy"] = meta["heldout_exact_match"]
        write_final(out_dir, cfg, params, meta)
        shutil.copy(log_path, os.path.join(out_dir, LOG_NAME))
    return result


def _init_from(path: str, cfg: ModelConfig, params):
    """Params of the converted checkpoint at `path`, checked to match `cfg`'s shapes (one clear error if not)."""
    from dllm_jax.checkpoint import restore_converted

    if not os.path.isfile(os.path.join(path, "dllm_jax_config.json")):
        raise FileNotFoundError(f"--init-from {path!r}: not a converted checkpoint (no dllm_jax_config.json)")
    init = restore_converted(path).params
    want = jax.tree.map(lambda a: a.shape, params)
    got = jax.tree.map(lambda a: a.shape, init)
    if want != got:
        raise ValueError(f"--init-from {path!r}: its parameter shapes do not match the preset's model")
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), init)


def _machine() -> str:
    import platform

    return f"{platform.machine()} {os.cpu_count()} cpus, jax {jax.__version__} {jax.default_backend()}"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        argv = argv[1:]
    from dllm_jax.cli import ArgParser

    ap = ArgParser(prog="dllm-jax train", description="Train the embedded default diffusion LM")
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    ap.add_argument("--out", required=True, help="output dir for the converted model + tokenizer")
    ap.add_argument("--steps", type=int, default=None, help="number of optimiser steps (default: the preset's)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the work dir")
    ap.add_argument("--work-dir", default=None, help="training checkpoints + log (default: OUT.work)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--eval", type=int, default=0, metavar="N",
                    help="after training, held-out exact match on N examples per task (stored in training.json)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--init-from", default=None, metavar="DIR",
                    help="warm start from a converted checkpoint of the same shape (e.g. the shipped model)")
    a = ap.parse_args(argv)
    over = {} if a.seed is None else {"seed": a.seed}
    if a.init_from:
        over["init_from"] = os.path.abspath(a.init_from)
    res = train(a.preset, a.out, steps=a.steps, resume=a.resume, work_dir=a.work_dir, progress=not a.no_progress,
                eval_n=a.eval, **over)
    print(json.dumps({"out": os.path.abspath(a.out), "steps": res["step"], "train_seconds": round(res["seconds"], 1),
                      "final": res["history"][-1] if res["history"] else None,
                      "heldout_exact_match": res.get("accuracy")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
