"""Re-encode a GGUF file at another quantisation level: only the Q4_K_M file of Gemma 3 270M is
available offline, so the tests' Q8_0 and Q3_K files and `quant bench`'s llama.cpp rows at
llama.cpp's plain 4-bit formats (Q4_0, Q4_1) are made from it here.

`requantise(reader, target, ...)` copies every metadata key/value and every tensor of a file,
re-encoding the quantised tensors. gguf-py quantises Q8_0, Q4_0, Q4_1 and Q5_0 itself (ports of
ggml's reference quantisers, which llama-quantize uses when it has no importance matrix) but can
only *dequantise* Q3_K, so `quantize_q3_k` below is a small numpy port of the idea of ggml's
`quantize_row_q3_K_ref` (same block layout, same 6-bit scale coding; the per-sub-block scale is
picked by a small search instead of ggml's iterative refinement).

Shape convention: GGUF (and GGUFReader's `tensor.shape`) lists dimensions fastest-first
(ne0 = row length), numpy lists them slowest-first. `tensor.data` is already in numpy order, and
GGUFWriter reverses numpy shapes when writing, so everything here stays in numpy order and the
row length is always the last axis.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, QK_K
from gguf.quants import dequantize, quantize

Q = GGMLQuantizationType
# Written by the format itself (header counts), or by GGUFWriter on its own (the architecture).
_NOT_COPIED = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture"}


def requantise(
    reader: GGUFReader,
    target: Path,
    pick: Callable[[str, Q, tuple[int, ...]], Q],
    file_type: int,
) -> Path:
    """Write `target`: the metadata of `reader`'s file, with each tensor re-encoded at
    `pick(name, type, numpy_shape)`. A tensor already at the picked type is copied byte for byte
    (lossless); `file_type` is the llama.cpp `general.file_type` that names the new mix.

    Takes an open reader because opening one parses the 262k-entry vocabulary (many seconds):
    callers that write several files from one source open it once."""
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(target, arch)
    for field in reader.fields.values():
        if field.name in _NOT_COPIED:
            continue
        if field.name == "general.file_type":
            writer.add_file_type(file_type)
            continue
        _copy_field(writer, field)

    for tensor in reader.tensors:
        # tensor.shape is GGUF order (row length first); data.shape counts bytes when quantised
        shape = tuple(int(n) for n in reversed(tensor.shape))
        wanted = pick(tensor.name, tensor.tensor_type, shape)
        if wanted == tensor.tensor_type:
            data = tensor.data
        else:
            values = dequantize(tensor.data, tensor.tensor_type)
            data = quantize_q3_k(values) if wanted == Q.Q3_K else quantize(values, wanted)
        quantised = wanted not in (Q.F32, Q.F16)
        # A quantised tensor is handed over as its raw bytes (uint8, one row of blocks per
        # row); raw_dtype tells the writer how many values those bytes hold.
        writer.add_tensor(tensor.name, data, raw_dtype=wanted if quantised else None)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def _copy_field(writer: GGUFWriter, field) -> None:
    """Copy one key/value with its exact GGUF types: an INT32 array must not come back as
    INT64, nor a FLOAT32 scalar as FLOAT64, so types are taken from the file, not inferred."""
    main = GGUFValueType(field.types[0])
    if main == GGUFValueType.ARRAY:
        sub = GGUFValueType(field.types[-1])
        if sub == GGUFValueType.STRING:
            # raw bytes: the tokenizer's strings go back exactly as they were stored
            values = [bytes(field.parts[i]) for i in field.data]
        else:
            values = [field.parts[i].tolist()[0] for i in field.data]
        writer.add_key_value(field.name, values, main, sub_type=sub)
    elif main == GGUFValueType.STRING:
        writer.add_key_value(field.name, bytes(field.parts[-1]), main)
    else:
        writer.add_key_value(field.name, field.parts[-1].tolist()[0], main)


# --- Q3_K -----------------------------------------------------------------------------------
# block_q3_K (110 bytes per 256 weights): hmask[32], qs[64], scales[12], d (fp16).
# Each weight is q in [-4, 3]: its 2 low bits of (q + 4) in qs, its high bit in hmask. Each of
# the 16 sub-blocks of 16 weights has a signed 6-bit scale s in [-32, 31]; weight = d * s * q.

# Candidate sub-block scales, as multiples of max|x| / 4: 1.0 maps the largest weight onto the
# grid's end exactly; smaller ones clip it a little to give the rest a finer step.
_SCALE_TRIALS = np.array([1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7], dtype=np.float32)


def quantize_q3_k(values: np.ndarray) -> np.ndarray:
    """Q3_K bytes of `values` (numpy order, rows a multiple of 256), 110 bytes per 256 values."""
    *lead, row = values.shape
    if row % QK_K:
        raise ValueError(f"Q3_K needs rows of a multiple of {QK_K}, got {row}")
    x = values.astype(np.float32).reshape(-1, QK_K // 16, 16)  # (blocks, 16 sub-blocks, 16)

    scales = _best_sub_block_scales(x)
    # Code the 16 scales in 6 bits against the block's largest one, signed so that it lands
    # on -32 (ggml does the same: one more step on the negative side).
    biggest = np.take_along_axis(scales, np.abs(scales).argmax(axis=1)[:, None], axis=1)
    d = np.where(biggest == 0, 0, -biggest / 32).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(d == 0, 0, np.rint(scales / d.astype(np.float32)))
    s = np.clip(s, -32, 31).astype(np.int8)

    # Round each weight on the grid of the scale as it will be decoded (fp16 d, 6-bit s).
    step = (d.astype(np.float32) * s)[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step == 0, 0, np.rint(x / step))
    q = (np.clip(q, -4, 3) + 4).astype(np.uint8).reshape(-1, QK_K)  # 0..7

    blocks = np.concatenate(
        [_pack_hmask(q), _pack_qs(q), _pack_scales(s), d.view(np.uint8).reshape(-1, 2)], axis=1
    )
    assert blocks.shape[1] == GGML_QUANT_SIZES[Q.Q3_K][1]
    return blocks.reshape(*lead, row // QK_K * blocks.shape[1])


def _best_sub_block_scales(x: np.ndarray) -> np.ndarray:
    """Per sub-block, the scale (weight per grid step) with the least squared error on [-4, 3]."""
    at = np.abs(x).argmax(axis=2)[..., None]
    peak = np.take_along_axis(x, at, axis=2)  # signed largest weight, (blocks, 16, 1)
    # The largest weight goes to -4, the end of the grid with one more step (as in ggml).
    trials = -peak[..., None] / 4 * _SCALE_TRIALS  # (blocks, 16, 1, trials)
    trials = np.moveaxis(trials, -1, 0)  # (trials, blocks, 16, 1)
    # An all-zero sub-block has scale 0; dividing by 1 instead still gives q = 0.
    q = np.clip(np.rint(x / np.where(trials == 0, 1, trials)), -4, 3)
    error = ((x - q * trials) ** 2).sum(axis=-1)  # (trials, blocks, 16)
    best = error.argmin(axis=0)
    return np.take_along_axis(trials[..., 0], best[None], axis=0)[0]


def _pack_hmask(q: np.ndarray) -> np.ndarray:
    """Bit j//32 of hmask[j % 32] is the high bit of weight j."""
    high = (q >> 2).reshape(-1, 8, 32)  # (blocks, bit, byte)
    return (high << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)


def _pack_qs(q: np.ndarray) -> np.ndarray:
    """Each half-block of 128 weights fills 32 bytes: qs[l] holds weights l, l+32, l+64, l+96
    in bits 0-1, 2-3, 4-5, 6-7."""
    low = (q & 3).reshape(-1, 2, 4, 32)  # (blocks, half, shift, byte)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    return (low << shifts).sum(axis=2, dtype=np.uint8).reshape(-1, 64)


def _pack_scales(s: np.ndarray) -> np.ndarray:
    """12 bytes for 16 six-bit scales (stored as s + 32): the low nibbles of scales 0-7 and
    8-15 share bytes 0-7; the high 2 bits of scale j go to byte 8 + j % 4, bits 2 * (j // 4)."""
    u = (s.astype(np.int16) + 32).astype(np.uint8)  # (blocks, 16), 0..63
    low = (u[:, :8] & 0xF) | ((u[:, 8:] & 0xF) << 4)
    high = (u >> 4).reshape(-1, 4, 4)  # (blocks, j // 4, j % 4)
    high = (high << (2 * np.arange(4, dtype=np.uint8))[None, :, None]).sum(axis=1, dtype=np.uint8)
    return np.concatenate([low, high], axis=1)
