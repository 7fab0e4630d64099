"""GPTQ: 4- and 3-bit codes chosen so that each layer's output moves least, not its weights.

GPTQ (Frantar et al. 2022) rounds one input column at a time and spreads each column's rounding
error over the columns not yet rounded, weighted by the inverse of H = 2 X^T X, where X are the
layer's inputs on calibration text. Both 4-bit paths use it: the vLLM export
(`quant.export_vllm`, AWQ's file layout) and the loader's `method="gptq"` (`quant.codecs`, HQQ's
bit packing), so the two agree on what a code is.

The grid is asymmetric: a scale and an integer zero point (0..2^bits-1) per output row and group of
`group_size` consecutive inputs, the scale rounded to bf16 before any code is chosen (the codes
must fit the stored scale). H is dampened by DAMP of its mean diagonal (inputs never seen get
weight 0); columns go in order (no act-order, so a column's group stays fixed) in blocks of BLOCK;
each group's grid is chosen from its columns' error-updated weights when GPTQ reaches the group:
the range (widened to hold 0) shrunk by the factor in CLIP_FACTORS with least squared rounding
error.

X comes from calibration: the bf16 model reads CALIBRATION_SEQUENCES sequences of
CALIBRATION_LENGTH tokens, each from BOS, of a fixed text, the docstrings of a sorted list of
standard-library modules and their public functions and classes (redistributable, offline, and not
the benchmarks' text, pydoc_data/topics.py); forward hooks accumulate each linear's X^T X in fp32
(q/k/v share one, as do gate/up; the head's input is the final-normed hidden state, and its logits
are never computed). This is plain GPTQ: every layer sees the bf16 model's activations, not those
of a model whose earlier layers are already quantised.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import platform
import time
import warnings

import torch

logger = logging.getLogger(__name__)

ROW_CHUNK = 8192  # rows quantised at a time: bounds the fp32 working set for the 262144-row head
# GPTQ's calibration: docstrings of these stdlib modules and their public functions and classes
# (PSF-licensed, on every machine with Python, and not the benchmarks' text, pydoc_data/topics.py).
CALIBRATION_MODULES = (
    "argparse", "asyncio.events", "base64", "bisect", "calendar", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message",
    "enum", "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "hmac", "html.parser",
    "http.client", "inspect", "ipaddress", "itertools", "json", "logging", "math", "operator", "os",
    "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "secrets", "shlex", "shutil",
    "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "typing", "unittest", "urllib.parse", "uuid", "warnings",
    "weakref", "zipfile", "zlib",
)  # fmt: skip
# 16 x 512 tokens: on the 270M, 16, 32 and 64 sequences gave the same quality (perplexity +10.3%,
# +10.0%, +10.3% over bf16 on 16 windows of the benchmark text, 4-bit export); 16 costs least.
CALIBRATION_SEQUENCES = 16
CALIBRATION_LENGTH = 512  # tokens per sequence, BOS included
CALIBRATION_BATCH = 4  # sequences per forward pass
DAMP = 0.01  # added to H's diagonal, as a fraction of its mean: keeps the Cholesky well posed
BLOCK = 128  # columns whose error updates are applied lazily, as one matrix product
# Shrinks of each group's range tried when its grid is chosen. On the 270M the search took the
# 4-bit export's perplexity from +12.8% over bf16 to +10.3% (KL 0.102 -> 0.090) for ~15 s more.
CLIP_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8)


class GPTQError(ValueError):
    """Calibration or a Hessian that GPTQ cannot use; the message says which and why."""


def empty_codes(rows: int, cols: int, group_size: int):
    """(codes uint8 (rows, cols), scales bf16 and zeros uint8 (rows, cols / group)) to fill."""
    return (
        torch.empty(rows, cols, dtype=torch.uint8),
        torch.empty(rows, cols // group_size, dtype=torch.bfloat16),
        torch.empty(rows, cols // group_size, dtype=torch.uint8),
    )


@contextlib.contextmanager
def one_thread():
    """GPTQ on one thread: its work is thousands of small per-column operations and factorings of
    at most in_features^2. Per 8192 rows of the head, two threads took 0.16 s against one's 0.24 s
    on 2 idle cores, but 10 s against 0.17 s on 2 cores busy with other work (OpenMP's barriers
    wait for a descheduled thread at every operation): one thread is the safe choice.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def quantise_gptq(
    weight: torch.Tensor, hessian: torch.Tensor, group_size: int, bits: int = 4,
    damp: float = DAMP, clip: tuple[float, ...] = CLIP_FACTORS,
):  # fmt: skip
    """GPTQ codes for a (out, in) weight whose inputs X give `hessian` = 2 X^T X (in, in).

    Returns what quantise_rtn returns, in the same format: codes 0..15 chosen one input column at
    a time, each column's rounding error spread over the columns not yet quantised so that the
    layer's output XW^T moves least, rather than the weight itself.
    """
    with one_thread():
        factor, dead = inverse_factor(hessian, damp)
        return gptq_with_factor(weight, factor, dead, group_size, bits, clip)


