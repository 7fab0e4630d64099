"""KV cache blocks held by local (sliding-window) and by global layers, read from vLLM itself.

vLLM's hybrid KV cache manager keeps one group of layers per attention kind; a sliding-window group
frees the blocks that fall out of the window, a full-attention group keeps every block. vLLM 0.32
reports only the total usage, and its scheduler lives in the engine-core process, so:

- `WindowKVScheduler` (named to vLLM as `scheduler_cls`, imported in the engine-core process) adds
  the per-kind counts to the stats it sends every step, under keys prefixed with `KEY_PREFIX` in
  `SchedulerStats.num_kv_fetch_reqs_by_stage`, the one string-keyed integer map those stats carry;
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
    """vLLM's scheduler, reporting the KV blocks each layer kind holds after every step."""

    def make_stats(self, *args: Any, **kwargs: Any):
        stats = super().make_stats(*args, **kwargs)
        if stats is not None:
            held = kv_held_by_kind(self)
            # A prefill chunk is scheduled whole, so a window group briefly holds window + chunk.
            held["max_batched_tokens"] = self.scheduler_config.max_num_batched_tokens
            stats.num_kv_fetch_reqs_by_stage.update(
                {KEY_PREFIX + name: value for name, value in held.items()}
            )
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
            self.latest[name] = value
            self.peak[name] = max(self.peak.get(name, 0), value)

    def log_engine_initialized(self) -> None:
        pass

    def gauges(self) -> dict[str, float]:
        """Names for `EngineStats.extra` (shown in /metrics as gemma_engine_<name>)."""
        out = {"kv_cache_usage": self.usage}
        for name, value in self.latest.items():
            out[f"kv_{name}"] = value
            if name.endswith(("_blocks", "_bytes")):
                out[f"kv_{name}_peak"] = self.peak[name]
        return out
