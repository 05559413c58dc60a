"""`dllm-jax eval`: metrics of a schedule on the task suite (random tiny model: the numbers, not the skill)."""

import json

import jax
import pytest

import dllm_jax
from dllm_jax import checkpoint, evaluate, train
from dllm_jax.models.transformer import init_params


@pytest.fixture(scope="module")
def tiny_char_model(tmp_path_factory):
    cfg = train.model_config(train.get_preset("tiny"))
    params = init_params(cfg, jax.random.key(0))
    d = tmp_path_factory.mktemp("m") / "tiny"
    d.mkdir()
    checkpoint.save_converted(str(d), cfg, params)
    from dllm_jax.tokenizer import save

    save(str(d))
    return str(d)


def test_evaluate_schedule_metrics(tiny_char_model):
    model = dllm_jax.load(tiny_char_model)
    vanilla = evaluate.evaluate_schedule(model, "vanilla", dict(block_length=32), ["sort"], n=4, batch_size=4,
                                         eos_stop=False)
    fast = evaluate.evaluate_schedule(model, "fastdllm_dual", dict(block_length=32, threshold=0.01), ["sort"], n=4,
                                      batch_size=4, eos_stop=False)
    t = vanilla["tasks"]["sort"]
    g = evaluate.gen_length_for("sort")
    assert t["n"] == 4 and 0.0 <= t["accuracy"] <= 1.0
    assert t["mean_nfe"] == g  # one token per forward, no early stop
    assert fast["tasks"]["sort"]["mean_nfe"] < g
    assert t["tokens_per_s"] > 0 and t["tpf"] <= 1.0 + 1e-9


def test_eval_cli_writes_outputs(tiny_char_model, tmp_path):
    out = tmp_path / "res"
    rc = evaluate.main(["--model", tiny_char_model, "--schedule", "fastdllm", "--set", "threshold=0.9",
                        "--set", "block_length=32", "--tasks", "sort", "--n", "2", "--batch-size", "2",
                        "--out", str(out)])
    assert rc == 0
    data = json.loads((tmp_path / "res.json").read_text())
    assert data["results"][0]["preset"] == "fastdllm" and data["results"][0]["kwargs"]["threshold"] == 0.9
    assert "| fastdllm |" in (tmp_path / "res.md").read_text()


def test_eval_missing_model_is_clear(tmp_path, capsys):
    assert evaluate.main(["--model", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
