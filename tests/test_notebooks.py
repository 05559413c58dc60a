"""The Colab notebooks (colab/*.ipynb) run headlessly on CPU.

Each notebook is executed top to bottom by nbclient in a fresh kernel with DLLM_JAX_CI=1 (the smallest sizes) and
JAX on the CPU; a cell that raises fails the test. Cells that need an accelerator or the Hugging Face hub are
guarded inside the notebooks and only print what they would do.
"""

import json
import os
import pathlib
import re
import sys
import time
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
EXPECTED = {"quickstart.ipynb", "schedulers.ipynb", "benchmark.ipynb"}


def _outputs(nb, kind="text"):
    """All text (stream / text/plain / markdown) or the image count of an executed notebook."""
    texts, images = [], 0
    for c in nb.cells:
        for o in c.get("outputs", []):
            if o.get("output_type") == "stream":
                texts.append(o.get("text", ""))
            data = o.get("data", {})
            texts += [data.get("text/plain", ""), data.get("text/markdown", "")]
            images += "image/png" in data
    return "".join(t if isinstance(t, str) else "".join(t) for t in texts) if kind == "text" else images


def test_all_notebooks_present():
    assert EXPECTED <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_install_cell_pins_match_pyproject(path):
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    jax_dep = next(d for d in deps if re.match(r"jax\b(?!lib)", d))
    src = "".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
    m = re.search(r'JAX_PIN = "([^"]+)"', src)
    assert m, f"{path.name}: no JAX_PIN in the install cell"
    assert m.group(1).replace(" ", "") == jax_dep.replace(" ", ""), (m.group(1), jax_dep)
    assert 'find_spec("dllm_jax") is None' in src  # the install is skipped when the package is importable


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_on_cpu(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("DLLM_JAX_CI", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("DLLM_JAX_CACHE_DIR", str(tmp_path / "xla_cache"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # the kernel sees one CPU device, like a Colab CPU runtime (conftest asks for 8 fake ones)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    monkeypatch.setenv("XLA_FLAGS", flags)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    nb = nbformat.read(str(path), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    t = time.perf_counter()
    client.execute()
    print(f"{path.name}: {time.perf_counter() - t:.0f}s", file=sys.stderr)
    text = _outputs(nb)
    assert "Running on the CPU" in text
    assert "dllm_jax is already installed" in text  # the pip cell was skipped
    if path.name == "quickstart.ipynb":
        assert "Skipping the GSAI-ML/LLaDA-8B-Instruct conversion (CI run)" in text
        assert "after" in text and "forwards:" in text and "| schedule | accuracy |" in text
        assert "cached == uncached tokens: True" in text  # the D2F cell
        assert _outputs(nb, "images") >= 1
    elif path.name == "schedulers.ipynb":
        assert "| schedule |" in text and _outputs(nb, "images") >= 1
    elif path.name == "benchmark.ipynb":
        try:
            import dllm_jax.bench  # noqa: F401
        except ImportError:
            assert "dllm_jax.bench is not available" in text
        else:
            assert _outputs(nb, "images") >= 1 and "Headline" in text
