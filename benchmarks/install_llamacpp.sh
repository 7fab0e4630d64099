#!/usr/bin/env bash
# Build llama.cpp (through llama-cpp-python) into its own venv, .venv-llamacpp, for the
# benchmarks that compare with it (quant_vs_llamacpp.py). Kept apart from .venv: it is a
# reference, not a dependency of gemma-stack. About 10 minutes on 2 cores; safe to run again.
#
# The flags are the ones measured in ../shared/FINDINGS.md on these machines: GGML_NATIVE=ON
# segfaulted on Gemma 3 270M's sliding-window cache, and OpenMP oversubscribes 2 cores when the
# server answers from several threads.
set -euo pipefail

venv=${LLAMACPP_VENV:-.venv-llamacpp}
python=${PYTHON:-python3}
version=${LLAMACPP_VERSION:-0.3.36}

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "llama-cpp-python already in $venv"
  exit 0
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_OPENMP=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
"$venv/bin/pip" install --quiet "llama-cpp-python[server]==$version"
"$venv/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
