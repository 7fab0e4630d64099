"""A transformers Trainer whose loss projects only the positions that have a target.

Gemma's output head is the 262k x hidden tied embedding: for the 270M model it is most of the
compute and nearly all of the activation memory of a step (a [tokens, 262144] fp32 logits tensor).
Prompt and padding positions have no target, so their logits are never computed. The target
positions are projected a slice at a time under activation checkpointing: only one slice's fp32
logits exist at once, in the forward and again in the backward, which recomputes them. The head's
weight is read once more per slice; for a small model on a CPU that costs little time and saves
most of a step's peak memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import Trainer

from train.batching import IGNORE

# Target positions per head projection: 128 x 262144 fp32 logits are 128 MiB.
HEAD_SLICE = 128


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The *ForCausalLM / *ForConditionalGeneration under any PEFT and distributed wrappers."""
    while hasattr(model, "module"):  # DDP / FSDP wrappers
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def target_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor]):
    """Summed cross-entropy over target positions, and how many there were."""
    targets = inputs.pop("shift_labels")
    inputs.pop("labels", None)
    keep = targets != IGNORE
    base = _base(model)
    if _distributed(model):
        logits, targets = _through_wrapper(model, inputs, targets, keep)
        return _head_loss(logits, targets, _softcap(base)), keep.sum()

    # Calling the inner decoder still runs the LoRA layers: PEFT injects them in place.
    hidden = base.model(**inputs, use_cache=False).last_hidden_state  # [batch, seq, hidden]
    head = base.get_output_embeddings()
    return _sliced_head_loss(head, hidden[keep], targets[keep], _softcap(base)), keep.sum()


def _softcap(base: torch.nn.Module) -> float | None:
    return getattr(base.config.get_text_config(), "final_logit_softcapping", None)


def _head_loss(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None):
    logits = logits.float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def _sliced_head_loss(head, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None):
    """Summed cross-entropy of head(hidden) against targets, HEAD_SLICE positions at a time."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], HEAD_SLICE):
        part = slice(start, start + HEAD_SLICE)
        total = total + checkpoint(
            lambda h, t: _head_loss(head(h), t, softcap),
            hidden[part],
            targets[part],
            use_reentrant=False,
        )
    return total


def _distributed(model: torch.nn.Module) -> bool:
    # DDP, FSDP and DeepSpeed gather weights and sync gradients in the wrapper's forward, so a
    # wrapped model must be called from the top; only the head's input can then be narrowed.
    return hasattr(model, "module") or (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def _through_wrapper(model, inputs, targets, keep):
    """The model's own forward, with logits only at positions where some row has a target."""
    positions = keep.any(dim=0).nonzero().squeeze(-1)  # [kept positions]
    logits = model(**inputs, use_cache=False, logits_to_keep=positions).logits  # [b, kept, vocab]
    chosen = targets[:, positions]
    return logits.flatten(0, 1), chosen.flatten()


class TargetOnlyTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # compute_loss below divides by the target count of the whole accumulated batch.
        self.loss_is_scaled_for_ga = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        total, count = target_loss(model, dict(inputs))
        if not model.training:
            divisor = count.clamp(min=1)
        elif num_items_in_batch is not None:
            divisor = num_items_in_batch  # targets in all micro-batches of this optimiser step
        else:
            divisor = count.clamp(min=1) * self.current_gradient_accumulation_steps
        loss = total / divisor.to(total.device) if torch.is_tensor(divisor) else total / divisor
        return (loss, {"loss": loss}) if return_outputs else loss
