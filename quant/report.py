"""What a load produced: parameters and bytes per storage kind, what stayed high precision, why.

Every load logs `QuantReport.render()`; the bench and the tests read the numbers.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch


@dataclass
class QuantReport:
    method: str
    bits: int
    # storage kind ("bfloat16", "nf4", "hqq-3bit", ...) -> [parameters, bytes]
    by_kind: dict[str, list[int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # module name -> why it was kept
    quantised: list[str] = field(default_factory=list)  # module/parameter names quantised

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
        lines = [f"quantisation: method={self.method} bits={self.bits}"]
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
        return "\n".join(lines)


def _add(report: QuantReport, kind: str, count: int, size: int) -> None:
    entry = report.by_kind.setdefault(kind, [0, 0])
    entry[0] += count
    entry[1] += size


def build_report(model: torch.nn.Module, method: str, bits: int) -> QuantReport:
    """Count each distinct parameter once (tied weights share storage)."""
    report = QuantReport(method=method, bits=bits)
    seen: set[int] = set()
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in seen or not tensor.is_floating_point():
            continue
        seen.add(id(tensor))
        _add(report, str(tensor.dtype).removeprefix("torch."), tensor.numel(), _nbytes(tensor))
    return report


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