def inverse_factor(hessian: torch.Tensor, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of the dampened H^-1, mask of inputs never seen)."""
    h = hessian.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1  # an input that was always 0: its weight is set to 0, nothing to fit
    mean = h.diagonal().mean()
    for attempt in range(4):  # a rank-deficient H: more dampening until it factors
        damped = h + torch.eye(len(h)) * (damp * 10**attempt * mean)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0:
                return upper, dead
    raise GPTQError(f"a Hessian of size {len(h)} is not positive definite even dampened")


def gptq_with_factor(weight, factor, dead, group_size: int, bits: int = 4, clip=CLIP_FACTORS):
    """GPTQ given inverse_factor's output; rows in chunks, which are independent given H."""
    rows, cols = weight.shape
    codes, scales, zeros = empty_codes(rows, cols, group_size)
    for begin in range(0, rows, ROW_CHUNK):
        block = weight[begin : begin + ROW_CHUNK].float()
        block[:, dead] = 0
        # Transposed, so that a column and the columns after it are contiguous rows.
        chosen = _gptq_columns(block.T.contiguous(), factor, group_size, 2**bits - 1, clip)
        end = begin + block.shape[0]
        codes[begin:end], scales[begin:end], zeros[begin:end] = (part.T for part in chosen)
    return codes, scales, zeros


