"""Training data: files -> token ids and a loss mask, through the same chat policy the server uses.

Accepted records (JSONL lines, or rows of a `datasets` dataset saved with `save_to_disk`):
- `{"messages": [...]}`: a chat; loss on assistant turns only.
- `{"prompt": ..., "completion": ...}`: strings are a raw completion (loss on the completion);
  message lists are a chat split in two (loss on the completion's assistant turns).
- `{"text": "..."}`: plain text; loss on every token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quant.chat import ChatPolicy

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A record or file that cannot become training data; the message names where and why."""


@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is a target (its prediction is trained)
    truncated: bool = False


@dataclass
class Split:
    examples: list[Example]
    source: str
    fingerprint: str  # sha256 of the token ids and masks: changes with the data or the tokenizer

    def stats(self) -> dict[str, Any]:
        lengths = [len(e.input_ids) for e in self.examples]
        return {
            "source": self.source,
            "examples": len(self.examples),
            "tokens": sum(lengths),
            "trained_tokens": sum(sum(e.loss_mask) for e in self.examples),
            "max_length": max(lengths, default=0),
            "mean_length": round(sum(lengths) / max(len(lengths), 1), 1),
            "truncated": sum(e.truncated for e in self.examples),
            "fingerprint": self.fingerprint,
        }


@dataclass
class Datasets:
    train: Split
    eval: Split | None = None
    notes: list[str] = field(default_factory=list)


def read_records(source: str, limit: int | None = None) -> list[dict[str, Any]]:
    path = Path(source).expanduser()
    if path.is_dir():
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
        if hasattr(dataset, "keys"):  # a DatasetDict: take its train split
            if "train" not in dataset:
                raise DataError(f"{source} holds splits {list(dataset)}; none is named 'train'")
            dataset = dataset["train"]
        rows = dataset.to_list()
    elif path.is_file():
        rows = [_parse_line(line, path, n) for n, line in _lines(path)]
    else:
        raise DataError(f"data file {source!r} does not exist (a .jsonl file or a saved dataset)")
    if not rows:
        raise DataError(f"{source} holds no records")
    return rows[:limit] if limit else rows


def _lines(path: Path):
    with path.open() as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                yield number, line


def _parse_line(line: str, path: Path, number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{number}: not valid JSON ({error})") from error
    if not isinstance(record, dict):
        raise DataError(f"{path}:{number}: a line must be a JSON object")
    return record


def tokenize(record: dict[str, Any], policy: ChatPolicy) -> tuple[list[int], list[int]]:
    """Token ids and loss mask for one record, in whichever of the three formats it has."""
    if "messages" in record:
        _refuse_media(record["messages"])
        return policy.render_for_training(record["messages"])
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list):
            _refuse_media([*prompt, *completion])
            return _masked_chat(policy, prompt, completion)
        prompt_ids = policy.encode_prompt(prompt)
        tail = policy.tokenizer(completion, add_special_tokens=False).input_ids
        tail.append(policy.tokenizer.eos_token_id)
        return prompt_ids + tail, [0] * len(prompt_ids) + [1] * len(tail)
    if "text" in record:
        ids = policy.encode_prompt(record["text"]) + [policy.tokenizer.eos_token_id]
        return ids, [0] + [1] * (len(ids) - 1)  # the BOS is given, never predicted
    raise DataError(
        f"a record has keys {sorted(record)}; expected 'messages', 'prompt'+'completion' or 'text'"
    )


def _refuse_media(messages: list) -> None:
    # The policy renders media as bare markers; without pixel values the model would learn from
    # placeholders, so media in training data is refused rather than silently degraded.
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
            isinstance(p, dict) and p.get("type") not in ("text", None) for p in content
        ):
            raise DataError("image and audio parts are not supported in training data; send text")


def _masked_chat(policy: ChatPolicy, prompt: list, completion: list) -> tuple[list[int], list[int]]:
    # Assistant turns in the prompt are context, not targets: only the completion is trained.
    ids, mask = policy.render_for_training([*prompt, *completion])
    prompt_ids, _ = policy.render_for_training(prompt) if _has_assistant(prompt) else ([], [])
    for k in range(min(len(prompt_ids), len(mask))):
        mask[k] = 0
    return ids, mask


def _has_assistant(messages: list) -> bool:
    return any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages)


def build_split(
    records: list[dict[str, Any]], policy: ChatPolicy, max_length: int, source: str
) -> Split:
    examples, problems = [], []
    digest = hashlib.sha256()
    for index, record in enumerate(records):
        where = f"{source} record {index + 1}"
        try:
            ids, mask = tokenize(record, policy)
        except ValueError as error:
            problems.append(f"{where}: {error}")
            continue
        if not any(mask):
            problems.append(f"{where}: no assistant tokens to train on (the loss mask is empty)")
            continue
        truncated = len(ids) > max_length
        ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask[1:]):
            problems.append(
                f"{where}: all {sum(mask)} target tokens lie past training.max_length="
                f"{max_length}; raise training.max_length or shorten the record"
            )
            continue
        digest.update(json.dumps([ids, mask]).encode())
        examples.append(Example(ids, mask, truncated))
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise DataError(f"{len(problems)} record(s) cannot be trained on:\n  {shown}{more}")
    return Split(examples, source, digest.hexdigest())


def load_datasets(data, policy: ChatPolicy, max_length: int, seed: int) -> Datasets:
    """Train and eval splits from a config's `data` section (eval: a file, or a held-out share)."""
    train_records = read_records(data.train, data.max_examples)
    notes = []
    if data.eval:
        eval_records = read_records(data.eval)
        if data.eval_fraction:
            notes.append("data.eval is set, so data.eval_fraction is ignored")
    elif data.eval_fraction:
        random.Random(seed).shuffle(train_records)
        count = max(1, round(len(train_records) * data.eval_fraction))
        if count >= len(train_records):
            raise DataError(
                f"data.eval_fraction={data.eval_fraction} leaves no training records out of "
                f"{len(train_records)}; lower it"
            )
        eval_records, train_records = train_records[:count], train_records[count:]
    else:
        eval_records = None

    train = build_split(train_records, policy, max_length, data.train)
    evaluation = None
    if eval_records:
        evaluation = build_split(eval_records, policy, max_length, data.eval or "held-out")
    for note in notes:
        logger.warning(note)
    return Datasets(train, evaluation, notes)
