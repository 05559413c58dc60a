"""CI as a newcomer: the README's two set-up commands, exactly as written there, each in a FRESH virtualenv.

1. The main job (`pip install -e . && dllm-jax generate "..."`): installed without extras, run, and its output
   checked (a sorted-digits prompt must print its digits sorted, and the stats line must follow).
2. The test command (`pip install -e ".[test]" && ... pytest`), in another fresh virtualenv.

A package that only the developer's machine has therefore cannot pass: each venv starts empty (no system
site-packages). Run from the repository root by .ci/run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands(path: str = os.path.join(ROOT, "README.md")) -> list[str]:
    """The commands of the first two ```bash blocks of the README's "Set-up" section."""
    text = open(path, encoding="utf-8").read()
    m = re.search(r"^## Set-up.*?$(.*?)^## ", text, flags=re.S | re.M)
    if not m:
        raise SystemExit("README.md has no '## Set-up' section")
    blocks = re.findall(r"```bash\n(.*?)```", m.group(1), flags=re.S)
    cmds = [" ".join(b.strip().split("\\\n")).strip() for b in blocks[:2]]
    if len(cmds) != 2 or not all(cmds):
        raise SystemExit(f"README.md's Set-up section must hold two ```bash blocks, found {len(blocks)}")
    return cmds


def check_main_output(cmd: str, out: str, err: str) -> None:
    """The main job printed an answer and the stats line; a sort prompt is answered correctly."""
    lines = [ln for ln in out.splitlines() if ln.strip()]
    if not lines:
        raise SystemExit(f"the README's main command printed nothing on stdout\nstderr:\n{err}")
    if "Traceback" in err:
        raise SystemExit(f"the README's main command printed a traceback:\n{err}")
    if not re.search(r"NFE \[\d+\].*tok/s", err):
        raise SystemExit(f"the README's main command did not print its stats line (NFE, tok/s)\nstderr:\n{err}")
    answer = lines[-1].strip()  # pip's own output comes first; the answer is what generate printed last
    m = re.search(r"Sort the digits: (\d+)", cmd)
    if m:
        want = "".join(sorted(m.group(1)))
        if answer != want:
            raise SystemExit(f"the README's main command answered {answer!r}, expected {want!r}")
    print(f"[newcomer] main job ok: {answer!r}; {err.strip().splitlines()[-1]}", flush=True)


def fresh_venv(where: str) -> dict:
    subprocess.run([sys.executable, "-m", "venv", where], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["VIRTUAL_ENV"] = where
    env["PATH"] = os.path.join(where, "bin") + os.pathsep + env.get("PATH", "")
    return env


def main() -> int:
    main_cmd, test_cmd = readme_commands()
    with tempfile.TemporaryDirectory(prefix="dllm-newcomer-") as work:
        t0 = time.time()
        env = fresh_venv(os.path.join(work, "main"))
        print(f"[newcomer] fresh venv, README command 1: {main_cmd}", flush=True)
        r = subprocess.run(["bash", "-c", main_cmd], cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            sys.stderr.write(r.stdout[-5000:] + r.stderr[-20000:])
            raise SystemExit(f"the README's main command failed in a fresh virtualenv (exit {r.returncode})")
        check_main_output(main_cmd, r.stdout, r.stderr)
        print(f"[newcomer] main job: {time.time() - t0:.0f} s with the install", flush=True)
        env = fresh_venv(os.path.join(work, "test"))
        print(f"[newcomer] fresh venv, README command 2: {test_cmd}", flush=True)
        return subprocess.run(["bash", "-c", test_cmd], cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
