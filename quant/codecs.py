"""Weight codecs: how one weight tensor is stored at a bit width, by a real quantisation library.

A codec turns a float tensor (any shape; the last dimension is the input dimension) into named
storage tensors and back. `QuantLinear` (here) and the packed MoE experts (`quant.moe`) both use
them, so a linear layer and an expert are stored the same way at the same level.

- `hqq` (8, 4, 3 bits): HQQ's half-quadratic quantiser, affine per group of `group_size` inputs,
  bit-packed by HQQ (3 bits: ten values per int32). Pure torch, so it runs on CUDA, MPS and CPU.
- `gptq` (4, 3 bits): HQQ's storage (same packing, scale and zero per group), the codes chosen
  by GPTQ (`quant.gptq`) from the layer's calibration Hessian, so that its output, not its weight,
  moves least. A tensor without a Hessian (a packed MoE expert, which calibration does not reach
  per expert) gets HQQ's own quantiser in the same storage.
- `bnb` (8, 4 bits): bitsandbytes' row-wise int8 (LLM.int8 storage) and blockwise NF4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GROUP_SIZE = 64
CODEC_BITS = {"hqq": (8, 4, 3), "gptq": (4, 3), "bnb": (8, 4)}
HQQ_STORAGE = ("hqq", "gptq")  # methods whose tensors are HQQ-packed codes, scales and zeros


@dataclass(frozen=True)
class Codec:
    method: str
    bits: int
    group_size: int = GROUP_SIZE

    @property
    def kind(self) -> str:
        if self.method == "bnb":
            return "bnb-nf4" if self.bits == 4 else "bnb-int8"
        return f"hqq-int{self.bits}"  # the storage; GPTQ only chose the codes

    def fits(self, shape: torch.Size) -> str | None:
        """None when a tensor of `shape` can be stored; otherwise the reason it cannot."""
        if shape[-1] % self.group_size:
            return f"input dimension {shape[-1]} is not a multiple of group size {self.group_size}"
        return None

    def encode(
        self, weight: torch.Tensor, dtype: torch.dtype, hessian: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Storage tensors for `weight`; `hessian` (GPTQ's H of its inputs) only for `gptq`."""
        rows = weight.detach().reshape(-1, weight.shape[-1])
        if self.method == "gptq" and hessian is not None:
            return _gptq_encode(rows, hessian, self.bits, self.group_size, dtype)
        if self.method in HQQ_STORAGE:
            return _hqq_encode(rows, self.bits, self.group_size, dtype)
        if self.bits == 4:
            return _nf4_encode(rows, self.group_size)
        return _int8_encode(rows)

    def decode(
        self, parts: dict[str, torch.Tensor], shape: torch.Size, dtype: torch.dtype
    ) -> torch.Tensor:
        rows_shape = (shape[:-1].numel(), shape[-1])
        if self.method in HQQ_STORAGE:
            rows = _hqq_decode(parts, self.bits, self.group_size, rows_shape, dtype)
        elif self.bits == 4:
            rows = _nf4_decode(parts, self.group_size, rows_shape, dtype)
        else:
            rows = _int8_decode(parts, dtype)
        return rows.reshape(shape)


def _hqq_encode(rows, bits, group_size, dtype):
    from hqq.core.quantize import Quantizer

    packed, meta = Quantizer.quantize(
        rows, nbits=bits, group_size=group_size, axis=1, optimize=True,
        compute_dtype=dtype, device=str(rows.device),
    )  # fmt: skip
    return {"qweight": packed, "scale": meta["scale"].to(dtype), "zero": meta["zero"].to(dtype)}


def _gptq_encode(rows, hessian, bits, group_size, dtype):
    """GPTQ's codes (on the CPU, fp32) in HQQ's layout: groups of `group_size` inputs as rows."""
    from hqq.core.quantize import Quantizer

    from quant.gptq import quantise_gptq

    codes, scales, zeros = quantise_gptq(rows.cpu(), hessian.cpu(), group_size, bits)
    packed = Quantizer.pack[Quantizer.bit_to_packing[bits]](codes.reshape(-1, group_size).float())
    parts = {
        "qweight": packed,
        "scale": scales.reshape(-1, 1).to(dtype),
        "zero": zeros.reshape(-1, 1).to(dtype),
    }
    return {name: tensor.to(rows.device) for name, tensor in parts.items()}


def _hqq_decode(parts, bits, group_size, rows_shape, dtype):
    from hqq.core.quantize import Quantizer

    packing = Quantizer.bit_to_packing[bits]
    meta = {
        "nbits": bits,
        "group_size": group_size,
        "shape": rows_shape,
        "scale": parts["scale"],
        "zero": parts["zero"],
        "axis": 1,
        "packing": packing,
        "view_as_float": False,
        "unpack_view_dtype": Quantizer.unpack_view_dtype[packing],
        "compute_dtype": dtype,
    }
    return Quantizer.dequantize(parts["qweight"], meta).to(dtype)


def _nf4_encode(rows, block_size):
    import bitsandbytes.functional as bnb

    packed, state = bnb.quantize_4bit(rows.contiguous(), blocksize=block_size, quant_type="nf4")
    return {"qweight": packed, "absmax": state.absmax}


