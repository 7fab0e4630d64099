"""Examples -> batches: right padding, or packing several examples into one row.

Every batch carries `shift_labels` (the target for each position, -100 where none): the loss reads
targets from it directly, and the Trainer counts them to normalise gradient accumulation.
"""

from __future__ import annotations

import torch

from train.data import Example

IGNORE = -100


def shifted_labels(example: Example) -> list[int]:
    """Position t is trained to predict token t+1 where that token is a target."""
    ids, mask = example.input_ids, example.loss_mask
    return [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


class ExampleDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, list[int]]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.rows[index]


def unpacked(examples: list[Example]) -> ExampleDataset:
    rows = [
        {"input_ids": e.input_ids, "shift_labels": shifted_labels(e), "position_ids": None}
        for e in examples
    ]
    return ExampleDataset(rows)


def packed(examples: list[Example], max_length: int) -> ExampleDataset:
    """First-fit-decreasing into rows of at most max_length tokens; position ids restart at each
    example, which is how transformers' attention masks keep packed examples from seeing each
    other (block-diagonal causal mask, no flash-attention needed)."""
    bins: list[list[Example]] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: -len(e.input_ids)):
        size = len(example.input_ids)
        slot = next((i for i, free in enumerate(room) if free >= size), None)
        if slot is None:
            bins.append([example])
            room.append(max_length - size)
        else:
            bins[slot].append(example)
            room[slot] -= size
    rows = []
    for group in bins:
        rows.append(
            {
                "input_ids": [t for e in group for t in e.input_ids],
                "shift_labels": [t for e in group for t in shifted_labels(e)],
                "position_ids": [p for e in group for p in range(len(e.input_ids))],
            }
        )
    return ExampleDataset(rows)


class Collator:
    def __init__(self, pad_id: int, token_type_ids: bool):
        self.pad_id = pad_id
        # Gemma 3 image-text classes take token_type_ids (0 = text token) to tell image tokens
        # apart; transformers 4.5x refused to train them without it, 5.x still reads it.
        self.token_type_ids = token_type_ids

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        is_packed = rows[0]["position_ids"] is not None
        ids, labels, positions, attention = [], [], [], []
        for row in rows:
            pad = width - len(row["input_ids"])
            ids.append(row["input_ids"] + [self.pad_id] * pad)
            labels.append(row["shift_labels"] + [IGNORE] * pad)
            attention.append([1] * len(row["input_ids"]) + [0] * pad)
            if is_packed:
                # The padding tail becomes its own short "sequence" that nothing attends to.
                positions.append(row["position_ids"] + list(range(pad)))
        batch = {"input_ids": torch.tensor(ids), "shift_labels": torch.tensor(labels)}
        if is_packed:
            batch["position_ids"] = torch.tensor(positions)
        else:
            batch["attention_mask"] = torch.tensor(attention)
        if self.token_type_ids:
            batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        # `labels` only lets the Trainer find and count targets; the loss uses shift_labels.
        batch["labels"] = batch["shift_labels"]
        return batch
