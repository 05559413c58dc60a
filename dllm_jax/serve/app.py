"""OpenAI-compatible HTTP API over the batcher (Starlette via FastAPI, served by uvicorn).

POST /v1/chat/completions, POST /v1/completions (stream or not), GET /v1/models, GET /health, GET /metrics.
Request bodies are parsed and checked here, so every bad input is one HTTP 400 with an OpenAI error body
({"error": {"message", "type", "param", "code"}}) and the server keeps serving; a full queue is a 429.

Extensions to the OpenAI schema (pass them with the openai client's `extra_body`): `schedule` (a preset name),
`settings` (preset keyword arguments, as `--set`), `stop_token_ids`. Responses carry a `dllm` object with the
request's NFE, tokens/s, time to first token, queue time, latency, the token ids, the schedule and the buckets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from dllm_jax.generate import ScheduleError, validate
from dllm_jax.serve.batcher import Batcher, QueueFull, Request
from dllm_jax.serve.slots import check_schedule, prompt_bucket


class ApiError(Exception):
    def __init__(self, message, param=None, code=None, status=400, type_="invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type_


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}},
                        status_code=e.status)


@dataclasses.dataclass
class ServeConfig:
    model: object  # dllm_jax Model
    tokenizer: object  # a transformers tokenizer (or None: token-id prompts only)
    model_id: str
    schedule: str
    settings: dict
    prompt_buckets: tuple
    gen_buckets: tuple
    slots: int
    default_max_tokens: int = 64
    compile_on_demand: bool = True
    max_programs: int = 32
    mesh: object = None
    batch_sizes: tuple = ()  # physical batch sizes compiled per group besides `slots` (SlotGroup)
    refresh_rows: int | None = None  # cache schedules: rows per refresh forward when rows disagree (Schedule field)


class Server:
    """Request checking and group keys; owns the batcher."""

    def __init__(self, cfg: ServeConfig, batcher_kw: dict | None = None):
        self.cfg = cfg
        self.specs: dict = {}  # group key -> (preset, settings)
        self.warm_programs: set = set()
        self._base_temp: dict = {}
        mc = cfg.model.cfg
        self.batcher = Batcher(self._make_group, self._decode, mc.eos_token_id, mc.mask_token_id,
                               **(batcher_kw or {}))

    # -- schedules and groups ----------------------------------------------------------------------------------
    def _schedule(self, preset: str, settings: dict, G: int):
        from dllm_jax.cli import model_defaults
        from dllm_jax.presets import PRESETS, make_schedule

        if preset not in PRESETS:
            raise ApiError(f"unknown schedule preset {preset!r}; known: {', '.join(sorted(PRESETS))}",
                           "schedule", "unknown_schedule")
        kw = model_defaults(preset, self.cfg.model.cfg, dict(settings))
        try:
            sched = make_schedule(preset, G, self.cfg.model.cfg, **kw)
        except TypeError as e:
            raise ApiError(f"preset {preset!r} does not take these settings ({e})", "settings",
                           "invalid_settings") from None
        except ValueError as e:  # PresetError / ScheduleError: a bad value or a gen length the preset cannot split
            raise ApiError(f"schedule {preset!r} with {settings or 'its defaults'} at gen length {G}: {e}",
                           "settings", "invalid_settings") from None
        try:
            return check_schedule(sched)
        except ScheduleError as e:
            raise ApiError(str(e), "schedule", "unsupported_schedule") from None

    def key(self, preset: str, settings: dict, P: int, G: int):
        k = (preset, tuple(sorted((n, repr(v)) for n, v in settings.items())), P, G)
        if k not in self.specs:
            sched = self._schedule(preset, settings, G)
            try:
                validate(self.cfg.model, [[0]], G, sched, P)
            except ScheduleError as e:
                raise ApiError(str(e), "max_tokens", "invalid_length") from None
            prog = (sched.split_dynamic()[0], P, G)
            if prog not in self.warm_programs:
                if not self.cfg.compile_on_demand:
                    raise ApiError(f"schedule {preset!r} with settings {settings} needs a program the server did not "
                                   "compile at start (only numeric settings such as thresholds are free); start the "
                                   "server with this --schedule/--set", "settings", "not_compiled")
                if len(self.warm_programs) >= self.cfg.max_programs:
                    raise ApiError(f"the server holds its maximum of {self.cfg.max_programs} compiled programs; use "
                                   "the configured schedule settings", "settings", "too_many_programs")
                self.warm_programs.add(prog)
            self.specs[k] = (preset, dict(settings))
        return k

    def _make_group(self, key):
        from dllm_jax.serve.slots import SlotGroup

        preset, settings = self.specs[key]
        P, G = key[2], key[3]
        sched = self._schedule(preset, settings, G)
        if sched.cache.has_cache and self.cfg.refresh_rows is not None:
            sched = sched.replace(refresh_rows=self.cfg.refresh_rows)
        return SlotGroup(self.cfg.model, sched, P, G, self.cfg.slots, self.cfg.mesh, batch_sizes=self.cfg.batch_sizes)

    def warm(self) -> tuple[int, float]:
        keys = []
        for P in self.cfg.prompt_buckets:
            for G in self.cfg.gen_buckets:
                k = self.key(self.cfg.schedule, self.cfg.settings, P, G)
                keys.append(k)
        return len(keys), self.batcher.warm(keys)

    def base_temperature(self, preset: str) -> float:
        if preset not in self._base_temp:
            s = self._schedule(preset, self.cfg.settings if preset == self.cfg.schedule else {},
                               self.cfg.gen_buckets[-1])
            self._base_temp[preset] = float(s.sampler.temperature)
        return self._base_temp[preset]

    # -- text ------------------------------------------------------------------------------------------------
    def _decode(self, ids) -> str:
        tok = self.cfg.tokenizer
        if tok is None:
            return " ".join(str(int(t)) for t in ids)
        return tok.decode([int(t) for t in ids], skip_special_tokens=True)

    def encode_prompt(self, body: dict, chat: bool) -> list:
        tok = self.cfg.tokenizer
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise ApiError("'messages' is required: a non-empty list of {role, content} objects", "messages")
            clean = []
            for i, m in enumerate(msgs):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                    raise ApiError(f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]")
                content = m.get("content")
                if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                               for p in content):
                        raise ApiError(f"messages[{i}].content parts must be text parts", f"messages[{i}].content")
                    content = "".join(p["text"] for p in content)
                if not isinstance(content, str):
                    raise ApiError(f"messages[{i}].content must be a string", f"messages[{i}].content")
                clean.append({"role": m["role"], "content": content})
            if tok is None or not getattr(tok, "chat_template", None):
                raise ApiError("this model has no chat template; use /v1/completions", "messages", status=400)
            try:
                ids = tok.apply_chat_template(clean, add_generation_prompt=True, tokenize=True)
            except Exception as e:  # the template rejected the conversation (e.g. roles it does not know)
                raise ApiError(f"the chat template rejected the messages: {e}", "messages") from None
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            return [int(t) for t in ids]
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if tok is None:
                raise ApiError("this model has no tokenizer: pass 'prompt' as a list of token ids", "prompt")
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            ids = prompt
        elif prompt is None:
            raise ApiError("'prompt' is required (a string or a list of token ids)", "prompt")
        else:
            raise ApiError("'prompt' must be one string or one list of token ids (batched prompts: send one "
                           "request each)", "prompt")
        V = self.cfg.model.cfg.vocab_size
        if not ids:
            raise ApiError("the prompt is empty", "prompt")
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ApiError(f"prompt token ids {bad[:5]} lie outside the vocabulary [0, {V})", "prompt")
        return [int(t) for t in ids]

    def parse(self, body, chat: bool) -> tuple[Request, dict]:
        if not isinstance(body, dict):
            raise ApiError("the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError("'model' is required", "model")
        if model != self.cfg.model_id:
            raise ApiError(f"unknown model {model!r}; this server serves {self.cfg.model_id!r}", "model",
                           "model_not_found")
        n = body.get("n", 1)
        if n != 1:
            raise ApiError("only n=1 is supported", "n")
        preset = body.get("schedule", self.cfg.schedule)
        if not isinstance(preset, str):
            raise ApiError("'schedule' must be a preset name", "schedule")
        settings = body.get("settings") or {}
        if not isinstance(settings, dict):
            raise ApiError("'settings' must be an object of preset arguments", "settings")
        settings = {**(self.cfg.settings if preset == self.cfg.schedule else {}), **settings}
        temp = body.get("temperature")
        if temp is not None:
            if isinstance(temp, bool) or not isinstance(temp, (int, float)) or temp < 0:
                raise ApiError(f"'temperature' must be a number >= 0, got {temp!r}", "temperature")
            if float(temp) != self.base_temperature(preset) or "temperature" in settings:
                settings["temperature"] = float(temp)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) if chat else body.get("max_tokens")
        if max_tokens is None:
            max_tokens = min(self.cfg.default_max_tokens, self.cfg.gen_buckets[-1])
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ApiError(f"'max_tokens' must be a positive integer, got {max_tokens!r}", "max_tokens")
        if max_tokens > self.cfg.gen_buckets[-1]:
            raise ApiError(f"max_tokens={max_tokens} exceeds the largest generation bucket "
                           f"{self.cfg.gen_buckets[-1]} of this server", "max_tokens", "max_tokens_too_large")
        G = min(g for g in self.cfg.gen_buckets if g >= max_tokens)
        seed = body.get("seed", 0)
        if seed is None:
            seed = 0
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 32:
            raise ApiError(f"'seed' must be an integer in [0, 2**32), got {seed!r}", "seed")
        stop = body.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise ApiError("'stop' must be a string or a list of up to 4 strings", "stop")
        stop_ids = body.get("stop_token_ids") or []
        if not isinstance(stop_ids, list) or not all(isinstance(t, int) for t in stop_ids):
            raise ApiError("'stop_token_ids' must be a list of token ids", "stop_token_ids")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError("'stream' must be a boolean", "stream")
        ids = self.encode_prompt(body, chat)
        P = prompt_bucket(len(ids))
        if P > self.cfg.prompt_buckets[-1]:
            raise ApiError(f"the prompt has {len(ids)} tokens; this server takes at most "
                           f"{self.cfg.prompt_buckets[-1]} (its largest prompt bucket)", "messages" if chat else
                           "prompt", "context_length_exceeded")
        key = self.key(preset, settings, P, G)
        req = Request(prompt_ids=ids, group_key=key, max_tokens=max_tokens, seed=seed, stop=tuple(stop),
                      stop_ids=frozenset(stop_ids), id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24])
        info = {"stream": stream, "schedule": preset, "settings": settings, "gen_length": G, "prompt_bucket": P,
                "prompt_tokens": len(ids)}
        return req, info

    # -- metrics ----------------------------------------------------------------------------------------------
    def metrics_text(self) -> str:
        s = self.batcher.snapshot()
        lines = []

        def metric(name, kind, help_, values):
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, v in values:
                lines.append(f"{name}{labels} {v}")

        outcomes = ("ok", "cancelled", "error", "rejected_invalid", "rejected_queue_full")
        metric("dllm_requests_total", "counter", "Requests by outcome.",
               [(f'{{outcome="{o}"}}', s["counts"].get(o, 0)) for o in outcomes])
        metric("dllm_requests_in_flight", "gauge", "Accepted requests not finished (queued or in a slot).",
               [("", s["in_flight"])])
        metric("dllm_queue_length", "gauge", "Requests waiting for a slot.", [("", s["queue"])])
        metric("dllm_slots_occupied", "gauge", "Slots holding a request.", [("", s["slots_occupied"])])
        metric("dllm_slots_total", "gauge", "Slots of all slot groups.", [("", s["slots_total"])])
        metric("dllm_generated_tokens_total", "counter", "Generated tokens of finished requests.",
               [("", s["tokens_total"])])
        metric("dllm_forwards_total", "counter", "Forward passes (NFE) of finished requests, per request row.",
               [("", s["forwards_total"])])
        metric("dllm_nfe_per_token", "gauge", "Forwards per generated token (finished requests).",
               [("", round(s["forwards_total"] / max(s["tokens_total"], 1), 4))])
        metric("dllm_generated_tokens_per_second", "gauge", "Generated tokens/s over the last 30 s.",
               [("", round(s["tokens_per_s"], 3))])
        metric("dllm_loop_chunks_total", "counter", "Device calls of the denoising loop.", [("", s["chunks"])])
        metric("dllm_compilations_total", "counter", "Compiled loop programs.", [("", s["compilations"])])
        return "\n".join(lines) + "\n"


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="dllm-jax", docs_url=None, redoc_url=None)
    mid = server.cfg.model_id
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return error_response(e)

    @app.get("/health")
    async def health():
        if server.batcher.error is not None:
            return JSONResponse({"status": "error", "error": str(server.batcher.error)}, status_code=500)
        return {"status": "ok", "model": mid}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": mid, "object": "model", "created": created, "owned_by": "dllm-jax"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics_text(), media_type="text/plain; version=0.0.4")

    async def handle(http: HttpRequest, chat: bool):
        try:
            try:
                body = json.loads(await http.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ApiError(f"the request body is not valid JSON ({e})") from None
            req, info = server.parse(body, chat)
        except ApiError as e:
            with server.batcher.cv:
                server.batcher.metrics.counts["rejected_invalid"] += 1
            return error_response(e)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req.sink = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
        try:
            server.batcher.submit(req)
        except QueueFull as e:
            return error_response(ApiError(str(e), None, "queue_full", 429, "rate_limit_error"))
        if info["stream"]:
            return StreamingResponse(_stream(server, req, info, events, chat), media_type="text/event-stream")
        return await _complete(server, http, req, info, events, chat)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await handle(http, True)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await handle(http, False)

    return app


def _extras(req: Request, info: dict, stats: dict) -> dict:
    return {**stats, "schedule": info["schedule"], "settings": info["settings"], "gen_length": info["gen_length"],
            "prompt_bucket": info["prompt_bucket"]}


def _usage(info, stats):
    return {"prompt_tokens": info["prompt_tokens"], "completion_tokens": stats["completion_tokens"],
            "total_tokens": info["prompt_tokens"] + stats["completion_tokens"]}


async def _complete(server: Server, http: HttpRequest, req: Request, info, events, chat):
    text, final = [], None
    try:
        while final is None:
            try:
                ev = await asyncio.wait_for(events.get(), 0.5)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    server.batcher.cancel(req)
                    return JSONResponse({}, status_code=499)
                continue
            if "error" in ev:
                server.batcher.cancel(req)
                return error_response(ApiError(ev["error"], status=500, type_="server_error"))
            if "text" in ev:
                text.append(ev["text"])
            if ev.get("done"):
                final = ev
    except asyncio.CancelledError:
        server.batcher.cancel(req)
        raise
    stats, content = final["stats"], final["text_all"]
    created = int(time.time())
    model = server.cfg.model_id
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": content},
                  "finish_reason": final["finish_reason"], "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": content, "finish_reason": final["finish_reason"], "logprobs": None}
        obj = "text_completion"
    return JSONResponse({"id": req.id, "object": obj, "created": created, "model": model, "choices": [choice],
                         "usage": _usage(info, stats), "dllm": _extras(req, info, stats)})


async def _stream(server: Server, req: Request, info, events, chat):
    created = int(time.time())
    model = server.cfg.model_id
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text=None, finish=None, role=False, **extra):
        if chat:
            delta = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return _sse({"id": req.id, "object": obj, "created": created, "model": model, "choices": [choice], **extra})

    try:
        if chat:
            yield chunk("", role=True)
        while True:
            ev = await events.get()
            if "error" in ev:
                yield _sse({"error": {"message": ev["error"], "type": "server_error", "param": None, "code": None}})
                return
            if "text" in ev:
                yield chunk(ev["text"])
            if ev.get("done"):
                if ev["finish_reason"] == "cancelled":
                    return
                stats = ev["stats"]
                yield chunk(None if chat else "", finish=ev["finish_reason"], usage=_usage(info, stats),
                            dllm=_extras(req, info, stats))
                yield "data: [DONE]\n\n"
                return
    finally:
        if not req.done:
            server.batcher.cancel(req)  # the client went away mid-stream: free the slot
