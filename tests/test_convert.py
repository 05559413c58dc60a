"""HF -> dllm-jax converter (convert.hf_to_flax): round trips, sharded and bf16 sources, and every bad input."""

import json
import os
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

import dllm_jax
from convert import hf_to_flax
from dllm_jax import hf_weights
from dllm_jax.hf_weights import CheckpointError

BF16 = np.dtype(ml_dtypes.bfloat16)
_ST_TAG = {np.dtype(np.float32): "F32", BF16: "BF16", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32"}
IDS = np.array([[3, 17, 250, 296, 296, 42, 7, 290], [1, 2, 3, 4, 296, 296, 296, 9]], np.int32)


# ----------------------------------------------------------------------------------------------------------- helpers
def write_safetensors(path, tensors: dict) -> None:
    """Write a safetensors file by hand (works for bf16 whatever the installed safetensors supports)."""
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name, a in tensors.items():
        b = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": _ST_TAG[np.dtype(a.dtype)], "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)


def hf_copy(fixtures, fam, dst, tensors=None, config_edit=None):
    """Copy a tiny fixture checkpoint to dst, optionally replacing its tensors / editing its config."""
    src = fixtures / f"{fam}_tiny"
    shutil.copytree(src, dst)
    if tensors is not None:
        os.remove(dst / "model.safetensors")
        write_safetensors(dst / "model.safetensors", tensors)
    if config_edit is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config_edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def split_shards(ckpt, n=3):
    """Turn ckpt/model.safetensors into n shards + model.safetensors.index.json."""
    tensors = load_file(str(ckpt / "model.safetensors"))
    os.remove(ckpt / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i in range(n):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: tensors[k] for k in names[i::n]}
        write_safetensors(ckpt / fname, part)
        weight_map.update({k: fname for k in part})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sorted(set(weight_map.values()))


def run(argv, capsys):
    rc = hf_to_flax.main([str(a) for a in argv] + ["--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def leftovers(dst):
    """Anything the converter may have left beside dst: dst itself, its temp dir, a swapped-out old dst."""
    parent, name = os.path.dirname(dst), os.path.basename(dst)
    if not os.path.isdir(parent):
        return []
    return sorted(f for f in os.listdir(parent) if f == name or f.startswith(f".{name}.tmp-") or
                  f.startswith(f".{name}.old-"))


def flat(params):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}


def assert_bit_identical(a_params, b_params):
    a, b = flat(a_params), flat(b_params)
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert x.tobytes() == y.tobytes(), f"{k} differs"


def assert_failed_cleanly(rc, err, dst, *needles):
    assert rc == 2
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and "error:" in lines[-1] and sum("error:" in ln for ln in lines) == 1, err  # one message, last
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"
    assert leftovers(str(dst)) == [], leftovers(str(dst))


# -------------------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("fam", ["llada", "dream"])
def test_round_trip_bit_identical(fixtures, tmp_path, capsys, fam):
    src = fixtures / f"{fam}_tiny"
    dst = tmp_path / "out" / fam  # parent does not exist yet: created
    rc, out, err = run([src, dst], capsys)
    assert rc == 0, err
    assert "wrote" in out
    assert sorted(os.listdir(dst)) == ["dllm_jax_config.json", "generation_config.json", "params"]
    assert leftovers(str(dst)) == [fam]
    meta = json.loads((dst / "dllm_jax_config.json").read_text())
    assert meta["dtype"] == "float32" and meta["model"]["family"] == fam and meta["format_version"] == 1
    assert meta["hf_config"] == json.loads((src / "config.json").read_text())

    ref = dllm_jax.load(str(src))
    conv = dllm_jax.load(str(dst))
    assert conv.cfg == ref.cfg
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(conv.params))
    assert_bit_identical(conv.params, ref.params)
    np.testing.assert_array_equal(np.asarray(conv.logits(IDS)), np.asarray(ref.logits(IDS)))


def test_chunked_params_restore_bit_identical(fixtures, tmp_path, capsys, monkeypatch):
    # Real checkpoints are written in SAVE_CHUNK_BYTES zarr chunks; shrink it so the tiny arrays span many chunks.
    monkeypatch.setattr(hf_to_flax, "SAVE_CHUNK_BYTES", 4096)
    dst = tmp_path / "out"
    rc, _, err = run([fixtures / "dream_tiny", dst], capsys)
    assert rc == 0, err
    ref = dllm_jax.load(str(fixtures / "dream_tiny"))
    assert_bit_identical(dllm_jax.load(str(dst)).params, ref.params)


