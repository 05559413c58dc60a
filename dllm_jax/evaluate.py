"""Accuracy and speed of schedules on the task suite: `dllm-jax eval`.

    dllm-jax eval --task arith --schedule fastdllm_dual --threshold 0.9 --limit 100 --json OUT.json
    dllm-jax eval --schedule adablock --set init_block_length=32 --set delimiter_ids=[7]   # any preset argument
    dllm-jax eval --model CONVERTED_DIR --chat ...     # a converted model with its own tokenizer + chat template
    dllm-jax eval --sweep [--out docs/frontier]      # every preset / composition: the quality-speed frontier

Per task: exact-match accuracy on the held-out split, mean NFE per example, tokens per forward (TPF = generated tokens
up to EOS / NFE) and tokens/s (generated tokens up to EOS / run wall time, compile excluded), batch `--batch-size`.
EOS early stop is on for every schedule (a row stops forwarding once its answer is complete), so NFE and speed are
what a user gets; `--no-eos-stop` reproduces the fixed-length counting of the papers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

# The sweep: (label, preset, preset kwargs). Block 32 everywhere (the task answers are <= 4 blocks long).
SWEEP = [
    ("vanilla (1 tok/step)", "vanilla", dict(block_length=32)),
    ("fastdllm th0.9", "fastdllm", dict(block_length=32, threshold=0.9)),
    ("fastdllm th0.7", "fastdllm", dict(block_length=32, threshold=0.7)),
    ("fastdllm th0.5", "fastdllm", dict(block_length=32, threshold=0.5)),
    ("fastdllm factor1.0", "fastdllm", dict(block_length=32, factor=1.0)),
    ("fastdllm_prefix th0.9", "fastdllm_prefix", dict(block_length=32, threshold=0.9)),
    ("fastdllm_dual th0.9", "fastdllm_dual", dict(block_length=32, threshold=0.9)),
    ("fastdllm_dual th0.7", "fastdllm_dual", dict(block_length=32, threshold=0.7)),
    ("fastdllm_dual factor1.0", "fastdllm_dual", dict(block_length=32, factor=1.0)),
]
# Advanced methods are added when their presets exist: (label, preset, kwargs).
SWEEP_OPTIONAL = [
    ("dsb greedy th0.9", "dsb", dict(block_length=32, threshold=0.9, max_block_length=-1)),
    ("dsb greedy th0.7", "dsb", dict(block_length=32, threshold=0.7, max_block_length=-1)),
    ("dsb_cache greedy th0.9", "dsb_cache", dict(block_length=32, threshold=0.9, max_block_length=-1,
                                                 prefix_window=8)),
    # AdaBlock's delimiter is the model's newline token (filled in by `sweep_runs`)
    ("adablock th0.9", "adablock", dict(init_block_length=32, threshold=0.9)),
    ("adablock_dual th0.9", "adablock_dual", dict(init_block_length=32, threshold=0.9)),
    ("adablock_prefix th0.9", "adablock_prefix", dict(init_block_length=32, threshold=0.9)),
    ("dsb const. th0.9", "dsb", dict(block_length=32, threshold=0.9, max_block_length=32)),
    ("blockbatch th0.9", "blockbatch", dict(threshold=0.9)),
    ("blockbatch_rms th0.9", "blockbatch_rms", dict(threshold=0.9)),
    ("osdt (calibrated per task)", "osdt", dict(calibrate_on_train=True)),
    ("entropy_elastic", "entropy_elastic", dict()),
    # its threshold axis, as for Fast-dLLM (session 10: th0.9 held accuracy at 0.71x the reference's forwards)
    ("entropy_elastic th0.8", "entropy_elastic", dict(threshold=0.8)),
    ("entropy_elastic th0.7", "entropy_elastic", dict(threshold=0.7)),
    ("d2f", "d2f", dict()),
    ("dinfer_hierarchical", "dinfer_hierarchical", dict()),
    ("dinfer_credit", "dinfer_credit", dict()),
    ("localleap", "localleap", dict()),
    # compositions that no paper ships (window x acceptance x cache by name)
    ("sliding x hierarchical x dsb", "compose", dict(window="sliding", accept="hierarchical", cache="dsb",
                                                     block_length=32, prefix_window=8)),
    ("fixed x localleap x dual", "compose", dict(window="fixed", accept="localleap", cache="dual", block_length=32)),
    ("adablock x hierarchical x dual", "compose", dict(window="adablock", accept="hierarchical", cache="dual",
                                                       block_length=32, delimiter_threshold=0.3)),
]


def sweep_runs(codec: "TextCodec | None" = None) -> list:
    """The frontier's (label, preset, kwargs) list, with model-specific arguments (AdaBlock delimiters) filled in."""
    from dllm_jax.presets import PRESETS

    runs = list(SWEEP) + [r for r in SWEEP_OPTIONAL if r[1] in PRESETS]
    if codec is not None:
        nl = codec.newline_ids()
        runs = [(lab, p, {**kw, "delimiter_ids": tuple(nl)}
                 if (p.startswith("adablock") or kw.get("window") == "adablock") and nl else kw)
                for lab, p, kw in runs]
    return runs


