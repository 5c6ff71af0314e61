#!/usr/bin/env bash
# GPU training throughput at Llama-3-8B shape on one H100/H200, in under 8 minutes (docs/benchmarks.md).
#
#   bash benchmarks/gpu.sh [OUT.json] [gpu_throughput.py options...]
#   GPU_TESTS=1 bash benchmarks/gpu.sh ...   # then also the gpu-marked tests (ZeRO-3 adapter)
#
# Needs a CUDA build of torch, and the project's dependencies (pip install '.[test]'); flash-attn
# is measured when it is installed. PYTHON names the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/bench/gpu_throughput.json}"
shift || true
py="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" -c 'import torch; assert torch.cuda.is_available(), "torch sees no CUDA GPU"; print("torch", torch.__version__, torch.version.cuda)'
"$py" benchmarks/gpu_throughput.py --out "$out" "$@"
if [[ "${GPU_TESTS:-0}" == 1 ]]; then
  "$py" -m pytest -q -m gpu tests/
fi
