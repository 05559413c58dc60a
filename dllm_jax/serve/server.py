"""`dllm-jax serve`: an OpenAI-compatible streaming server with continuous batching on the jitted loop.

    dllm-jax serve [--model DIR] [--schedule P --set K=V ...] [--slots N] [--host H --port N] [--mesh data=2]

Loads the model (the embedded default model unless --model), compiles the loop program of every (prompt bucket,
generation bucket) of the schedule (compile cache warmed before the port opens), then serves with uvicorn.
SIGTERM/SIGINT: stop accepting, finish the requests in flight, exit 0.

ASGI stack: FastAPI (Starlette) + uvicorn, the most used and maintained Python pair; Starlette's StreamingResponse
gives SSE and notices client disconnects, uvicorn gives graceful shutdown on SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _ints(spec: str, what: str) -> tuple:
    try:
        vals = tuple(sorted({int(v) for v in spec.split(",") if v.strip()}))
    except ValueError:
        raise ValueError(f"--{what} expects comma-separated integers, got {spec!r}") from None
    if not vals or vals[0] <= 0:
        raise ValueError(f"--{what} needs positive integers, got {spec!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dllm-jax serve", description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint directory (default: the embedded model)")
    ap.add_argument("--model-id", help="the model name clients send (default: the directory name; "
                                       "'dllm-jax-default' for the embedded model)")
    ap.add_argument("--schedule", default="vanilla", help="default preset (requests may name another)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="preset argument (repeatable)")
    ap.add_argument("--slots", type=int, default=8, help="rows per compiled program (concurrent requests per "
                                                        "bucket)")
    ap.add_argument("--batch-sizes", default="auto",
                    help="physical batch sizes compiled below --slots (a chunk runs the occupied slots in the smallest "
                         "that holds them; idle slots then cost no compute); auto: powers of two, 'none': only --slots")
    ap.add_argument("--refresh-rows", default="auto",
                    help="cache schedules: the most rows one refresh (full) forward runs on when slots are at different "
                         "block phases; rows beyond wait one iteration (tokens unchanged). auto: ceil(slots / 8); "
                         "'all': every row that needs it (a full forward over the whole batch)")
    ap.add_argument("--prompt-buckets", default=None, help="prompt lengths compiled (multiples of 32, as `generate` "
                                                               "pads a prompt alone; default: 32,64,128, those that "
                                                               "fit the model's maximum length)")
    ap.add_argument("--gen-buckets", default=None, help="generation lengths compiled; max_tokens is rounded up to "
                                                            "the next one (default: 32,64 and the model's "
                                                            "default_gen_length if it declares a longer one)")
    ap.add_argument("--default-max-tokens", type=int, default=None,
                    help="max_tokens of a request that gives none (default: the model's default_gen_length, else 64)")
    ap.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    ap.add_argument("--chunk", type=int, default=8, help="loop iterations per device call (a quarter of it while "
                                                         "a slot of the group is free)")
    ap.add_argument("--batching", choices=["continuous", "static"], default="continuous",
                    help="static: refill a slot group only when all its requests finished (a benchmark baseline)")
    ap.add_argument("--no-compile-on-demand", action="store_true",
                    help="answer 400 to settings that need a program not compiled at start (default: compile it)")
    ap.add_argument("--max-programs", type=int, default=32)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--mesh", help="device mesh, e.g. data=2 (slots split over data)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--log-level", default="warning")
    return ap


def model_gen_defaults(model_cfg, gen_buckets, default_max_tokens):
    """The generation buckets and default max_tokens, given what the command line said (None: not given): 32, 64 and
    the model's default canvas (`cli.default_gen_length`, as `dllm-jax generate` uses), and that canvas for a request
    without max_tokens; an explicit `--gen-buckets` / `--default-max-tokens` wins."""
    from dllm_jax.cli import default_gen_length

    g = default_gen_length(model_cfg)
    if gen_buckets is None:
        gen_buckets = tuple(sorted({32, 64, g}))
    if default_max_tokens is None:
        default_max_tokens = min(g, gen_buckets[-1])
    return gen_buckets, default_max_tokens


def make_server(a):
    import dllm_jax
    from dllm_jax.cli import default_model_path, parse_mesh, parse_set
    from dllm_jax.serve.app import ApiError, ServeConfig, Server

    path = a.model or default_model_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"model {path!r} not found")
    settings = parse_set(a.set)
    p_buckets = _ints(a.prompt_buckets, "prompt-buckets") if a.prompt_buckets is not None else None
    if p_buckets is not None and any(p % 32 for p in p_buckets):  # before loading the model
        raise ValueError(f"--prompt-buckets must be multiples of 32 (the buckets `generate` pads to), got {p_buckets}")
    g_buckets = _ints(a.gen_buckets, "gen-buckets") if a.gen_buckets is not None else None
    if a.slots < 1 or a.max_queue < 0 or a.chunk < 1:
        raise ValueError("--slots and --chunk must be >= 1 and --max-queue >= 0")
    if a.batch_sizes == "auto":
        sizes = tuple(2 ** k for k in range(a.slots.bit_length()) if 2 ** k < a.slots)
    elif a.batch_sizes == "none":
        sizes = ()
    else:
        sizes = tuple(b for b in _ints(a.batch_sizes, "batch-sizes") if b < a.slots)
    if a.refresh_rows == "auto":
        refresh_rows = -(-a.slots // 8)
    elif a.refresh_rows == "all":
        refresh_rows = None
    else:
        refresh_rows = _ints(a.refresh_rows, "refresh-rows")[0]
    mesh = parse_mesh(a.mesh)
    model = dllm_jax.load(path, dtype=a.dtype, mesh=mesh)
    g_buckets, default_max_tokens = model_gen_defaults(model.cfg, g_buckets, a.default_max_tokens)
    if p_buckets is None:  # the task prompts of the embedded model run to ~100 tokens with the chat template
        p_buckets = tuple(p for p in (32, 64, 128) if p == 32 or p + g_buckets[-1] <= model.cfg.max_seq_len)
    if p_buckets[-1] + g_buckets[-1] > model.cfg.max_seq_len:
        raise ValueError(f"the largest prompt bucket {p_buckets[-1]} + gen bucket {g_buckets[-1]} exceeds the "
                         f"model's maximum length {model.cfg.max_seq_len}")
    tok = None
    if model.tokenizer_path is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model.tokenizer_path)
    model_id = a.model_id or ("dllm-jax-default" if a.model is None else os.path.basename(os.path.normpath(path)))
    cfg = ServeConfig(model=model, tokenizer=tok, model_id=model_id, schedule=a.schedule, settings=settings,
                      prompt_buckets=p_buckets, gen_buckets=g_buckets, slots=a.slots,
                      default_max_tokens=default_max_tokens, compile_on_demand=not a.no_compile_on_demand,
                      max_programs=a.max_programs, mesh=mesh, batch_sizes=sizes, refresh_rows=refresh_rows)
    server = Server(cfg, {"max_queue": a.max_queue, "chunk": a.chunk, "static": a.batching == "static"})
    n_sizes = len(set(sizes) | {a.slots})
    print(f"[serve] compiling {len(p_buckets) * len(g_buckets) * n_sizes} programs ({len(p_buckets)} prompt x "
          f"{len(g_buckets)} gen buckets x {n_sizes} batch sizes; DLLM_JAX_CACHE_DIR=DIR keeps them across restarts)",
          file=sys.stderr, flush=True)
    try:
        n, secs = server.warm()
    except ApiError as e:
        raise ValueError(f"--schedule {a.schedule}{' ' + str(settings) if settings else ''}: {e.message}") from None
    return server, n, secs


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        server, n, secs = make_server(a)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    from dllm_jax.serve.app import create_app

    app = create_app(server)
    server.batcher.start()

    class _Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            # uvicorn re-raises a captured signal after its graceful shutdown; we exit normally after the drain
            getattr(self, "_captured_signals", []).clear()

    config = uvicorn.Config(app, host=a.host, port=a.port, log_level=a.log_level, timeout_graceful_shutdown=None)
    userver = _Uvicorn(config)
    print(f"[serve] {server.cfg.model_id}: schedule {a.schedule} {server.cfg.settings or ''}, {a.slots} slots (batch "
          f"sizes {sorted(set(server.cfg.batch_sizes) | {a.slots})}) x {n} groups ({a.batching} batching; "
          f"prompt buckets {list(server.cfg.prompt_buckets)}, gen buckets "
          f"{list(server.cfg.gen_buckets)}) compiled in {secs:.1f}s; http://{a.host}:{a.port}", file=sys.stderr,
          flush=True)
    t0 = time.perf_counter()
    userver.run()  # returns after SIGTERM/SIGINT once open connections (streams in flight) have finished
    server.batcher.stop()
    snap = server.batcher.snapshot()
    print(f"[serve] stopped after {time.perf_counter() - t0:.1f}s: {snap['counts']}, {snap['in_flight']} in flight",
          file=sys.stderr, flush=True)
    return 0 if server.batcher.error is None else 1


if __name__ == "__main__":
    sys.exit(main())