def test_multi_shard_with_index_and_tokenizer_files(fixtures, tmp_path, capsys):
    src = hf_copy(fixtures, "llada", tmp_path / "hf")
    shards = split_shards(src, 3)
    assert len(shards) == 3
    tok = {"tokenizer.json": "{}", "tokenizer_config.json": "{}", "special_tokens_map.json": "{}",
           "chat_template.jinja": "{{ messages }}", "tokenization_dream.py": "# code\n", "vocab.json": "{}",
           "merges.txt": "#\n"}
    for k, v in tok.items():
        (src / k).write_text(v)
    (src / "README.md").write_text("not copied")
    dst = tmp_path / "conv"
    rc, out, err = run([src, dst], capsys)
    assert rc == 0, err
    for k, v in tok.items():
        assert (dst / k).read_text() == v
    assert not (dst / "README.md").exists() and not (dst / "config.json").exists()
    assert json.loads((dst / "dllm_jax_config.json").read_text())["source"]["shards"] == 3

    ref = dllm_jax.load(str(fixtures / "llada_tiny"))
    assert_bit_identical(dllm_jax.load(str(src)).params, ref.params)  # the sharded HF dir itself loads the same
    conv = dllm_jax.load(str(dst))
    assert conv.tokenizer_path == str(dst)
    assert_bit_identical(conv.params, ref.params)
    np.testing.assert_array_equal(np.asarray(conv.logits(IDS)), np.asarray(ref.logits(IDS)))


# -------------------------------------------------------------------------------------------------------------- bf16
def test_bfloat16_output(fixtures, tmp_path, capsys):
    src = fixtures / "dream_tiny"
    dst = tmp_path / "bf16"
    rc, _, err = run([src, dst, "--dtype", "bfloat16"], capsys)
    assert rc == 0, err
    assert json.loads((dst / "dllm_jax_config.json").read_text())["dtype"] == "bfloat16"
    conv = dllm_jax.load(str(dst), dtype="bfloat16")
    ref32 = dllm_jax.load(str(src))
    expect = jax.tree.map(lambda a: np.asarray(a).astype(BF16), ref32.params)
    assert_bit_identical(conv.params, expect)
    assert_bit_identical(conv.params, dllm_jax.load(str(src), dtype="bfloat16").params)


@pytest.mark.parametrize("fam", ["llada", "dream"])
def test_bfloat16_source(fixtures, tmp_path, capsys, fam):
    f32 = load_file(str(fixtures / f"{fam}_tiny" / "model.safetensors"))
    bf = {k: v.astype(BF16) for k, v in f32.items()}
    src = hf_copy(fixtures, fam, tmp_path / "hf_bf16", tensors=bf)
    # the hand-written file is a valid safetensors file (cross-check with the reference reader where it can do bf16)
    try:
        theirs = load_file(str(src / "model.safetensors"))
    except Exception:  # noqa: BLE001 - older safetensors: numpy cannot hold bf16
        theirs = None
    if theirs is not None:
        assert all(theirs[k].tobytes() == bf[k].tobytes() for k in bf)
    ours = dict(hf_weights._iter_shard(str(src / "model.safetensors")))
    assert sorted(ours) == sorted(bf) and all(ours[k].dtype == BF16 and ours[k].tobytes() == bf[k].tobytes()
                                              for k in bf)

    ref = dllm_jax.load(str(src))  # HF bf16 checkpoint loaded as float32 (exact upcast)
    expect32 = dllm_jax.load(str(fixtures / f"{fam}_tiny")).params
    expect32 = jax.tree.map(lambda a: np.asarray(a).astype(BF16).astype(np.float32), expect32)
    assert_bit_identical(ref.params, expect32)

    dst = tmp_path / "conv"  # default dtype follows the source: bfloat16
    rc, out, err = run([src, dst], capsys)
    assert rc == 0, err
    assert "source dtype BF16" in err
    assert json.loads((dst / "dllm_jax_config.json").read_text())["dtype"] == "bfloat16"
    conv16 = dllm_jax.load(str(dst), dtype="bfloat16")
    assert_bit_identical(conv16.params, jax.tree.map(lambda a: np.asarray(a).astype(BF16), expect32))
    conv32 = dllm_jax.load(str(dst))
    assert_bit_identical(conv32.params, ref.params)
    np.testing.assert_array_equal(np.asarray(conv32.logits(IDS)), np.asarray(ref.logits(IDS)))

    dst32 = tmp_path / "conv32"
    rc, _, err = run([src, dst32, "--dtype", "float32"], capsys)
    assert rc == 0, err
    assert json.loads((dst32 / "dllm_jax_config.json").read_text())["dtype"] == "float32"
    assert_bit_identical(dllm_jax.load(str(dst32)).params, ref.params)


