#!/usr/bin/env bash
# One prepared run for a machine with a GPU or a TPU (issues #6 kernels, #8 efficiency grid), sized for a
# 15-minute device budget: at most 510 s of commands. Everything lands in $OUT (default
# /tmp/accelerator_session) as one tarball; each step has its own timeout and the script goes on when a step fails, so one bad
# step does not cost the others.
#
#   bash benchmarks/accelerator_session.sh            # on the accelerator machine, from the repository root
#   SMOKE=1 bash benchmarks/accelerator_session.sh    # CPU smoke run of the same steps (tiny sizes, seconds each)
#
# Nothing is installed: the machine may have no package index (the lent H200 has none), so the repository runs from
# PYTHONPATH with that machine's own jax/flax/pytest ($PY, default python3). Its jax may lie outside the range
# pyproject.toml pins (the H200 image had jax 0.11.2): devices.txt records the versions; a failure that comes from
# the version is then visible as such.
#
# Steps:
#   0. devices.txt         jax.devices(), backend, versions
#   1. kernel_tests.txt    tests/test_kernels.py + test_kernels_mgpu.py + test_kernels_e2e.py with DLLM_KERNEL_HW=1:
#                          the kernels of this hardware COMPILED (not interpreted) against the jnp reference, and
#                          generate() through them against the golden tokens (on a GPU both pallas_mgpu, Mosaic GPU,
#                          and pallas_gpu, Triton); the other hardware's kernel is skipped with the reason (-rs)
#   2. attention.md        benchmarks/bench_attention.py at LLaDA-8B attention shapes (subset of the full grid):
#                          every runnable kernel (GPU: pallas_mgpu and pallas_gpu) against the reference, timed
#   3. bench_llada8b/      dllm-jax bench, random weights of the LLaDA-8B shape in bf16, threshold schedules
#                          replaying decode traces of the embedded model; star grid over gen length and batch;
#                          finished points are streamed to bench_llada8b.partial.jsonl if the time limit stops it
#
# With the device tool: run(command="bash benchmarks/accelerator_session.sh", timeout_s=590); the tarball, steps.log
# and attention.md come back from $OUT.
set -u
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# everything is written to $W; at the end it is packed into $OUT/accelerator_session.tar.gz, with steps.log and
# attention.md beside it (the device tool returns at most 8 files from $OUT)
FINAL=${OUT:-/tmp/accelerator_session}
W=$(mktemp -d /tmp/accel_session.XXXXXX)
OUT=$W
mkdir -p "$FINAL"
SMOKE=${SMOKE:-0}
if [ "$SMOKE" = "1" ]; then
  export JAX_PLATFORMS=cpu
  T_TESTS=600; T_ATT=300; T_BENCH=300
  ATT_ARGS=(--quick)
  BENCH8B=(--random-weights --shape 100m --dtype float32 --gen-lengths 64 --batch-sizes 1 --prompts short
           --schedules vanilla,dual_threshold,ar --repeats 1 --grid star --base-gen 64)
else
  unset JAX_PLATFORMS
  # worst case 30 + 180 + 100 + 200 = 510 s, inside one 600 s device call (device tool: timeout_s=590); the
  # second GPU kernel (pallas_mgpu) costs the tests and the attention benchmark time, taken from the 8B bench
  T_TESTS=180; T_ATT=100; T_BENCH=200
  ATT_ARGS=(--batch 1 8 32 --cache 1024 4096 --window 32 full --dtype bfloat16 --reps 5)
  BENCH8B=(--random-weights --shape llada-8b --dtype bfloat16 --gen-lengths 256,1024 --batch-sizes 1,8,32,64
           --prompts short --schedules vanilla,dual_threshold,ar,bd_threshold --repeats 2 --grid star
           --base-gen 256 --replay-from dllm_jax/assets/default_model)
fi

step() {  # step NAME TIMEOUT CMD...
  local name=$1 t=$2; shift 2
  echo "=== $name (timeout ${t}s): $*" | tee -a "$OUT/steps.log"
  local t0=$SECONDS
  timeout "$t" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0))s" | tee -a "$OUT/steps.log"
  tail -5 "$OUT/$name.txt"
}

step devices 30 "$PY" -c "
import jax, jaxlib, platform
print('backend', jax.default_backend()); print('devices', jax.devices())
print('device_kind', jax.devices()[0].device_kind); print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)
print('python', platform.python_version())
import importlib.metadata as md
for p in ('flax', 'optax', 'orbax-checkpoint', 'transformers', 'safetensors', 'pytest', 'triton'):
    try: print(p, md.version(p))
    except md.PackageNotFoundError: print(p, 'MISSING')"
if [ "$SMOKE" = "1" ]; then export DLLM_KERNEL_HW=0; else export DLLM_KERNEL_HW=1; fi
# pyproject's addopts ask for pytest-xdist (-n 2); an image without it would reject the whole command line
PYTEST_OPTS=()
"$PY" -c "import xdist" 2>/dev/null || PYTEST_OPTS=(-o "addopts=-m 'not slow'")
step kernel_tests "$T_TESTS" \
  "$PY" -m pytest -q -rs -p no:cacheprovider "${PYTEST_OPTS[@]}" \
  tests/test_kernels.py tests/test_kernels_mgpu.py tests/test_kernels_e2e.py
step attention "$T_ATT" "$PY" benchmarks/bench_attention.py "${ATT_ARGS[@]}" --out "$OUT/attention.md"
step bench_llada8b "$T_BENCH" "$PY" -m dllm_jax.cli bench "${BENCH8B[@]}" --no-progress --out "$OUT/bench_llada8b"
tar czf "$FINAL/accelerator_session.tar.gz" -C "$W" .
cp "$W/steps.log" "$FINAL/" 2>/dev/null; cp "$W/attention.md" "$FINAL/" 2>/dev/null
echo "done: $FINAL/accelerator_session.tar.gz ($(du -h "$FINAL/accelerator_session.tar.gz" | cut -f1))"
tar tzf "$FINAL/accelerator_session.tar.gz" | head -40