def _nf4_decode(parts, block_size, rows_shape, dtype):
    import bitsandbytes.functional as bnb

    state = bnb.QuantState(
        absmax=parts["absmax"],
        shape=torch.Size(rows_shape),
        code=bnb.get_4bit_type("nf4", device=parts["qweight"].device),
        blocksize=block_size,
        quant_type="nf4",
        dtype=dtype,
    )
    return bnb.dequantize_4bit(parts["qweight"], state)


def _int8_encode(rows):
    import bitsandbytes.functional as bnb

    quantised, row_stats, _ = bnb.int8_vectorwise_quant(rows.contiguous())
    return {"qweight": quantised, "row_stats": row_stats}


def _int8_decode(parts, dtype):
    import bitsandbytes.functional as bnb

    return bnb.int8_vectorwise_dequant(parts["qweight"], parts["row_stats"]).to(dtype)


class QuantLinear(nn.Module):
    """A linear layer whose weight lives in a codec's storage and is decoded for each call.

    Decoding per call keeps only the packed form resident, which is what shrinks memory; the
    decoded weight is a temporary of one layer at a time.
    """

    def __init__(self, codec: Codec, in_features: int, out_features: int, dtype: torch.dtype):
        super().__init__()
        self.codec = codec
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = dtype
        self.bias: nn.Parameter | None = None
        self.part_names: tuple[str, ...] = ()

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, codec: Codec, dtype: torch.dtype, hessian=None
    ) -> QuantLinear:
        layer = cls(codec, linear.in_features, linear.out_features, dtype)
        layer.set_parts(codec.encode(linear.weight, dtype, hessian))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        return layer

    def set_parts(self, parts: dict[str, torch.Tensor]) -> None:
        self.part_names = tuple(parts)
        for name, tensor in parts.items():
            self.register_buffer(name, tensor)

    @property
    def logical_shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    def dequantized_weight(self) -> torch.Tensor:
        parts = {name: getattr(self, name) for name in self.part_names}
        return self.codec.decode(parts, self.logical_shape, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, codec={self.codec.kind}"


HEAD_KIND = "int8-rowwise"


class Int8Head(nn.Module):
    """The output projection as int8 rows with one scale per row (symmetric, per output token).

    Gemma ties its output head to the 262144 x 640 embedding table, and single-stream decode reads
    the whole head for every token, so a head left at bf16 caps the decode speed of every level.
    When the two were tied, the input embedding then looks its rows up in this same int8 table
    (`Int8Embedding`), so the model keeps one table, as the bf16 model did. The matmul is torch's
    int8 weight-only kernel, which reads the int8 rows directly: the group codecs above decode the
    full weight per call, and for a 168 M-weight head that decode would cost more time than the
    bf16 read it replaces.
    """

    kind = HEAD_KIND

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # The compute dtype is the scale's: it follows `model.to(dtype)` with no copy to go stale.
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, dtype=dtype))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, dtype: torch.dtype) -> Int8Head:
        rows = weight.detach().float()
        scale = (rows.abs().amax(dim=1) / 127).clamp(min=1e-8)
        head = cls(rows.shape[1], rows.shape[0], dtype)
        head.qweight = (rows / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        head.scale = scale.to(dtype)
        return head

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.scale.dtype)
        out = torch._weight_int8pack_mm(rows, self.qweight, self.scale)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, codec={self.kind}"


class Int8Embedding(nn.Module):
    """The input embedding reading its rows from the output head's int8 table (one table for both).

    A tied model's embedding and head are one matrix; once the head is int8, a bf16 copy kept
    for lookups alone would be 2 bytes per weight of the 262144 x 640 table (320 MiB of the
    270M's 511) for one row per token. The head is held by a plain reference, not as a submodule,
    so it stays registered once, under its own name, and moves with the model on `.to()`.
    `embed_scale` is the factor Gemma multiplies looked-up rows by (sqrt(hidden size)).
    """

    kind = "int8-rowwise (the head's table)"

    def __init__(self, head: Int8Head, embed_scale: float = 1.0):
        super().__init__()
        object.__setattr__(self, "head", head)  # not a submodule: see above
        self.num_embeddings = head.out_features
        self.embedding_dim = head.in_features
        self.embed_scale = embed_scale

    def __getattr__(self, name: str):
        if name == "weight":  # resizing, PEFT on embeddings and tie_weights want a table
            raise AttributeError(
                "this input embedding reads the int8 output head's table and has no weight of "
                "its own; load with quantise_head=False to keep the bf16 embedding table"
            )
        return super().__getattr__(name)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        head = self.head
        dtype = head.scale.dtype  # follows `model.to(dtype)`, as the head does
        rows = F.embedding(input_ids, head.qweight).to(dtype) * head.scale[input_ids, None]
        return rows * torch.tensor(self.embed_scale, dtype=dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, codec={self.kind}"


def embed_scale_of(embedding: nn.Module) -> float:
    """The factor an embedding module multiplies its rows by (Gemma: sqrt(hidden)), else 1."""
    scale = getattr(embedding, "scalar_embed_scale", None)
    if scale is None:
        scale = getattr(embedding, "embed_scale", 1.0)
    return float(scale)
