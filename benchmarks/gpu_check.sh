#!/usr/bin/env bash
# One short GPU check (a few minutes): memory bandwidth, bf16/int4 decode at batch 1 as a fraction
# of it (--compile off and on), prefill 512, the server at 1/16/64 streams, at full ChatGLM3-6B size
# with random weights (no download). Prints one table; --json prints the numbers.
#   bash benchmarks/gpu_check.sh [--json]
# It uses the PyTorch already installed (the GPU build the machine has: CUDA, or ROCm for AMD) and
# installs glmchat with its server extra; it never installs another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no GPU visible to torch (CUDA / ROCm)'" \
  || { echo "gpu_check: needs a PyTorch with a GPU (torch.cuda.is_available())" >&2; exit 1; }
python -c "import glmchat, fastapi, uvicorn, openai" 2>/dev/null \
  || pip install -q -e ".[server]" openai || pip install -q --no-deps -e .
exec timeout 480 python benchmarks/gpu_check.py "$@"
