#!/usr/bin/env bash
# Issue 19 on a GPU: the official PyTorch samplers against our presets, both on the GPU, float32 at full precision
# (benchmarks/vs_pytorch.py --device gpu), one prepared call of the device tool. On this project's 2-core CPU both
# sides do the same FLOPs at the same matmul speed (docs/benchmarks/vs_pytorch.md), so the >= 3x question is one of
# the device: eager torch launches every op from Python, our loop is one compiled program.
#
# Before (here, where the official checkouts are): pack the official files into bench_official/ (git-ignored):
#   bash benchmarks/pack_official.sh LLaDA Fast-dLLM Fast_dLLM_v2_7B Fast-dLLM-with-v2
# Then, device tool: run(command="bash benchmarks/accelerator_vs_pytorch.sh", carry=["bench_official", ".whl"],
#                        timeout_s=570)
# Results come back from $OUT: vs_pytorch_gpu.md (table), vs_pytorch_gpu.json (raw rows, written after each case,
# so a stopped run keeps its finished cases), vs_pytorch_gpu.log.
#   SMOKE=1 bash benchmarks/accelerator_vs_pytorch.sh     # CPU smoke run of the same command (one case, 1 repeat)
#
# The H200 image has torch, einops and a CUDA jax ($PY, default python3), but transformers 5.x, on which the official
# Dream code fails (its RoPE init reads ROPE_INIT_FUNCTIONS['default']) and which the v2 hub code does not pin; the
# pinned 4.53.1 travels as wheels in .whl/ (git-ignored; carry it too), installed into /tmp/site:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl transformers==4.53.1 tokenizers==0.21.4 huggingface_hub==0.36.2
set -u
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
OFF=${OFFICIAL:-bench_official}
FINAL=${OUT:-/tmp/accelerator_vs_pytorch}
mkdir -p "$FINAL"
if ls .whl/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH" || { echo "installing .whl/ failed" >&2; exit 2; }
fi
"$PY" -c "import torch, transformers, jax; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      'transformers', transformers.__version__, 'jax', jax.__version__, jax.default_backend())"
for f in LLaDA/generate.py Fast-dLLM/llada/generate.py Fast-dLLM/dream/model/modeling_dream.py \
         Fast_dLLM_v2_7B/modeling.py Fast-dLLM-v2/v2/generation_functions.py; do
  [ -f "$OFF/$f" ] || { echo "missing $OFF/$f: run benchmarks/pack_official.sh first and carry $OFF" >&2; exit 2; }
done
QWEN=dream_maskgit_g128,dream_entropy_g128_s64,fastdllm_dream_threshold_g128,fastdllm_dream_prefix_g128
QWEN=$QWEN,fastdllm_dream_dual_g128,v2_generate_g128,v2_generate_blockcache_g128,v2_batch_sample_g128_b4
LLADA=fastdllm_dual_g128,fastdllm_prefix_g128,fastdllm_g128,llada_g128_b1,llada_g128_b4
if [ "${SMOKE:-0}" = "1" ]; then
  ARGS=(--device cpu --threads 1 --cases fastdllm_dream_dual_g128 --repeats 1); T=300
else
  # 13 cases; compile of ours ~10-30 s each on a GPU, torch runs of seconds: budget 520 s in one 570 s call
  ARGS=(--device gpu --threads 4 --cases "$LLADA,$QWEN" --repeats 3 --retry-seeds 2); T=520
fi
timeout "$T" "$PY" benchmarks/vs_pytorch.py "${ARGS[@]}" \
  --llada-repo "$OFF/LLaDA" --fastdllm-repo "$OFF/Fast-dLLM" --fastdllm-v2-model "$OFF/Fast_dLLM_v2_7B" \
  --fastdllm-v2-repo "$OFF/Fast-dLLM-v2" --checkpoint /tmp/vs_pytorch_ckpt/llada_d512 \
  --note "Issue 19 on the device (benchmarks/accelerator_vs_pytorch.sh)." \
  --out "$FINAL/vs_pytorch_gpu.md" --json "$FINAL/vs_pytorch_gpu.json" 2>&1 | tee "$FINAL/vs_pytorch_gpu.log"
echo "rc=${PIPESTATUS[0]}"
ls -l "$FINAL"
