"""`dllm-jax` command line: sub-command delegation, `generate --show-steps` and its per-position step trace."""

import importlib

import numpy as np
import pytest

from dllm_jax import cli
from dllm_jax.presets import make_schedule

generate = importlib.import_module("dllm_jax.generate").generate


def test_delegated_subcommand_takes_leading_options(tmp_path, capsys):
    # `dllm-jax train --preset default` used to die in argparse ("unrecognized arguments: --preset")
    assert cli.main(["eval", "--model", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--preset", "no-such-preset"])
    assert e.value.code == 2
    assert "invalid choice: 'no-such-preset'" in capsys.readouterr().err


def test_trace_step_of_matches_commit_counts(llada_model):
    sched = make_schedule("fastdllm", 16, llada_model.cfg, threshold=0.5, block_length=8)
    out = generate(llada_model, [[1, 2, 3, 4]], gen_length=16, schedule=sched, trace=True)
    step_of = out.trace["step_of"][0]
    assert np.all(step_of[:out.prompt_len] == -1)  # the prompt is never "filled"
    gen_steps = step_of[out.prompt_len:]
    assert np.all(gen_steps >= 0) and gen_steps.max() == int(out.nfe[0]) - 1
    counts = np.bincount(gen_steps, minlength=int(out.nfe[0]))
    np.testing.assert_array_equal(counts, out.trace["n"][:int(out.nfe[0]), 0])
    # semi-autoregressive blocks: every position of block 2 is filled after every position of block 1
    assert gen_steps[:8].max() < gen_steps[8:].min()


def test_render_steps_marks_new_positions():
    ids = np.array([10, 11, 12, 0, 0])
    step_of = np.array([1, 0, 1, 2, 2])
    lines = cli.render_steps(ids, step_of, lambda t: chr(ord("a") + t - 10), eos_id=0)
    assert len(lines) == 3
    assert lines[0].endswith("| \u00b7[b]\u00b7\u00b7\u00b7") and "+1 " in lines[0]
    assert lines[1].endswith("| [a]b[c]\u00b7\u00b7") and "+2 " in lines[1]
    assert lines[2].endswith("| abc[\u220e][\u220e]")
    colored = cli.render_steps(ids, step_of, lambda t: "x", color=True)
    assert "\x1b[1;32m" in colored[0]


def test_cli_show_steps(fixtures, capsys):
    argv = ["generate", "--model", str(fixtures / "llada_tiny"), "--ids", "1,2,3", "--gen-length", "8",
            "--schedule", "llada", "--steps", "4", "--block-length", "8", "--show-steps"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.strip().split("\n")
    steps = [ln for ln in out if ln.startswith("step ")]
    assert len(steps) == 4 and all("+2 " in ln for ln in steps)  # 8 tokens in 4 steps: 2 per step
    assert steps[0].count("[") == 2 and steps[-1].count("\u00b7") == 0


def test_set_value_lists_and_bad_lists():
    assert cli._parse_value("[4,8,16]") == [4, 8, 16] and cli._parse_value("(7,)") == [7]
    with pytest.raises(ValueError, match="cannot parse '\\[4,,8\\]' as a list"):
        cli._parse_value("[4,,8]")


def test_cli_bad_set_list_is_one_clear_error(fixtures, capsys):
    argv = ["generate", "--model", str(fixtures / "llada_tiny"), "--ids", "1,2,3", "--gen-length", "8",
            "--schedule", "blockbatch", "--set", "block_sizes=[4,,8]"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot parse" in err and "Traceback" not in err


def test_cli_d2f_block_causal_with_lora(fixtures, llada_model, tmp_path, capsys):
    """`generate --lora ADAPTER --block-causal 8 --schedule d2f` = the API on the merged, block-causal model (the CLI
    fills in attention=block_causal and the block length)."""
    import importlib

    import numpy as np

    import dllm_jax
    from dllm_jax.presets import make_schedule
    from test_lora import make_adapter

    make_adapter(tmp_path / "ad", llada_model, ["q_proj", "v_proj"])
    argv = ["generate", "--model", str(fixtures / "llada_tiny"), "--ids", "11,23,5,77", "--gen-length", "16",
            "--schedule", "d2f", "--block-causal", "8", "--lora", str(tmp_path / "ad"), "--set", "cache=pipeline",
            "--set", "tau_conf=0.5"]
    assert cli.main(argv) == 0
    printed = [int(t) for t in capsys.readouterr().out.split()]
    model = dllm_jax.load(str(fixtures / "llada_tiny"), lora=str(tmp_path / "ad")).with_block_causal(8)
    sched = make_schedule("d2f", 16, model.cfg, block_length=8, attention="block_causal", cache="pipeline",
                          tau_conf=0.5)
    want = importlib.import_module("dllm_jax.generate").generate(model, [[11, 23, 5, 77]], gen_length=16,
                                                                  schedule=sched)
    assert printed == [int(t) for t in want.generated[0]]
    base = importlib.import_module("dllm_jax.generate").generate(llada_model.with_block_causal(8), [[11, 23, 5, 77]],
                                                                 gen_length=16, schedule=sched)
    assert not np.array_equal(base.generated, want.generated)  # the adapter took effect
    assert cli.main(argv[:-4] + ["--lora", str(tmp_path / "nothing")]) == 2
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("schedule", ["d2f", "compose", "localleap"])
def test_cli_set_cache_none(fixtures, capsys, schedule):
    """`--set cache=none` (parsed as None) selects the no-cache policy in every preset that takes a cache name."""
    argv = ["generate", "--model", str(fixtures / "llada_tiny"), "--ids", "1,2,3", "--gen-length", "16",
            "--schedule", schedule, "--block-length", "8", "--set", "cache=none"]
    assert cli.main(argv) == 0, capsys.readouterr().err


@pytest.mark.parametrize("extra,msg", [
    (["--block-causal", "-1", "--schedule", "d2f"], "block_length must be >= 0"),
    (["--schedule", "compose", "--set", "window=d2f", "--set", "accept=d2f", "--set", "tau_add=2"],
     "tau_add must lie in [0, 1]"),
    (["--schedule", "d2f", "--set", "tau_conf=0"], "tau_conf in (0, 1]"),
])
def test_cli_bad_d2f_arguments_are_one_clear_error(fixtures, capsys, extra, msg):
    argv = ["generate", "--model", str(fixtures / "llada_tiny"), "--ids", "1,2,3", "--gen-length", "16",
            "--block-length", "8"] + extra
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_eval_bad_set_items_are_one_clear_error(capsys):
    from dllm_jax import evaluate

    for bad, msg in (("threshold", "--set expects KEY=VALUE"), ("block_sizes=[4,,8]", "cannot parse")):
        assert evaluate.main(["--task", "sort", "--limit", "1", "--set", bad]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err
