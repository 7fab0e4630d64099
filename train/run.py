"""One training run: config -> data -> model + LoRA -> Trainer -> adapter, manifest, registration.

Lifecycle, in order: tokenize the data with the shared chat policy (so failures come before the
model is loaded), load the base model, attach LoRA, train (resuming from the newest checkpoint in
output_dir), evaluate, publish the adapter atomically, optionally register it with a server.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, TrainingArguments, set_seed

from quant import resolve_model
from quant.chat import ChatPolicy
from train import batching
from train.config import TrainConfig
from train.data import Datasets, load_datasets
from train.manifest import build_manifest, publish_adapter
from train.model import attach_lora, load_base
from train.trainer import TargetOnlyTrainer

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    policy: ChatPolicy
    data: Datasets


@dataclass
class Result:
    adapter_dir: Path
    manifest: dict[str, Any]
    resumed_from: str | None


def chat_policy(model_path: Path, tokenizer=None) -> ChatPolicy:
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_path)
    return ChatPolicy(tokenizer, model_path / "generation_config.json")


def prepare(config: TrainConfig, tokenizer=None) -> Prepared:
    """Everything that needs only the tokenizer: what `--dry-run` shows."""
    resolved = resolve_model(config.model.name)
    policy = chat_policy(resolved.path, tokenizer)
    data = load_datasets(config.data, policy, config.training.max_length, config.training.seed)
    return Prepared(policy, data)


def plan(config: TrainConfig, data: Datasets) -> dict[str, Any]:
    t = config.training
    rows = len(_train_rows(config, data))
    per_step = t.batch_size * t.gradient_accumulation
    steps = t.max_steps or math.ceil(
        t.epochs * math.ceil(rows / t.batch_size) / t.gradient_accumulation
    )
    return {
        "rows": rows,
        "examples_per_step": per_step,
        "optimizer_steps": steps,
        "epochs": round(steps * per_step / rows, 2),
    }


def _train_rows(config: TrainConfig, data: Datasets):
    if config.training.packing:
        return batching.packed(data.train.examples, config.training.max_length)
    return batching.unpacked(data.train.examples)


def training_arguments(config: TrainConfig, device, dtype, has_eval: bool) -> TrainingArguments:
    t = config.training
    import torch

    return TrainingArguments(
        output_dir=config.output_dir,
        max_steps=t.max_steps or -1,
        num_train_epochs=t.epochs or 1,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5 reads a value below 1 as a ratio
        weight_decay=t.weight_decay,
        seed=t.seed,
        logging_steps=t.log_steps,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval and t.eval_steps else "no",
        eval_steps=t.eval_steps,
        # The weights are already bf16 on CPU; autocast matters where the weights are quantised.
        bf16=dtype == torch.bfloat16 and device.type == "cuda",
        use_cpu=device.type == "cpu",
        report_to=["tensorboard"] if t.tensorboard else "none",
        remove_unused_columns=False,
        prediction_loss_only=True,
        disable_tqdm=True,  # the command line adds its own bar (train.progress.LossBar)
        dataloader_num_workers=0,
        save_only_model=False,
    )


class CountingCollator(batching.Collator):
    """Counts the real (non-padding) tokens it hands out, for an honest tokens/s."""

    tokens = 0

    def __call__(self, rows):
        batch = super().__call__(rows)
        self.tokens += sum(len(r["input_ids"]) for r in rows)
        return batch


def train(config: TrainConfig, callbacks=(), prepared: Prepared | None = None) -> Result:
    prepared = prepared or prepare(config)
    data = prepared.data
    base = load_base(config.model, prepared.policy.tokenizer)
    set_seed(config.training.seed)  # LoRA's initial weights depend on it
    model = attach_lora(base, config.lora, config.training.gradient_checkpointing)

    collator = CountingCollator(base.tokenizer.pad_token_id, token_type_ids=base.image_text)
    eval_rows = batching.unpacked(data.eval.examples) if data.eval else None
    trainer = TargetOnlyTrainer(
        model=model,
        args=training_arguments(config, base.device, base.dtype, eval_rows is not None),
        train_dataset=_train_rows(config, data),
        eval_dataset=eval_rows,
        data_collator=collator,
        callbacks=list(callbacks),
    )

    checkpoint = last_complete_checkpoint(Path(config.output_dir))
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    metrics = _metrics(output, trainer, collator, eval_rows is not None)
    metrics["resumed_from_step"] = _step_of(checkpoint) if checkpoint else None

    if not trainer.is_world_process_zero():  # under `accelerate launch`, one process writes
        return Result(
            Path(config.output_dir) / "adapter", {}, str(checkpoint) if checkpoint else None
        )
    manifest = build_manifest(
        name=config.adapter_name,
        base=base,
        policy=prepared.policy,
        peft_config=model.peft_config["default"],
        data=data,
        config=config,
        metrics=metrics,
    )
    adapter_dir = publish_adapter(model, manifest, Path(config.output_dir) / "adapter")
    return Result(adapter_dir, manifest, str(checkpoint) if checkpoint else None)


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint whose trainer_state.json exists. The Trainer writes that file last,
    so a run killed while saving leaves a checkpoint without it, which must not be resumed."""
    if not output_dir.is_dir():
        return None
    found = sorted(output_dir.glob("checkpoint-*"), key=_step_of, reverse=True)
    for checkpoint in found:
        if (checkpoint / "trainer_state.json").is_file():
            return checkpoint
        logger.warning("%s is incomplete (killed while saving?); skipping it", checkpoint)
    return None


def _step_of(checkpoint: Path) -> int:
    tail = checkpoint.name.rpartition("-")[2]
    return int(tail) if tail.isdigit() else -1


def _metrics(output, trainer, collator: CountingCollator, has_eval: bool) -> dict[str, Any]:
    runtime = output.metrics.get("train_runtime", 0.0)
    metrics = {
        "train_loss": round(output.training_loss, 5),
        "steps": output.global_step,
        "runtime_s": round(runtime, 2),
        "train_tokens_per_s": round(collator.tokens / runtime, 1) if runtime else None,
    }
    if has_eval:
        metrics["eval_loss"] = round(trainer.evaluate()["eval_loss"], 5)
    logger.info("finished: %s", metrics)
    return metrics