def default_model_path() -> str:
    return os.path.join(os.path.dirname(__file__), "assets", "default_model")


def gen_length_for(task: str, block_length: int = 32) -> int:
    from dllm_jax import tasks

    n = tasks.get_task(task).max_target_chars + 1  # + EOS
    return -(-n // block_length) * block_length


class TextCodec:
    """Prompt encoding and answer decoding for a model: the embedded character tokenizer (pure Python) or the
    checkpoint's own Hugging Face tokenizer. `chat` applies the tokenizer's chat template to every prompt; it is an
    explicit choice (`--chat` / `--no-chat`), never guessed from the model's name or path."""

    def __init__(self, tokenizer_path: str | None, eos_id: int, chat: bool = True):
        from dllm_jax.tokenizer import CharTokenizer

        self.chat, self.eos_id, self.char, self.hf = chat, eos_id, None, None
        if tokenizer_path is None:
            raise ValueError("the model has no tokenizer (tokenizer.json / tokenizer_config.json beside the "
                             "weights): task prompts cannot be encoded")
        try:
            self.char = CharTokenizer.load(tokenizer_path)
        except (ValueError, KeyError, OSError):
            from transformers import AutoTokenizer

            self.hf = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
            if chat and not getattr(self.hf, "chat_template", None):
                raise ValueError(f"the tokenizer in {tokenizer_path!r} has no chat_template; pass --no-chat to "
                                 "evaluate a base model on raw prompts") from None

    def encode(self, prompt: str) -> list[int]:
        if self.char is not None:
            return self.char.encode_prompt(prompt, chat=self.chat)
        if self.chat:
            from dllm_jax.tokenizer import hf_chat_ids

            return hf_chat_ids(self.hf, prompt)
        return [int(t) for t in self.hf(prompt, add_special_tokens=False)["input_ids"]]

    def newline_ids(self) -> list[int]:
        """Token ids that are exactly a newline (AdaBlock's delimiter)."""
        if self.char is not None:
            return self.char.encode("\n")
        ids = self.hf("\n", add_special_tokens=False)["input_ids"]
        return list(ids) if len(ids) == 1 else []

    def decode(self, ids) -> str:
        ids = [int(t) for t in ids]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        if self.char is not None:
            return self.char.decode(ids)
        return self.hf.decode(ids, skip_special_tokens=True)


def evaluate_schedule(model, preset: str, kw: dict, task_names=None, n: int = 100, batch_size: int = 50,
                      seed: int = 0, eos_stop: bool = True, split: str = "heldout", codec: TextCodec | None = None,
                      progress: bool = False) -> dict:
    """Run one schedule over the task suite; returns per-task and overall metrics.

    Overall keys: accuracy (exact match, mean over tasks), char_accuracy (partial credit, mean over tasks),
    nfe_mean (mean NFE per example, mean over tasks), tpf (generated tokens up to EOS / forwards, all tasks),
    tokens_per_s (same tokens / run time), compile_s, run_s, wall_s. progress: a tqdm bar (stderr) over the
    batches, with the task and its running exact match."""
    from tqdm.auto import tqdm

    from dllm_jax import tasks
    from dllm_jax.frontier_stats import wilson
    from dllm_jax.generate import generate
    from dllm_jax.presets import make_schedule

    t_wall = time.perf_counter()
    codec = codec or TextCodec(model.tokenizer_path, model.cfg.eos_token_id)
    task_names = task_names or tasks.list_tasks()
    per_task = {}
    bar = tqdm(total=len(task_names) * -(-n // batch_size), desc=f"eval {preset}", unit="batch", file=sys.stderr,
               disable=not progress, dynamic_ncols=True, leave=False)
    for task in task_names:
        exs = tasks.generate(task, split, n, seed)
        g = gen_length_for(task)
        kw2 = dict(kw)
        if "block_length" in kw2:
            kw2["block_length"] = min(kw2["block_length"], g)
        if kw2.pop("calibrate_on_train", False):  # OSDT: thresholds calibrated once per task, on one train problem
            from dllm_jax.engine import osdt

            train_ex = tasks.generate(task, "train", 1, seed)[0]
            cal = osdt.calibrate(model, codec.encode(train_ex.prompt), g, block_length=min(32, g))
            kw2.update(thresholds=cal["thresholds"], block_length=cal["block_length"])
        sched = make_schedule(preset, g, model.cfg, **kw2)
        if eos_stop:
            sched = sched.replace(eos_early_stop=True)
        hits, chars, nfe, toks, run_s, compile_s = 0, 0.0, [], 0, 0.0, 0.0
        correct, char_list = [], []  # per problem, in order: paired comparisons between schedules
        for s in range(0, n, batch_size):
            chunk = exs[s:s + batch_size]
            rows = [codec.encode(e.prompt) for e in chunk]
            out = generate(model, rows, gen_length=g, schedule=sched)
            run_s += out.run_time_s
            compile_s += out.compile_time_s
            nfe += out.nfe.tolist()
            toks += int(np.sum(out.gen_lengths))
            for e, gen in zip(chunk, out.generated):
                text = codec.decode(gen)
                ok, ch = bool(tasks.score(task, text, e)), float(tasks.char_accuracy(text, e))
                hits, chars = hits + ok, chars + ch
                correct.append(ok)
                char_list.append(ch)
            bar.set_postfix_str(f"{task}: exact {hits}/{s + len(chunk)}", refresh=False)
            bar.update(1)
        per_task[task] = {"accuracy": hits / len(exs), "char_accuracy": chars / len(exs),
                          "mean_nfe": float(np.mean(nfe)), "tokens": toks,
                          "tpf": toks / max(sum(nfe), 1), "tokens_per_s": toks / max(run_s, 1e-9),
                          "run_s": run_s, "compile_s": compile_s, "gen_length": g, "n": len(exs),
                          "nfe_total": int(sum(nfe)), "correct": correct, "chars": char_list,
                          "accuracy_ci95": wilson(hits, len(exs))}
    bar.close()
    acc = float(np.mean([v["accuracy"] for v in per_task.values()]))
    mean_nfe = float(np.mean([v["mean_nfe"] for v in per_task.values()]))
    toks = sum(v["tokens"] for v in per_task.values())
    run_s = sum(v["run_s"] for v in per_task.values())
    return {"preset": preset, "kwargs": kw, "tasks": per_task, "accuracy": acc,
            "char_accuracy": float(np.mean([v["char_accuracy"] for v in per_task.values()])), "mean_nfe": mean_nfe,
            "nfe_mean": mean_nfe, "tpf": toks / max(sum(v["nfe_total"] for v in per_task.values()), 1),
            "tokens_per_s": toks / max(run_s, 1e-9), "run_s": run_s,
            "compile_s": sum(v["compile_s"] for v in per_task.values()), "wall_s": time.perf_counter() - t_wall,
            "batch_size": batch_size, "n": n, "eos_stop": eos_stop}


def summary_line(label: str, r: dict) -> str:
    """One result as a line that names its metrics: exact match and character accuracy per task, NFE, speed."""
    exact = "  ".join(f"{k} {v['accuracy'] * 100:.1f}%" for k, v in r["tasks"].items())
    chars = "  ".join(f"{k} {v['char_accuracy'] * 100:.1f}%" for k, v in r["tasks"].items())
    n = next(iter(r["tasks"].values()))["n"] if r["tasks"] else 0
    return (f"{label}: exact match {exact} | character accuracy {chars} | n={n}/task  mean NFE "
            f"{r['nfe_mean']:.1f}  TPF {r['tpf']:.2f}  {r['tokens_per_s']:.0f} tok/s  (run {r['run_s']:.1f}s, "
            f"compile {r['compile_s']:.1f}s, wall {r['wall_s']:.0f}s)")


def _frontier_md(results, meta) -> str:
    tasks_ = list(results[0]["tasks"])
    head = ("| schedule | " + " | ".join(f"{t} acc" for t in tasks_) + " | mean acc | "
            + " | ".join(f"{t} char" for t in tasks_) + " | mean char | mean NFE | TPF | tokens/s |")
    lines = [f"# Quality-speed frontier on the embedded default model", "",
             f"Machine: {meta['machine']}; jax {meta['jax']}; {meta['n']} held-out examples per task, batch "
             f"{meta['batch_size']}; EOS early stop {'on' if meta['eos_stop'] else 'off'}.", "",
             "Counting: accuracy = exact match of the final answer; char = character accuracy of the whole response "
             "(secondary, partial credit: characters of the target reproduced at the same position / the longer "
             "length); NFE = forwards per example (mean over examples, "
             "then over tasks); TPF = generated tokens up to EOS / NFE; tokens/s = generated tokens up to EOS / run "
             "wall time (compile excluded). CPU timings on a shared 2-core machine are indicative only.", "",
             head, "|" + "---|" * (2 * len(tasks_) + 6)]
    def acc_cell(v):  # exact match with its 95 % Wilson interval when the per-task result has it
        ci = v.get("accuracy_ci95")
        return f"{v['accuracy'] * 100:.1f}" + (f" [{ci[0] * 100:.0f}, {ci[1] * 100:.0f}]" if ci else "")

    for r in results:
        cells = " | ".join(acc_cell(r["tasks"][t]) for t in tasks_)
        ccells = " | ".join(f"{r['tasks'][t].get('char_accuracy', float('nan')) * 100:.1f}" for t in tasks_)
        tpf = np.mean([r["tasks"][t]["tpf"] for t in tasks_])
        lines.append(f"| {r['label']} | {cells} | {r['accuracy'] * 100:.1f} | {ccells} | "
                     f"{r.get('char_accuracy', float('nan')) * 100:.1f} | {r['mean_nfe']:.1f} | {tpf:.2f} | "
                     f"{r['tokens_per_s']:.0f} |")
    lines += goal_check(results)
    if all("char_accuracy" in r for r in results):
        lines += goal_check(results, metric="char_accuracy")
    from dllm_jax.frontier_stats import report

    paired = report(results, GOAL_REFERENCE)
    if paired:
        lines += [""] + paired
    return "\n".join(lines) + "\n"


GOAL_REFERENCE = "fastdllm_dual th0.9"


def goal_check(results, ref_label: str = GOAL_REFERENCE, ratio: float = 0.7, metric: str = "accuracy") -> list:
    """Markdown lines: which schedules reach <= ratio x the reference's mean NFE at equal or better `metric`
    (exact-match "accuracy", or "char_accuracy"), on the mean over tasks and per task (the reference and the
    candidates measured in the same run)."""
    ref = next((r for r in results if r["label"] == ref_label), None)
    if ref is None:
        return []
    name = "exact-match accuracy" if metric == "accuracy" else "character accuracy"
    out = ["", f"## Goal ({name}): <= {ratio}x the mean NFE of `{ref_label}` at equal or better {name}", "",
           f"Reference: mean {name} {ref[metric] * 100:.1f} %, mean NFE {ref['mean_nfe']:.1f} "
           f"(bound {ratio * ref['mean_nfe']:.1f}).", ""]
    wins = [r for r in results if r is not ref and r["mean_nfe"] <= ratio * ref["mean_nfe"]
            and r[metric] >= ref[metric]]
    if wins:
        out.append("Met on the task mean by: " + ", ".join(
            f"`{r['label']}` ({r['mean_nfe'] / ref['mean_nfe']:.2f}x NFE, {r[metric] * 100:.1f} %)"
            for r in sorted(wins, key=lambda r: r["mean_nfe"])) + ".")
    else:
        out.append("Not met on the task mean by any schedule of this run.")
    for t in ref["tasks"]:
        rt = ref["tasks"][t]
        w = [r for r in results if r is not ref and r["tasks"][t]["mean_nfe"] <= ratio * rt["mean_nfe"]
             and r["tasks"][t][metric] >= rt[metric]]
        best = min(w, key=lambda r: r["tasks"][t]["mean_nfe"]) if w else None
        out.append(f"* {t}: reference {rt[metric] * 100:.1f} % at NFE {rt['mean_nfe']:.1f}; " + (
            f"met by {len(w)} schedule(s), fewest forwards: `{best['label']}` "
            f"({best['tasks'][t]['mean_nfe'] / rt['mean_nfe']:.2f}x, {best['tasks'][t][metric] * 100:.1f} %)"
            if best else "not met"))
    return out


def _family(r) -> str:
    """Curve name of a result: the preset (its threshold / factor variants form one curve); compositions by label."""
    if r["preset"] == "compose":
        return r["label"]
    return r["preset"]


def _plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    tasks_ = list(results[0]["tasks"])
    panels = tasks_ + ["mean"]
    fams = list(dict.fromkeys(_family(r) for r in results))
    cmap = plt.get_cmap("tab20")
    markers = "os^vD<>pPhX*"
    metrics = [("accuracy", "exact match (%)")]
    if all("char_accuracy" in r for r in results):
        metrics.append(("char_accuracy", "character accuracy (%)"))
    fig, axes = plt.subplots(len(metrics), len(panels), figsize=(4.2 * len(panels) + 3.2, 4.0 * len(metrics)),
                             squeeze=False)
    for row, (metric, ylabel) in enumerate(metrics):
        for ax, panel in zip(axes[row], panels):
            for k, fam in enumerate(fams):
                rs = [r for r in results if _family(r) == fam]
                pts = sorted(((r["mean_nfe"], r[metric]) if panel == "mean" else
                              (r["tasks"][panel]["mean_nfe"], r["tasks"][panel][metric])) for r in rs)
                xs, ys = zip(*pts)
                ax.plot(xs, [y * 100 for y in ys], marker=markers[k % len(markers)], color=cmap(k % 20), lw=1.2,
                        ms=5, label=fam)
                if metric == "accuracy" and panel != "mean" and all("accuracy_ci95" in r["tasks"][panel] for r in rs):
                    cis = sorted(((r["tasks"][panel]["mean_nfe"], r["tasks"][panel]["accuracy"],
                                   tuple(r["tasks"][panel]["accuracy_ci95"])) for r in rs),
                                 key=lambda c: c[:2])  # 95 % Wilson bars (a list when read back from JSON)
                    ax.errorbar([c[0] for c in cis], [c[1] * 100 for c in cis],
                                yerr=[[(c[1] - c[2][0]) * 100 for c in cis], [(c[2][1] - c[1]) * 100 for c in cis]],
                                fmt="none", ecolor=cmap(k % 20), elinewidth=0.8, capsize=2, alpha=0.7)
            ax.set_title(panel if panel != "mean" else "mean over tasks")
            ax.set_xscale("log")  # one token per step sits 10x right of the parallel schedules
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("mean NFE per example (log scale)")
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel(ylabel)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    fig.suptitle("Quality-speed frontier on the embedded default model (up-left is better)")
    fig.tight_layout(rect=(0, 0, 1 - 2.6 / (4.2 * len(panels) + 3.2), 0.95))
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return True


def main(argv=None) -> int:
    from dllm_jax.cli import model_defaults, parse_set

    from dllm_jax.cli import ArgParser, quiet_transformers

    quiet_transformers()  # also when run as python -m

    ap = ArgParser(prog="dllm-jax eval", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    ap.add_argument("--lora", metavar="ADAPTER", help="PEFT LoRA adapter merged into an HF checkpoint at load")
    ap.add_argument("--block-causal", type=int, default=0, metavar="N",
                    help="block-causal attention over blocks of N, the prompt one block (D2F-trained models)")
    ap.add_argument("--schedule", default="vanilla", help="preset name (see `dllm-jax presets`)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="a preset argument (repeatable)")
    ap.add_argument("--threshold", type=float, help="shortcut for --set threshold=X")
    ap.add_argument("--factor", type=float, help="shortcut for --set factor=X")
    ap.add_argument("--block-length", type=int, help="shortcut for --set block_length=N")
    ap.add_argument("--sweep", action="store_true", help="run every preset/composition of the frontier")
    ap.add_argument("--task", "--tasks", dest="tasks", action="append", default=None,
                    help="task name(s), comma-separated or repeated (default: all)")
    ap.add_argument("--limit", "--n", dest="n", type=int, default=100, help="held-out examples per task")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--no-eos-stop", action="store_true", help="fixed-length counting (no EOS early stop)")
    chat = ap.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=True,
                      help="apply the tokenizer's chat template to every prompt (default; instruct models)")
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="raw prompts (base models)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--json", default=None, help="write the metrics to this JSON file")
    ap.add_argument("--out", default=None, help="write OUT.json, OUT.md and (sweep) OUT.png")
    ap.add_argument("--resume", action="store_true",
                    help="with --out: keep the schedules OUT.json already holds from the same model, tasks, n, batch "
                         "and EOS setting (OUT.json is rewritten after every schedule) and run only the others")
    a = ap.parse_args(argv)
    import jax

    import dllm_jax
    from dllm_jax import tasks as tasks_mod

    path = a.model or default_model_path()
    if not os.path.exists(path):
        print(f"error: model {path!r} not found", file=sys.stderr)
        return 2
    task_names = [t for item in a.tasks for t in item.split(",") if t] if a.tasks else None
    try:
        for t in task_names or []:
            tasks_mod.get_task(t)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.n < 1 or a.batch_size < 1:
        print("error: --limit and --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        model = dllm_jax.load(path, lora=a.lora)
        if a.block_causal:
            model = model.with_block_causal(a.block_causal)
        codec = TextCodec(model.tokenizer_path, model.cfg.eos_token_id, chat=a.chat)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.sweep:
        runs = sweep_runs(codec)
    else:
        kw = {k: v for k, v in (("threshold", a.threshold), ("factor", a.factor),
                                ("block_length", a.block_length)) if v is not None}
        try:
            kw.update(parse_set(a.set))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        runs = [(a.schedule, a.schedule, model_defaults(a.schedule, model.cfg, kw))]
    machine = f"{platform.machine()} {os.cpu_count()} cores ({jax.devices()[0].platform}: {jax.devices()[0].device_kind})"
    meta = {"machine": machine, "jax": jax.__version__, "n": a.n, "batch_size": a.batch_size,
            "eos_stop": not a.no_eos_stop, "chat": a.chat, "model": os.path.abspath(path),
            "tasks": task_names or tasks_mod.list_tasks(),
            "counting": "tokens = generated tokens up to (excluding) the first EOS; tokens_per_s = tokens / run_s "
                        "(compile excluded); tpf = tokens / forwards; nfe_mean = forwards per example"}
    results = []
    if a.resume:
        if not a.out:
            print("error: --resume needs --out (the OUT.json to continue)", file=sys.stderr)
            return 2
        try:
            results = _resumable(a.out + ".json", meta, [r[0] for r in runs])
        except ValueError as e:
            print(f"error: --resume: {e}", file=sys.stderr)
            return 2
        for r in results:
            print(summary_line(r["label"], r) + "  [kept from " + a.out + ".json]", flush=True)
    done = {r["label"] for r in results}
    for label, preset, kw in runs:
        if label in done:
            continue
        try:
            r = evaluate_schedule(model, preset, kw, task_names, a.n, a.batch_size, eos_stop=not a.no_eos_stop,
                                  codec=codec, progress=not a.no_progress)
        except (ValueError, TypeError) as e:
            if not a.sweep:
                print(f"error: {label}: {e}", file=sys.stderr)
                return 2
            print(f"{label}: skipped ({e})", file=sys.stderr)
            continue
        r["label"], r["machine"] = label, machine
        results.append(r)
        print(summary_line(label, r), flush=True)
        if a.out:  # a long sweep keeps what it measured: --resume continues from here
            _atomic_write(a.out + ".json", json.dumps({"meta": {**meta, "complete": False}, "results": results},
                                                      indent=1))
    order = {r[0]: i for i, r in enumerate(runs)}
    results.sort(key=lambda r: order.get(r["label"], len(order)))
    if a.json and results:
        payload = {**results[0], "meta": meta} if len(results) == 1 else {"meta": meta, "results": results}
        _atomic_write(a.json, json.dumps(payload, indent=1))
        print("wrote", a.json)
    if a.out and results:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        _atomic_write(a.out + ".json", json.dumps({"meta": {**meta, "complete": True}, "results": results},
                                                  indent=1))
        _atomic_write(a.out + ".md", _frontier_md(results, meta))
        if a.sweep:
            _plot(results, a.out + ".png")
        print("wrote", a.out + ".{json,md" + (",png}" if a.sweep else "}"))
    return 0


_RESUME_KEYS = ("model", "tasks", "n", "batch_size", "eos_stop", "chat")


def _resumable(path: str, meta: dict, labels: list) -> list:
    """The results of an earlier (possibly interrupted) run in `path` that this run may keep: same model, tasks,
    n, batch size, EOS and chat setting; only schedules this run would measure. [] when `path` does not exist."""
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            old = json.load(f)
        old_meta, old_results = old["meta"], old["results"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a frontier result file ({e})") from None
    diff = [k for k in _RESUME_KEYS if old_meta.get(k) != meta[k]]
    if diff:
        raise ValueError(f"{path} was measured with other settings ("
                         + ", ".join(f"{k} {old_meta.get(k)!r}, now {meta[k]!r}" for k in diff)
                         + "); use another --out or drop --resume")
    return [r for r in old_results if r.get("label") in set(labels)]


def _atomic_write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main())