# ------------------------------------------------------------------------------------------------------- bad inputs
def _tensors(fixtures, fam="llada"):
    return load_file(str(fixtures / f"{fam}_tiny" / "model.safetensors"))


def test_missing_tensor(fixtures, tmp_path, capsys):
    t = _tensors(fixtures)
    del t["model.transformer.blocks.1.k_proj.weight"]
    src = hf_copy(fixtures, "llada", tmp_path / "hf", tensors=t)
    rc, _, err = run([src, tmp_path / "out"], capsys)
    # named as the checkpoint names it, not by the internal params path (layers.wk[1])
    assert_failed_cleanly(rc, err, tmp_path / "out", "missing 1 tensor", "model.transformer.blocks.1.k_proj.weight")


def test_integer_tensor_in_float_checkpoint(fixtures, tmp_path, capsys):
    t = _tensors(fixtures)
    name = "model.transformer.blocks.0.q_proj.weight"
    t[name] = (t[name] * 100).astype(np.int32)
    src = hf_copy(fixtures, "llada", tmp_path / "hf", tensors=t)
    rc, _, err = run([src, tmp_path / "out"], capsys)
    assert_failed_cleanly(rc, err, tmp_path / "out", name, "I32", "float")
    with pytest.raises(CheckpointError, match="stored as I32"):
        dllm_jax.load(str(src))


def test_extra_tensor(fixtures, tmp_path, capsys):
    t = _tensors(fixtures, "dream")
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    t["model.layers.5.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"]  # layer beyond n_layers
    src = hf_copy(fixtures, "dream", tmp_path / "hf", tensors=t)
    rc, _, err = run([src, tmp_path / "out"], capsys)
    assert_failed_cleanly(rc, err, tmp_path / "out", "2 unexpected tensor", "rotary_emb.inv_freq")


def test_misshaped_tensor(fixtures, tmp_path, capsys):
    t = _tensors(fixtures)
    t["model.transformer.blocks.0.q_proj.weight"] = t["model.transformer.blocks.0.q_proj.weight"][:, :32]
    src = hf_copy(fixtures, "llada", tmp_path / "hf", tensors=t)
    rc, _, err = run([src, tmp_path / "out"], capsys)
    assert_failed_cleanly(rc, err, tmp_path / "out", "blocks.0.q_proj.weight", "has shape (64, 32), expected (64, 64)")


@pytest.mark.parametrize("cut", ["header", "data"])
def test_truncated_file(fixtures, tmp_path, capsys, cut):
    src = hf_copy(fixtures, "llada", tmp_path / "hf")
    f = src / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[:100] if cut == "header" else raw[:-1000])
    rc, _, err = run([src, tmp_path / "out"], capsys)
    assert_failed_cleanly(rc, err, tmp_path / "out", "truncated", "model.safetensors")


def test_corrupt_header(fixtures, tmp_path, capsys):
    src = hf_copy(fixtures, "dream", tmp_path / "hf")
    f = src / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:40] = b"\xff" * 32  # header JSON is garbage, length intact
    f.write_bytes(bytes(raw))
    rc, _, err = run([src, tmp_path / "out"], capsys)
    assert_failed_cleanly(rc, err, tmp_path / "out", "corrupt safetensors header")


def test_truncated_shard_in_multi_shard_set(fixtures, tmp_path, capsys):
    src = hf_copy(fixtures, "dream", tmp_path / "hf")
    shards = split_shards(src, 3)
    f = src / shards[1]
    f.write_bytes(f.read_bytes()[:-7])
    rc, _, err = run([src, tmp_path / "out"], capsys)
    assert_failed_cleanly(rc, err, tmp_path / "out", "truncated", shards[1])


