"""What a load produced: parameters and bytes per storage kind, what stayed high precision, why.

Every load logs `QuantReport.render()`; the bench and the tests read the numbers.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

OWN_EMBEDDING = "own table"  # QuantReport.embedding: the input embedding has its own weight
SHARED_EMBEDDING = "the head's int8 table"  # QuantReport.embedding when the two share a table


@dataclass
class QuantReport:
    method: str
    bits: int
    # storage kind ("bfloat16", "nf4", "hqq-3bit", ...) -> [parameters, bytes]
    by_kind: dict[str, list[int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # module name -> why it was kept
    quantised: list[str] = field(default_factory=list)  # module/parameter names quantised
    head: str = "tied"  # the output head: "tied" (shares the embedding table) or its codec kind
    head_module: str | None = None  # the output head's module name, when it has its own copy
    embedding: str = OWN_EMBEDDING  # or SHARED_EMBEDDING, when it reads the head's table
    notes: list[str] = field(default_factory=list)  # how some tensors were handled, for the log

    @property
    def parameters(self) -> int:
        return sum(count for count, _ in self.by_kind.values())

    @property
    def weight_bytes(self) -> int:
        return sum(size for _, size in self.by_kind.values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.weight_bytes / max(self.parameters, 1)

    def render(self) -> str:
        lines = [f"quantisation: method={self.method} bits={self.bits} head={self.head}"]
        if self.embedding != OWN_EMBEDDING:
            lines[0] += f" (the input embedding reads {self.embedding})"
        for kind, (count, size) in sorted(self.by_kind.items()):
            lines.append(f"  {kind:<18} {count / 1e6:9.2f} M params {size / 2**20:9.1f} MiB")
        lines.append(
            f"  {'total':<18} {self.parameters / 1e6:9.2f} M params "
            f"{self.weight_bytes / 2**20:9.1f} MiB ({self.bits_per_weight:.2f} bits/weight)"
        )
        if self.skipped:
            reasons = defaultdict(list)
            for name, why in self.skipped.items():
                reasons[why].append(name)
            for why, names in reasons.items():
                shown = ", ".join(names[:3]) + (
                    f" and {len(names) - 3} more" if len(names) > 3 else ""
                )
                lines.append(f"  kept high precision: {shown} ({why})")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    """The name `module` is registered under in `model`."""
    return next(name for name, candidate in model.named_modules() if candidate is module)


def _add(report: QuantReport, kind: str, count: int, size: int) -> None:
    entry = report.by_kind.setdefault(kind, [0, 0])
    entry[0] += count
    entry[1] += size


def build_report(
    model: torch.nn.Module, method: str, bits: int, skipped: dict[str, str] | None = None
) -> QuantReport:
    """Count each distinct weight once (tied weights share storage), by how it is stored."""
    from quant.codecs import Int8Embedding, Int8Head, QuantLinear
    from quant.moe import expert_storage, is_quantised_experts

    report = QuantReport(method=method, bits=bits, skipped=dict(skipped or {}))
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            parts = [getattr(module, part) for part in module.part_names]
            _add_packed(report, module.codec.kind, module.logical_shape.numel(), parts, seen)
            report.quantised.append(name)
        elif isinstance(module, Int8Head):
            parts = [module.qweight, module.scale]
            _add_packed(report, module.kind, module.qweight.numel(), parts, seen)
            report.quantised.append(name)
            report.head, report.head_module = module.kind, name
        elif isinstance(module, Int8Embedding):  # no storage of its own: the head's table
            report.embedding = SHARED_EMBEDDING
        elif is_quantised_experts(module):
            kind = module._quant_experts["codec"].kind
            for param, (shape, parts) in expert_storage(module).items():
                _add_packed(report, kind, shape.numel(), list(parts.values()), seen)
                report.quantised.append(f"{name}.{param}")
        elif _bnb_kind(module):
            weight = module.weight
            state = getattr(weight, "quant_state", None)
            count = state.shape.numel() if state is not None else weight.numel()
            extras = [state.absmax] if state is not None else [getattr(weight, "SCB", None)]
            parts = [weight] + [t for t in extras if isinstance(t, torch.Tensor)]
            _add_packed(report, _bnb_kind(module), count, parts, seen)
            report.quantised.append(name)

    for tensor in model.parameters():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            _add(report, str(tensor.dtype).removeprefix("torch."), tensor.numel(), _nbytes(tensor))
    return report


def _bnb_kind(module: torch.nn.Module) -> str | None:
    name = type(module).__name__
    return {"Linear4bit": "bnb-nf4", "Linear8bitLt": "bnb-int8"}.get(name)


def _add_packed(report, kind, count, parts, seen) -> None:
    for tensor in parts:
        seen.add(id(tensor))
    _add(report, kind, count, sum(_nbytes(tensor) for tensor in parts))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
