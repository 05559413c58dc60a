#!/usr/bin/env bash
# Copy the few official files benchmarks/vs_pytorch.py imports into one small folder (default bench_official/,
# ignored by git), so they can travel to a machine that cannot fetch them (the device tool's `carry`).
#
#   bash benchmarks/pack_official.sh LLADA_REPO FASTDLLM_REPO FASTDLLM_V2_MODEL FASTDLLM_V2_REPO [DEST]
#
# LLADA_REPO: checkout of ML-GSAI/LLaDA; FASTDLLM_REPO: NVlabs/Fast-dLLM (llada/, dream/); FASTDLLM_V2_MODEL: the
# hub code of Efficient-Large-Model/Fast_dLLM_v2_7B (modeling.py, configuration.py); FASTDLLM_V2_REPO: a Fast-dLLM
# checkout with v2/generation_functions.py. Nothing is copied into the project's tracked files.
set -euo pipefail
if [ $# -lt 4 ]; then sed -n 2,10p "$0"; exit 2; fi
LLADA=$1 FAST=$2 V2M=$3 V2R=$4 DEST=${5:-bench_official}
need() { [ -f "$1" ] || { echo "pack_official: $1 not found ($2)" >&2; exit 2; }; }
need "$LLADA/generate.py" "ML-GSAI/LLaDA checkout"
need "$FAST/llada/generate.py" "NVlabs/Fast-dLLM checkout"
need "$FAST/dream/model/generation_utils_block.py" "NVlabs/Fast-dLLM checkout"
need "$V2M/modeling.py" "Fast_dLLM_v2_7B hub code"
need "$V2M/configuration.py" "Fast_dLLM_v2_7B hub code"
need "$V2R/v2/generation_functions.py" "Fast-dLLM checkout with v2/"
TMP=$(mktemp -d "${DEST%/}.tmp.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/LLaDA" "$TMP/Fast-dLLM/llada" "$TMP/Fast-dLLM/dream" "$TMP/Fast_dLLM_v2_7B" "$TMP/Fast-dLLM-v2/v2"
cp "$LLADA/generate.py" "$TMP/LLaDA/"
cp "$FAST/llada/generate.py" "$TMP/Fast-dLLM/llada/"
cp -r "$FAST/llada/model" "$TMP/Fast-dLLM/llada/"
cp -r "$FAST/dream/model" "$TMP/Fast-dLLM/dream/"
cp "$V2M"/*.py "$TMP/Fast_dLLM_v2_7B/"
[ -f "$V2M/config.json" ] && cp "$V2M/config.json" "$TMP/Fast_dLLM_v2_7B/"
cp "$V2R/v2/generation_functions.py" "$TMP/Fast-dLLM-v2/v2/"
find "$TMP" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$DEST"
mv "$TMP" "$DEST"
trap - EXIT
echo "packed into $DEST ($(du -sh "$DEST" | cut -f1)):"
find "$DEST" -type f | sort
