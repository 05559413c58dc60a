#!/usr/bin/env bash
# One prepared run for a machine with a GPU or a TPU (issues #6 kernels, #8 efficiency grid), sized for a
# 15-minute device budget: about 9 minutes of commands after the install. Everything lands under $OUT (default
# /tmp/accelerator_session); each step has its own timeout and the script goes on when a step fails, so one bad
# step does not cost the others.
#
#   bash benchmarks/accelerator_session.sh            # on the accelerator machine, from the repository root
#   SMOKE=1 bash benchmarks/accelerator_session.sh    # CPU smoke run of the same steps (tiny sizes, seconds each)
#
# Steps:
#   0. devices.txt         jax.devices(), backend, versions
#   1. kernel_tests.txt    tests/test_kernels.py + test_kernels_e2e.py with DLLM_KERNEL_HW=1: the kernel of this
#                          hardware COMPILED (not interpreted) against the jnp reference, and generate() through it
#                          against the golden tokens; the other hardware's kernel is skipped with the reason (-rs)
#   2. attention.md        benchmarks/bench_attention.py at LLaDA-8B attention shapes (subset of the full grid)
#   3. bench_llada8b/      dllm-jax bench, random weights of the LLaDA-8B shape in bf16, threshold schedules
#                          replaying decode traces of the embedded model; star grid over gen length and batch
#   4. bench_default/      the same grid on the embedded default model (real weights, task prompts)
set -u
OUT=${OUT:-/tmp/accelerator_session}
mkdir -p "$OUT"
SMOKE=${SMOKE:-0}
if [ "$SMOKE" = "1" ]; then
  export JAX_PLATFORMS=cpu
  T_TESTS=600; T_ATT=300; T_BENCH=300
  ATT_ARGS=(--quick)
  BENCH8B=(--random-weights --shape 100m --dtype float32 --gen-lengths 64 --batch-sizes 1 --prompts short
           --schedules vanilla,dual_threshold,ar --repeats 1 --grid star --base-gen 64)
  BENCHDEF=(--gen-lengths 64 --batch-sizes 1 --prompts short --schedules vanilla,dual_threshold,ar --repeats 1)
else
  unset JAX_PLATFORMS
  T_TESTS=200; T_ATT=120; T_BENCH=170
  ATT_ARGS=(--batch 1 8 32 --cache 256 1024 4096 --window 32 full --dtype bfloat16 --reps 10)
  BENCH8B=(--random-weights --shape llada-8b --dtype bfloat16 --gen-lengths 256,1024 --batch-sizes 1,4,16,64
           --prompts short --schedules vanilla,dual,dual_threshold,ar,bd,bd_threshold --repeats 2 --grid star
           --base-gen 256 --replay-from dllm_jax/assets/default_model)
  BENCHDEF=(--gen-lengths 64,256 --batch-sizes 1,16,64 --prompts short
            --schedules vanilla,dual_threshold,ar,bd_threshold --repeats 2 --grid star --base-gen 64)
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

step devices 120 python -c "
import jax, jaxlib, platform
print('backend', jax.default_backend()); print('devices', jax.devices())
print('device_kind', jax.devices()[0].device_kind); print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)
print('python', platform.python_version())"
if [ "$SMOKE" = "1" ]; then export DLLM_KERNEL_HW=0; else export DLLM_KERNEL_HW=1; fi
step kernel_tests "$T_TESTS" \
  python -m pytest -q -rs -p no:cacheprovider tests/test_kernels.py tests/test_kernels_e2e.py
step attention "$T_ATT" python benchmarks/bench_attention.py "${ATT_ARGS[@]}" --out "$OUT/attention.md"
step bench_llada8b "$T_BENCH" dllm-jax bench "${BENCH8B[@]}" --no-progress --out "$OUT/bench_llada8b"
step bench_default "$T_BENCH" dllm-jax bench --model dllm_jax/assets/default_model --prompt-source tasks \
  "${BENCHDEF[@]}" --no-progress --out "$OUT/bench_default"
echo "done: $OUT"; ls -R "$OUT" | head -40
