"""KV cache blocks held by local (sliding-window) and by global layers, read from vLLM itself.

vLLM's hybrid KV cache manager keeps one group of layers per attention kind; a sliding-window group
frees the blocks that fall out of the window, a full-attention group keeps every block. vLLM 0.32
reports only the total usage, and its scheduler lives in the engine-core process, so:

- `WindowKVScheduler` (named to vLLM as `scheduler_cls`, imported in the engine-core process) counts
  the blocks per kind after every `schedule()` and adds them to the stats it sends, under keys
  prefixed with `KEY_PREFIX` in `SchedulerStats.num_kv_fetch_reqs_by_stage`, the one string-keyed
  integer map those stats carry;
- `KVStatLogger` (a stat logger given to `AsyncLLM`, which runs before vLLM's own loggers) takes
  those keys out again and keeps the latest and the peak values for the server's /metrics.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.metrics.loggers import StatLoggerBase

logger = logging.getLogger(__name__)

KEY_PREFIX = "gemma_stack.kv."
KINDS = ("local", "global")


class WindowKVScheduler(Scheduler):
    """vLLM's scheduler, reporting the KV blocks each layer kind holds.

    Each stats report carries the count after the step and the highest count since the previous
    report, which is taken right after each `schedule()`: when the step's blocks are allocated,
    before a request that ends in that step frees them."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._kv_high: dict[str, int] = {}

    def schedule(self, *args: Any, **kwargs: Any):
        output = super().schedule(*args, **kwargs)
        for name, value in kv_held_by_kind(self).items():
            self._kv_high[name] = max(self._kv_high.get(name, 0), value)
        return output

    def make_stats(self, *args: Any, **kwargs: Any):
        stats = super().make_stats(*args, **kwargs)
        if stats is not None:
            latest = kv_held_by_kind(self)
            report = {KEY_PREFIX + name: value for name, value in latest.items()}
            for name, value in latest.items():
                high = max(self._kv_high.get(name, 0), value)
                report[f"{KEY_PREFIX}high.{name}"] = high
            # A prefill chunk is scheduled whole, so a window group briefly holds window + chunk.
            report[KEY_PREFIX + "max_batched_tokens"] = self.scheduler_config.max_num_batched_tokens
            stats.num_kv_fetch_reqs_by_stage.update(report)
            self._kv_high = {}
        return stats


def kv_held_by_kind(scheduler: Scheduler) -> dict[str, int]:
    """Blocks and bytes held by running requests, per kind; a block shared by requests (prefix
    caching) counts once, and the null block that stands for freed window blocks not at all."""
    groups = scheduler.kv_cache_config.kv_cache_groups
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    out = {
        f"{kind}_{what}": 0 for kind in KINDS for what in ("blocks", "bytes", "layers", "groups")
    }
    for group, manager in zip(groups, managers, strict=True):
        spec = group.kv_cache_spec
        kind = "local" if getattr(spec, "sliding_window", None) else "global"
        block_ids = {
            block.block_id
            for blocks in manager.req_to_blocks.values()
            for block in blocks
            if not block.is_null
        }
        # One block id is one page in each layer of the group.
        out[f"{kind}_blocks"] += len(block_ids)
        out[f"{kind}_bytes"] += len(block_ids) * spec.page_size_bytes * len(group.layer_names)
        out[f"{kind}_layers"] += len(group.layer_names)
        out[f"{kind}_groups"] += 1
        out["block_size"] = spec.block_size
        if kind == "local":
            out["window"] = spec.sliding_window
    return out


class KVStatLogger(StatLoggerBase):
    """Keeps the per-kind KV figures of the latest step and their peaks since the engine started."""

    def __init__(self, vllm_config=None, engine_index: int = 0):
        self.latest: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self.usage = 0.0

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if scheduler_stats is None:
            return
        stages = scheduler_stats.num_kv_fetch_reqs_by_stage
        ours = {key: stages.pop(key) for key in list(stages) if key.startswith(KEY_PREFIX)}
        if not ours:
            return
        self.usage = scheduler_stats.kv_cache_usage
        for key, value in ours.items():
            name = key[len(KEY_PREFIX) :]
            if name.startswith("high."):
                name = name[len("high.") :]
                self.peak[name] = max(self.peak.get(name, 0), value)
            else:
                self.latest[name] = value

    def log_engine_initialized(self) -> None:
        pass

    def gauges(self) -> dict[str, float]:
        """Names for `EngineStats.extra` (shown in /metrics as gemma_engine_<name>)."""
        out = {"kv_cache_usage": self.usage}
        for name, value in self.latest.items():
            out[f"kv_{name}"] = value
            if name.endswith(("_blocks", "_bytes")):
                out[f"kv_{name}_peak"] = self.peak.get(name, value)
        return out
