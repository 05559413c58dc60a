"""A new user's first hour (issue 14): every mistake gets one clear line, never a traceback; nothing is silently
accepted; the commands print what they do."""

import os
import subprocess
import sys

import pytest

from dllm_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_error_line(err: str, *needles):
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errs = [ln for ln in lines if "error:" in ln]
    assert len(errs) == 1, err
    for n in needles:
        assert n in errs[0], f"{n!r} not in {errs[0]!r}"
    assert "usage:" not in err, err  # the error alone, not the whole usage first


def run_cli(argv, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("prompt,answer", [
    ("Sort the digits: 8558910657529830946319", "0011233455556678889999"),
    ("What is 12 + 35?", "012+035=047\n#### 047"),
    # a held-out code prompt: its answer (65 characters) does not fit the old default canvas of 64
    ("Write h(k, q): if k is equal to q give k minus q, else give k plus k.",
     "def h(k, q):\n    if k == q:\n        return k - q\n    return k + k"),
])
def test_generate_answers_each_task_with_the_defaults(prompt, answer, capsys):
    """`dllm-jax generate "..."` with no option: the embedded model's canvas is its `default_gen_length` (128),
    long enough for every task's answer, and the answer is right (issue 16)."""
    rc, out, err = run_cli(["generate", prompt], capsys)
    assert rc == 0, err
    assert out.strip() == answer, out
    assert "NFE [128]" in err, err


def test_bench_missing_model_and_unknown_preset(tmp_path, capsys):
    rc, _, err = run_cli(["bench", "--preset", "quick", "--model", str(tmp_path / "nonexistent")], capsys)
    assert rc == 2
    one_error_line(err, "nonexistent", "no such checkpoint directory")
    rc, _, err = run_cli(["bench", "--preset", "nosuch"], capsys)
    assert rc == 2
    one_error_line(err, "invalid choice: 'nosuch'", "--help")


def test_generate_kernel_not_available_on_cpu(capsys):
    rc, _, err = run_cli(["generate", "Sort the digits: 321", "--attention", "pallas_gpu", "--gen-length", "32"], capsys)
    assert rc == 2
    one_error_line(err, "pallas_gpu")


@pytest.mark.parametrize("argv, needles", [
    (["--threshold", "0.7"], ["does not take threshold", "fastdllm_dual", "block_length"]),
    (["--set", "nosuch_key=3"], ["does not take nosuch_key", "it takes:", "block_length", "temperature"]),
    (["--schedule", "fastdllm", "--set", "threshold=abc"], ["threshold must be a number", "'abc'"]),
    (["--gen-length", "50"], ["gen_length (50) must be divisible by block_length (32)", "--block-length 50 / 25",
                              "--gen-length 32 / 64"]),
    (["--schedule", "nosuch"], ["unknown preset 'nosuch'", "vanilla"]),
])
def test_schedule_argument_errors_say_what_would_do(argv, needles, capsys):
    rc, _, err = run_cli(["generate", "Sort the digits: 321", *argv], capsys)
    assert rc == 2
    one_error_line(err, *needles)


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_an_error(prompt, capsys):
    rc, _, err = run_cli(["generate", prompt], capsys)
    assert rc == 2
    one_error_line(err, "prompt is empty")


def test_unknown_characters_warn_and_no_torch_notice():
    """Emoji / non-ASCII become <|unk|> with the character tokenizer: say so. And transformers' 'PyTorch was not
    found' notice is not printed by our commands (run in a fresh process: the notice is printed at import)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
    r = subprocess.run([sys.executable, "-m", "dllm_jax.cli", "generate", "Sort the digits: 3\u00e91\U0001F600",
                        "--gen-length", "32"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "PyTorch was not found" not in r.stderr, r.stderr
    warn = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and "2 character(s)" in warn[0] and "'\u00e9'" in warn[0] and "<|unk|>" in warn[0], r.stderr


def test_presets_describe_every_preset(capsys):
    from dllm_jax.presets import PRESETS, describe

    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        d = describe(name)
        assert len(d) >= 40, (name, d)  # a real description, not an empty or truncated line
        assert d.rstrip().endswith((".", ")", "`")), (name, d)  # whole sentences
        assert f"\n{name} " in "\n" + out
    assert "no description" not in out


def test_make_schedule_and_generate_are_documented():
    from dllm_jax.generate import generate
    from dllm_jax.presets import make_schedule

    doc = make_schedule.__doc__
    assert "gen_length" in doc and "preset_args" in doc and "PresetError" in doc
    gdoc = generate.__doc__
    for word in ("sequences", "nfe", "gen_lengths", "trace", "mesh", "block"):
        assert word in gdoc, word


def test_ci_runs_the_readme_commands_and_checks_the_answer():
    sys.path.insert(0, os.path.join(ROOT, ".ci"))
    try:
        import newcomer
    finally:
        sys.path.pop(0)
    main_cmd, test_cmd = newcomer.readme_commands()
    assert main_cmd.startswith("pip install -e . && dllm-jax generate")  # no extras for the main job
    assert "pytest" in test_cmd and '".[test]"' in test_cmd
    cmd = 'dllm-jax generate "Sort the digits: 3120"'
    stats = "[vanilla] NFE [64]  generated 4 tokens  run 0.1s (40.0 tok/s)  compile 1.00s"
    newcomer.check_main_output(cmd, "Successfully installed dllm-jax\n0123\n", stats)
    for out, err in [("0132\n", stats), ("", stats), ("0123\n", "Traceback (most recent call last):\n" + stats),
                     ("0123\n", "no stats")]:
        with pytest.raises(SystemExit):
            newcomer.check_main_output(cmd, out, err)


def test_eval_names_its_metrics_and_shows_progress(capsys):
    """`dllm-jax eval` prints exact match AND character accuracy, named, and a progress bar while it runs."""
    from dllm_jax import evaluate

    rc = evaluate.main(["--task", "sort", "--limit", "4", "--batch-size", "2", "--block-length", "32"])
    assert rc == 0
    out, err = capsys.readouterr()
    line = [ln for ln in out.splitlines() if ln.startswith("vanilla")][0]
    assert "exact match sort" in line and "character accuracy sort" in line and "n=4/task" in line, line
    assert "eval vanilla" in err and "2/2" in err, err  # tqdm bar over the two batches


def test_conformance_counts_matches_and_warns_on_family_mismatch(fixtures, tmp_path, capsys):
    import json

    from dllm_jax import conformance

    cases = json.loads((fixtures / "dream_generate.json").read_text())
    small = {"meta": cases["meta"], "cases": cases["cases"][:2]}
    cf = tmp_path / "cases.json"
    cf.write_text(json.dumps(small))
    out = tmp_path / "out.json"
    assert conformance.main(["--checkpoint", str(fixtures / "dream_tiny"), "--cases", str(cf), "--out", str(out)]) == 0
    o, e = capsys.readouterr()
    assert "2 cases: 2 match" in o and "warning" not in e
    assert conformance.main(["--checkpoint", str(fixtures / "llada_tiny"), "--cases", str(cf), "--out", str(out)]) == 0
    o, e = capsys.readouterr()
    assert "produced on a dream checkpoint" in e and "is a llada model" in e
    assert "2 differs" in o and "differs: " in o
    # held-out files without answers: counted as such, not as matches
    for c in small["cases"]:
        c.pop("output")
    cf.write_text(json.dumps(small))
    assert conformance.main(["--checkpoint", str(fixtures / "dream_tiny"), "--cases", str(cf), "--out", str(out)]) == 0
    assert "2 no expected output" in capsys.readouterr().out