def test_unknown_model_type(fixtures, tmp_path, capsys):
    src = hf_copy(fixtures, "llada", tmp_path / "hf", config_edit=lambda c: c.update(model_type="gpt2"))
    rc, _, err = run([src, tmp_path / "out"], capsys)
    assert_failed_cleanly(rc, err, tmp_path / "out", "unknown model_type 'gpt2'")


def test_missing_config(fixtures, tmp_path, capsys):
    src = hf_copy(fixtures, "llada", tmp_path / "hf")
    os.remove(src / "config.json")
    rc, _, err = run([src, tmp_path / "out"], capsys)
    assert_failed_cleanly(rc, err, tmp_path / "out", "config.json does not exist")


def test_missing_src(tmp_path, capsys):
    rc, _, err = run([tmp_path / "nope", tmp_path / "out"], capsys)
    assert_failed_cleanly(rc, err, tmp_path / "out", "does not exist", "nope")


def test_dst_exists_without_overwrite(fixtures, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    rc, _, err = run([fixtures / "llada_tiny", dst], capsys)
    assert rc == 2 and "already exists" in err and "--overwrite" in err and "Traceback" not in err
    assert sorted(os.listdir(dst)) == ["keep.txt"] and leftovers(str(dst)) == ["out"]


def test_bad_dtype(fixtures, tmp_path, capsys):
    rc, _, err = run([fixtures / "llada_tiny", tmp_path / "out", "--dtype", "int8"], capsys)
    assert_failed_cleanly(rc, err, tmp_path / "out", "--dtype", "int8")


def test_overwrite_replaces_only_after_success(fixtures, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    bad = hf_copy(fixtures, "llada", tmp_path / "bad", config_edit=lambda c: c.update(model_type="nope"))
    rc, _, err = run([bad, dst, "--overwrite"], capsys)
    assert rc == 2 and "unknown model_type" in err
    assert sorted(os.listdir(dst)) == ["old.txt"] and leftovers(str(dst)) == ["out"]

    rc, _, err = run([fixtures / "llada_tiny", dst, "--overwrite"], capsys)
    assert rc == 0, err
    assert not (dst / "old.txt").exists() and (dst / "dllm_jax_config.json").is_file()
    assert leftovers(str(dst)) == ["out"]
    assert_bit_identical(dllm_jax.load(str(dst)).params, dllm_jax.load(str(fixtures / "llada_tiny")).params)


def test_failure_while_writing_removes_temp_dir(fixtures, tmp_path, capsys, monkeypatch):
    # Errors after the temp dir exists (here: the disk filling up during the orbax write) leave nothing behind,
    # including parent directories the converter created.
    def boom(dst, params):
        os.makedirs(os.path.join(dst, "params"))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_to_flax, "save_params_bounded", boom)
    dst = tmp_path / "a" / "b" / "out"
    rc, _, err = run([fixtures / "dream_tiny", dst], capsys)
    assert_failed_cleanly(rc, err, dst, "No space left on device")
    assert not (tmp_path / "a").exists()


def test_error_while_streaming_removes_temp_dir(fixtures, tmp_path, capsys, monkeypatch):
    # A shard that goes bad after its header was validated (e.g. truncated while converting).
    src = hf_copy(fixtures, "llada", tmp_path / "hf")
    real = hf_weights._iter_shard

    def shrinking(fname, header=None):
        it = real(fname, header)
        yield next(it)
        with open(fname, "r+b") as f:
            f.truncate(200)
        yield from it

    monkeypatch.setattr(hf_weights, "_iter_shard", shrinking)
    rc, _, err = run([src, tmp_path / "out"], capsys)
    assert_failed_cleanly(rc, err, tmp_path / "out", "truncated")


def test_dst_inside_src_refused(fixtures, tmp_path, capsys):
    src = hf_copy(fixtures, "llada", tmp_path / "hf")
    rc, _, err = run([src, src, "--overwrite"], capsys)
    assert rc == 2 and "would replace the source" in err
    assert (src / "model.safetensors").is_file()


def test_help_and_module_entry_point(fixtures, tmp_path):
    assert hf_to_flax.main(["--help"]) == 0
    r = subprocess.run([sys.executable, "-m", "convert.hf_to_flax", str(tmp_path / "missing"), str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "does not exist" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------- hf_weights reader itself
@pytest.mark.parametrize("cut", [0, 5, 8, 60, -1, -300])
def test_iter_shard_truncated_raises_checkpoint_error(fixtures, tmp_path, cut):
    raw = (fixtures / "dream_tiny" / "model.safetensors").read_bytes()
    f = tmp_path / "t.safetensors"
    f.write_bytes(raw[:cut] if cut >= 0 else raw[:len(raw) + cut])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        list(hf_weights._iter_shard(str(f)))


@pytest.mark.parametrize("header", [b"[1, 2]", b'{"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}',
                                    b'{"x": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}',
                                    b'{"x": {"shape": [1]}}', b"\x00\x01\x02 not json"])
def test_iter_shard_corrupt_header_raises_checkpoint_error(tmp_path, header):
    f = tmp_path / "c.safetensors"
    f.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"c\.safetensors"):
        list(hf_weights._iter_shard(str(f)))


@pytest.mark.parametrize("when", ["converting", "writing orbax"])
def test_ctrl_c_leaves_nothing_and_no_traceback(tmp_path, when):
    """Ctrl-C while reading or while orbax writes: exit 130, one line, no traceback, no temp dir, no DST."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    try:
        from converter_memory import build_checkpoint
    finally:
        sys.path.pop(0)
    src, dst = tmp_path / "hf", tmp_path / "out"
    build_checkpoint(str(src), 256, 2, 32000, 704, 2)  # ~80 MB: the write takes long enough to be interrupted
    import glob
    import signal
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # while reading, the child holds 60 s after its first line: on a loaded machine the conversion could otherwise end
    # before this process gets to send the signal (seen once with two test workers and a training job on 2 cores)
    hold = {"DLLM_JAX_CONVERT_HOLD_S": "60"} if when == "converting" else {}
    # the child gets Ctrl-C's default disposition: a pytest-xdist worker ignores SIGINT, and an ignored signal is
    # inherited, so Python in the child would never raise KeyboardInterrupt (as a user's shell would deliver it)
    p = subprocess.Popen([sys.executable, "-m", "convert.hf_to_flax", str(src), str(dst), "--no-progress"], cwd=root,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu", **hold},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in p.stderr:
        seen.append(line)
        if when in line:
            break
    if when == "writing orbax":  # wait until orbax's writer threads have files open in the temp dir
        t0 = time.time()
        while not glob.glob(str(tmp_path / ".out.tmp-*" / "*" / "*")) and time.time() - t0 < 60:
            time.sleep(0.005)
    p.send_signal(signal.SIGINT)
    err = "".join(seen) + p.stderr.read()
    rc = p.wait(timeout=120)
    assert rc == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert err.strip().splitlines()[-1].endswith(f"interrupted; nothing was written to {dst}"), err
    assert leftovers(str(dst)) == [], leftovers(str(dst))


def test_ctrl_c_waits_for_writer_threads(fixtures, tmp_path, capsys, monkeypatch):
    """Deterministic form of the race above: a save whose writer thread is still busy when Ctrl-C arrives (as
    orbax's commit threads are). The interrupt must wait for the writer, then remove the temp dir."""
    import signal
    import threading
    import time

    def save_with_busy_writer(dst, params):
        def writer():
            time.sleep(0.3)
            os.makedirs(os.path.join(dst, "params"))
            with open(os.path.join(dst, "params", "late_write"), "w") as f:
                f.write("x")

        t = threading.Thread(target=writer)
        t.start()
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the writer is busy
        t.join()  # Checkpointer.save waits for its commit threads like this

    monkeypatch.setattr(hf_to_flax, "save_params_bounded", save_with_busy_writer)
    src = hf_copy(fixtures, "llada", tmp_path / "hf")
    rc, _, err = run([src, tmp_path / "out"], capsys)
    time.sleep(0.5)  # a writer left running would create its file by now
    assert rc == 130 and "interrupted; nothing was written" in err, err
    assert leftovers(str(tmp_path / "out")) == [], leftovers(str(tmp_path / "out"))
