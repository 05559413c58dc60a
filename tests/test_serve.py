"""`dllm-jax serve`: a real server in a subprocess on 127.0.0.1 (embedded model), the official `openai` client and raw
HTTP (httpx). Every answer is compared with `dllm_jax.generate` on the request alone (same schedule, seed, buckets).

The server runs fastdllm_dual (threshold 0.8, block 8) with temperature 0.7, so every request samples with its own
seed: exactness then also covers the per-row PRNG steps of slots that joined late."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import dllm_jax  # noqa: E402
from dllm_jax.cli import default_model_path  # noqa: E402
from dllm_jax.generate import generate  # noqa: E402
from dllm_jax.presets import make_schedule  # noqa: E402

MODEL = "dllm-jax-default"
SETTINGS = {"block_length": 8, "threshold": 0.8, "temperature": 0.7}
GEN_BUCKETS = (16, 32)
SERVER_ARGS = ["--schedule", "fastdllm_dual", "--set", "block_length=8", "--set", "threshold=0.8", "--set",
               "temperature=0.7", "--prompt-buckets", "32", "--gen-buckets", "16,32", "--slots", "4",
               "--max-queue", "16", "--chunk", "2", "--batch-sizes", "none"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"dllm_serve_{port}.log"), "w+")
    proc = subprocess.Popen([sys.executable, "-m", "dllm_jax.serve.server", "--port", str(port), *SERVER_ARGS],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read()}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError("server did not come up")
        time.sleep(0.5)
    yield {"base": base, "proc": proc, "log": log}
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def ref():
    """reference(ids, max_tokens, seed, threshold) -> (token ids, finish_reason) of `generate` on the request alone."""
    from transformers import AutoTokenizer

    model = dllm_jax.load(default_model_path())
    tok = AutoTokenizer.from_pretrained(model.tokenizer_path)
    cache = {}

    def reference(ids, max_tokens, seed=0, threshold=0.8, temperature=0.7):
        key = (tuple(ids), max_tokens, seed, threshold, temperature)
        if key not in cache:
            G = min(g for g in GEN_BUCKETS if g >= max_tokens)
            sched = make_schedule("fastdllm_dual", G, model.cfg,
                                  **{**SETTINGS, "threshold": threshold, "temperature": temperature})
            gen = generate(model, [ids], gen_length=G, schedule=sched, seed=seed).generated[0][:max_tokens]
            eos = np.flatnonzero(gen == model.cfg.eos_token_id)
            cache[key] = ([int(t) for t in gen[: eos[0]]], "stop") if eos.size else ([int(t) for t in gen], "length")
        return cache[key]

    reference.tok = tok
    reference.chat_ids = lambda text: [int(t) for t in _ids(tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True))]
    reference.text_ids = lambda text: [int(t) for t in tok(text, add_special_tokens=False)["input_ids"]]
    reference.decode = lambda ids: tok.decode(ids, skip_special_tokens=True)
    return reference


def _ids(x):
    return x["input_ids"] if hasattr(x, "keys") else x


def _client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def _metrics(server) -> dict:
    out = {}
    for line in httpx.get(server["base"] + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, val = line.rsplit(" ", 1)
            out[name] = float(val)
    return out


def _wait_idle(server, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = _metrics(server)
        if m["dllm_requests_in_flight"] == 0 and m["dllm_slots_occupied"] == 0 and m["dllm_queue_length"] == 0:
            return m
        time.sleep(0.2)
    raise AssertionError(f"server not idle: {m}")


def test_models_health_and_metrics(server):
    assert httpx.get(server["base"] + "/health").json()["status"] == "ok"
    assert [m.id for m in _client(server).models.list().data] == [MODEL]
    m = _metrics(server)
    assert m["dllm_slots_total"] == 4 * 2  # 4 slots x 2 gen buckets (prompt bucket 32), compiled at start
    assert m["dllm_compilations_total"] == 2  # one batch size (4) per group (the smaller ones: tests/test_continuous.py)


def test_openai_client_chat_and_completions(server, ref):
    c = _client(server)
    q = "What is 12+7?"
    ids = ref.chat_ids(q)
    want, reason = ref(ids, 24, seed=5)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=24, seed=5)
    assert r.choices[0].message.content == ref.decode(want) and r.choices[0].finish_reason == reason
    extra = r.model_extra["dllm"]
    assert extra["token_ids"] == want and extra["gen_length"] == 32 and extra["prompt_bucket"] == 32
    assert extra["nfe"] > 0 and extra["ttft_s"] <= extra["latency_s"] and extra["queue_s"] >= 0
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want)

    # streaming: the finalised prefix grows chunk by chunk and adds up to the same answer
    chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=24,
                                            seed=5, stream=True))
    texts = [ch.choices[0].delta.content for ch in chunks if ch.choices[0].delta.content]
    assert len(texts) >= 2, texts
    assert "".join(texts) == ref.decode(want)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == reason
    assert chunks[-1].model_extra["dllm"]["token_ids"] == want

    # completions with a token-id prompt, a dynamic setting (its own slot group, same program) and a stop string
    p = ref.text_ids("Question: 3*4=? Answer:")
    want, reason = ref(p, 16, seed=9, threshold=0.6)
    r = c.completions.create(model=MODEL, prompt=p, max_tokens=16, seed=9, extra_body={"settings": {"threshold": 0.6}})
    assert r.choices[0].text == ref.decode(want) and r.model_extra["dllm"]["token_ids"] == want
    text = ref.decode(want)
    if len(text) > 3:
        stop = text[2:4]
        r = c.completions.create(model=MODEL, prompt=p, max_tokens=16, seed=9, stop=[stop],
                                 extra_body={"settings": {"threshold": 0.6}})
        assert r.choices[0].text == text[: text.find(stop)] and r.choices[0].finish_reason == "stop"
    assert _metrics(server)["dllm_compilations_total"] == 2  # nothing recompiled


def test_load_64_requests_16_clients_exact(server, ref):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "12+30", "what is", "7*8", "gamma delta", "sum", "x"]
    jobs = []
    for i in range(64):
        n_chars = int(rng.integers(1, 27))  # prompts of 1-27 characters (+ the chat template): bucket 32
        text = ""
        while len(text) < n_chars:
            text += rng.choice(words) + " "
        text = text[:n_chars]
        jobs.append(dict(i=i, text=text, chat=bool(i % 2), stream=bool((i // 2) % 2),
                         max_tokens=int(rng.choice([5, 12, 16, 20, 32])), seed=int(rng.integers(0, 1000))))
    for j in jobs:  # references first (the server stays idle meanwhile)
        j["ids"] = ref.chat_ids(j["text"]) if j["chat"] else ref.text_ids(j["text"])
        j["want"] = ref(j["ids"], j["max_tokens"], j["seed"])
    assert len({len(j["ids"]) for j in jobs}) >= 16  # mixed prompt lengths (different left padding)
    assert {16 if j["max_tokens"] <= 16 else 32 for j in jobs} == {16, 32}  # both gen buckets: two slot groups
    c = _client(server)

    def run(j):
        kw = dict(model=MODEL, max_tokens=j["max_tokens"], seed=j["seed"])
        if j["chat"]:
            call = lambda **k: c.chat.completions.create(messages=[{"role": "user", "content": j["text"]}], **k)  # noqa
        else:
            call = lambda **k: c.completions.create(prompt=j["text"], **k)  # noqa
        if j["stream"]:
            chunks = list(call(stream=True, **kw))
            get = (lambda ch: ch.choices[0].delta.content) if j["chat"] else (lambda ch: ch.choices[0].text)
            text = "".join(get(ch) or "" for ch in chunks)
            return text, chunks[-1].model_extra["dllm"]["token_ids"], chunks[-1].choices[0].finish_reason
        r = call(**kw)
        text = r.choices[0].message.content if j["chat"] else r.choices[0].text
        return text, r.model_extra["dllm"]["token_ids"], r.choices[0].finish_reason

    t0 = time.time()
    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(run, jobs))
    wall = time.time() - t0
    for j, (text, token_ids, reason) in zip(jobs, results):
        want, want_reason = j["want"]
        assert token_ids == want, (j, token_ids)
        assert text == ref.decode(want) and reason == want_reason, j
    assert wall < 120, f"64 requests took {wall:.1f}s"
    m = _wait_idle(server)
    assert m["dllm_requests_total{outcome=\"ok\"}"] >= 64
    assert m["dllm_compilations_total"] == 2


@pytest.mark.parametrize("body,param", [
    (b"{not json", None),
    (json.dumps({"prompt": "hi"}).encode(), "model"),
    (json.dumps({"model": "nope", "prompt": "hi"}).encode(), "model"),
    (json.dumps({"model": MODEL}).encode(), "prompt"),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 33}).encode(), "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": "x" * 70}).encode(), "prompt"),
    (json.dumps({"model": MODEL, "prompt": "hi", "temperature": -0.5}).encode(), "temperature"),
    (json.dumps({"model": MODEL, "prompt": "hi", "schedule": "no_such_preset"}).encode(), "schedule"),
    (json.dumps({"model": MODEL, "prompt": "hi", "settings": {"not_a_key": 1}}).encode(), "settings"),
    (json.dumps({"model": MODEL, "prompt": "hi", "schedule": "blockbatch"}).encode(), "schedule"),
    (json.dumps({"model": MODEL, "prompt": [1, 2, 999]}).encode(), "prompt"),
])
def test_bad_input_is_400_with_openai_error(server, body, param):
    r = httpx.post(server["base"] + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and len(err["message"]) > 10


def test_bad_chat_messages_and_server_keeps_serving(server, ref):
    for msgs in (None, [], [{"content": "hi"}], [{"role": "user", "content": 5}]):
        r = httpx.post(server["base"] + "/v1/chat/completions", json={"model": MODEL, "messages": msgs})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages"), r.text
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        _client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=1000)
    r = _client(server).completions.create(model=MODEL, prompt="ok", max_tokens=8, seed=1)
    assert r.model_extra["dllm"]["token_ids"] == ref(ref.text_ids("ok"), 8, 1)[0]


def test_new_temperature_compiles_on_demand(server, ref):
    """A temperature the server did not compile for is one more program, compiled on first use, then reused."""
    c = _client(server)
    p = ref.text_ids("greedy please")
    want = ref(p, 8, 0, temperature=0.0)[0]
    for _ in range(2):
        r = c.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0)
        assert r.model_extra["dllm"]["token_ids"] == want
    assert _metrics(server)["dllm_compilations_total"] == 3


def test_client_disconnect_frees_the_slot(server):
    before = _metrics(server)['dllm_requests_total{outcome="cancelled"}']
    # one token per forward and a prompt with a long answer (a sort: the default model's best task, not cut short by
    # an early EOS; run 7 writes 20 tokens): the request outlives the first chunks
    body = {"model": MODEL, "prompt": "Sort the digits: 90731826451", "max_tokens": 32,
            "stream": True, "settings": {"threshold": 1.0}}
    for _ in range(3):
        with httpx.Client(timeout=30) as h, h.stream("POST", server["base"] + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # first SSE line, then hang up
        m = _wait_idle(server)
        if m['dllm_requests_total{outcome="cancelled"}'] > before:
            break
    assert m['dllm_requests_total{outcome="cancelled"}'] > before, "the server never noticed a disconnect"


def test_full_queue_is_429(server, ref):
    body = {"model": MODEL, "prompt": "queue me", "max_tokens": 32, "seed": 3, "settings": {"threshold": 1.0}}

    def post(_):
        with httpx.Client(timeout=120) as h:
            return h.post(server["base"] + "/v1/completions", json=body)

    with ThreadPoolExecutor(40) as ex:  # 4 slots + 16 queued fit; the rest must be refused, not dropped
        rs = list(ex.map(post, range(40)))
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 20, codes
    err = next(r for r in rs if r.status_code == 429).json()["error"]
    assert err["type"] == "rate_limit_error" and "queue is full" in err["message"]
    want = ref(ref.text_ids("queue me"), 32, 3, threshold=1.0)[0]
    assert all(r.json()["dllm"]["token_ids"] == want for r in rs if r.status_code == 200)
    assert _metrics(server)['dllm_requests_total{outcome="rejected_queue_full"}'] >= 1
    _wait_idle(server)


def test_sigterm_drains_in_flight_requests(server, ref):
    """Last test of the module: SIGTERM with 8 streams in flight (4 running, 4 queued); all finish, exit 0."""
    proc, base = server["proc"], server["base"]
    body = {"model": MODEL, "max_tokens": 32, "stream": True, "settings": {"threshold": 1.0}}
    started = threading.Barrier(9)
    out = {}

    def stream(i):
        text, done, ids = "", False, None
        with httpx.Client(timeout=120) as h, h.stream("POST", base + "/v1/completions",
                                                      json={**body, "prompt": f"drain {i}", "seed": i}) as r:
            assert r.status_code == 200  # headers: the request is accepted (in a slot or queued)
            started.wait()
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    ch = json.loads(line[6:])
                    text += ch["choices"][0]["text"]
                    ids = ch.get("dllm", {}).get("token_ids", ids)
        out[i] = (text, done, ids)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    started.wait(timeout=60)
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    assert proc.wait(60) == 0
    for i in range(8):
        text, done, ids = out[i]
        want = ref(ref.text_ids(f"drain {i}"), 32, i, threshold=1.0)[0]
        assert done and ids == want and text == ref.decode(want), (i, out[i])
    server["log"].seek(0)
    assert "stopped after" in server["log"].read()


def test_gen_buckets_follow_the_model_unless_given(fixtures):
    """The embedded model declares a 128-token canvas (its code answers need it): `dllm-jax serve` with no
    --gen-buckets compiles it beside 32 and 64 and uses it for requests without max_tokens; a model that declares
    nothing keeps 32,64 / 64; explicit flags win."""
    from dllm_jax.serve.server import build_parser, model_gen_defaults

    default_cfg = dllm_jax.load(default_model_path()).cfg
    assert model_gen_defaults(default_cfg, None, None) == ((32, 64, 128), 128)
    assert model_gen_defaults(default_cfg, (16, 32), None) == ((16, 32), 32)
    assert model_gen_defaults(default_cfg, None, 40) == ((32, 64, 128), 40)
    tiny_cfg = dllm_jax.load(str(fixtures / "llada_tiny")).cfg  # a converted HF checkpoint: declares nothing
    assert tiny_cfg.get("default_gen_length") is None
    assert model_gen_defaults(tiny_cfg, None, None) == ((32, 64), 64)
    a = build_parser().parse_args([])
    assert a.gen_buckets is None and a.default_max_tokens is None


def test_bad_prompt_buckets_refused_before_the_model_loads():
    from dllm_jax.serve.server import build_parser, make_server

    with pytest.raises(ValueError, match="multiples of 32"):
        make_server(build_parser().parse_args(["--prompt-buckets", "32,33"]))