def _gptq_columns(work, factor, group: int, top: int, clip):
    """GPTQ over the input columns of `work` (in, rows), updated in place as errors spread.

    Returns (codes, scales, zeros) transposed: (in, rows), (in / group, rows) twice.
    """
    cols, rows = work.shape
    codes = torch.empty(cols, rows, dtype=torch.uint8)
    scales = torch.empty(cols // group, rows, dtype=torch.bfloat16)
    zeros = torch.empty(cols // group, rows, dtype=torch.uint8)
    # Blocks of whole groups, so that a group's grid is chosen from fully updated weights.
    step = group * max(1, BLOCK // group)
    for first in range(0, cols, step):
        last = min(first + step, cols)
        errors = torch.empty(last - first, rows)
        for col in range(first, last):
            if col % group == 0:
                scale, zero = group_grid(work[col : col + group], top, clip)
                scales[col // group], zeros[col // group] = scale, zero
            code = ((work[col] / scale).round() + zero).clamp(0, top)
            codes[col] = code
            errors[col - first] = (work[col] - (code - zero) * scale) / factor[col, col]
            # Within the block at once, column by column; beyond it lazily, in one product.
            work[col + 1 : last].addr_(factor[col, col + 1 : last], errors[col - first], alpha=-1)
        work[last:].addmm_(factor[first:last, last:].T, errors, alpha=-1)
    return codes, scales, zeros


def group_grid(values: torch.Tensor, top: int, clip=CLIP_FACTORS):
    """(scale, zero) per row for one group of columns `values` (group, rows), fp32.

    The range includes 0 (the format can always represent 0: code == zero), so the zero point is
    in 0..top and nothing inside the range is clipped. With several `clip` factors the range is
    shrunk by each and the one with least squared rounding error kept. The scale is rounded to
    bf16 before anything is rounded against it.
    """
    low, high = values.amin(0).clamp(max=0), values.amax(0).clamp(min=0)
    best = None
    for shrink in clip:
        scale = ((high - low) * shrink / top).clamp(min=1e-8).to(torch.bfloat16).float()
        zero = (-low * shrink / scale).round().clamp(0, top)
        if len(clip) == 1:
            return scale, zero
        rebuilt = (((values / scale).round() + zero).clamp(0, top) - zero) * scale
        error = (rebuilt - values).square().sum(0)
        if best is None:
            best = error, scale, zero
        else:
            better = error < best[0]
            best = tuple(
                torch.where(better, new, old)
                for new, old in zip((error, scale, zero), best, strict=True)
            )
    return best[1], best[2]


# -- calibration ----------------------------------------------------------------------------------


class _HeadReached(Exception):
    """Raised by the head's hook: the head's input is all calibration needs, not the logits."""


def calibration_text() -> str:
    """The docstrings of CALIBRATION_MODULES and their public functions and classes, sorted."""
    import importlib

    parts = []
    for name in CALIBRATION_MODULES:
        with warnings.catch_warnings():  # typing's deprecated aliases warn when their docs are read
            warnings.simplefilter("ignore", DeprecationWarning)
            parts.extend(_documented(importlib.import_module(name), name))
    return "\n\n".join(parts)


def _documented(module, name: str) -> list[str]:
    """ "title\n\ndocstring" for `module` and each public function and class defined in it."""
    import inspect

    documented = [(name, module)] + [
        (f"{name}.{attr}", getattr(module, attr))
        for attr in sorted(dir(module))
        if not attr.startswith("_")
    ]
    parts = []
    for title, obj in documented:
        if obj is not module and not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if obj is not module and getattr(obj, "__module__", None) != name:
            continue  # imported from elsewhere: documented there, or not stdlib text at all
        doc = inspect.getdoc(obj)
        if doc:
            parts.append(f"{title}\n\n{doc}")
    return parts


def calibration_ids(tokenizer, sequences=CALIBRATION_SEQUENCES, length=CALIBRATION_LENGTH):
    """(sequences, length) token ids: BOS, then a slice of calibration_text().

    The slices are spread evenly over the text, so every module's docs are represented rather
    than the first few modules' alone.
    """
    ids = tokenizer(calibration_text(), add_special_tokens=False).input_ids
    body = length - 1
    slices = len(ids) // body
    if slices < sequences:
        raise GPTQError(f"the calibration text has {len(ids)} tokens, too few for {sequences}")
    picks = [round(index * (slices - 1) / max(sequences - 1, 1)) for index in range(sequences)]
    rows = [[tokenizer.bos_token_id, *ids[pick * body : (pick + 1) * body]] for pick in picks]
    return torch.tensor(rows)


def calibrate(source, targets: set[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """({module: H = 2 X^T X / tokens of its inputs}, facts) from the bf16 model at `source`."""
    from transformers import AutoConfig, AutoTokenizer

    from quant.loader import model_class

    config = AutoConfig.from_pretrained(source)
    net = model_class(config).from_pretrained(source, dtype=torch.bfloat16).eval()
    hessians, facts = calibrate_model(net, AutoTokenizer.from_pretrained(source), targets)
    missing = targets - set(hessians)
    if missing:
        raise GPTQError(f"calibration never reached {sorted(missing)}; they cannot use GPTQ")
    return hessians, facts


def calibrate_model(net, tokenizer, targets: set[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """({module: H} for the targets the text reaches, facts) from a loaded high-precision `net`.

    A target the calibration text never reaches (a tower that reads only images, say) is absent
    from the result; the caller decides what that module gets instead.
    """
    started = time.monotonic()
    ids = calibration_ids(tokenizer, CALIBRATION_SEQUENCES)
    device = next(net.parameters()).device
    hessians = collect_hessians(net, targets, ids.to(device))
    facts = {
        "source": "docstrings (inspect.getdoc) of the Python standard library's "
        + ", ".join(CALIBRATION_MODULES)
        + " and their public functions and classes",
        "python": platform.python_version(),
        "sequences": len(ids),
        "sequence_tokens": ids.shape[1],
        "tokens": ids.numel(),
        "token_ids_sha256": hashlib.sha256(ids.numpy().astype("<i8").tobytes()).hexdigest(),
        "activations": "plain: every layer's inputs from the bf16 model, one pass",
    }
    logger.info(
        "calibration took %.0f s (%d sequences of %d tokens, %d Hessians)",
        time.monotonic() - started, len(ids), ids.shape[1], len({id(h) for h in hessians.values()}),
    )  # fmt: skip
    return hessians, facts


@torch.inference_mode()
def collect_hessians(net, targets: set[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """X^T X (fp32, on the CPU) of each reached target's input over `ids`, scaled to H.

    One object per shared input: modules that read one tensor get the same H.
    """
    head = net.get_output_embeddings()
    sums: dict[str, torch.Tensor] = {}
    shares: dict[str, str] = {}  # module -> the module whose sum holds its input
    latest: list = [None, None]  # (input, module) of the latest call

    def accumulate(name, x):
        if x is latest[0]:  # q/k/v (and gate/up) read one tensor: one sum between them
            shares[name] = latest[1]
            return
        flat = x.reshape(-1, x.shape[-1]).float()
        if name not in sums:
            sums[name] = torch.zeros(flat.shape[1], flat.shape[1], device=flat.device)
        sums[name].addmm_(flat.T, flat)
        shares[name] = name
        latest[:] = [x, name]

    def hook_for(name):
        def hook(module, args):
            if name in targets:
                accumulate(name, args[0])
            if module is head:  # even when the head is not a target: its logits cost the most
                raise _HeadReached

        return hook

    handles = [
        module.register_forward_pre_hook(hook_for(name))
        for name, module in net.named_modules()
        if name in targets or module is head
    ]
    try:
        for begin in range(0, len(ids), CALIBRATION_BATCH):
            latest[:] = [None, None]
            with contextlib.suppress(_HeadReached):
                net(input_ids=ids[begin : begin + CALIBRATION_BATCH], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    scaled = {name: total.mul_(2 / ids.numel()).cpu() for name, total in sums.items()}
    return {name: scaled[owner] for name, owner in shares.items()}
