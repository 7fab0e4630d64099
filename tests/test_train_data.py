"""Tokenising training data with the shared chat policy, batching, and the target-only loss,
against the real Gemma 3 270M tokenizer and model."""

from __future__ import annotations

import json

import pytest
import torch

from train import batching
from train.data import DataError, Example, build_split, read_records, tokenize

pytest_plugins = ["conftest_train"]

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And Spain?"},
    {"role": "assistant", "content": "Madrid."},
]


@pytest.fixture(scope="module")
def policy():
    from conftest_train import MODEL_DIR

    if not (MODEL_DIR / "config.json").exists():
        pytest.fail("needs the converted gemma-3-270m checkpoint (`make model`)")
    from train.run import chat_policy

    return chat_policy(MODEL_DIR)


def _targets(policy, ids, mask):
    return policy.tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])


def test_chat_has_one_bos_and_trains_assistant_turns_only(policy):
    ids, mask = tokenize({"messages": CHAT}, policy)
    assert ids[0] == policy.bos_id and ids.count(policy.bos_id) == 1
    assert _targets(policy, ids, mask) == "Paris.<end_of_turn>Madrid.<end_of_turn>"
    # exactly the tokens the server would render for the same conversation
    assert ids == policy.render(CHAT, add_generation_prompt=False).token_ids


def test_prompt_completion_and_text_formats(policy):
    ids, mask = tokenize({"prompt": "2+2=", "completion": "4"}, policy)
    assert ids.count(policy.bos_id) == 1 and _targets(policy, ids, mask) == "4<eos>"

    chat = {"prompt": CHAT[:4], "completion": CHAT[4:]}
    ids, mask = tokenize(chat, policy)
    assert _targets(policy, ids, mask) == "Madrid.<end_of_turn>"  # the prompt's answer is context

    ids, mask = tokenize({"text": "Hello world"}, policy)
    assert mask[0] == 0 and all(mask[1:]) and ids[-1] == policy.tokenizer.eos_token_id


def test_empty_mask_and_bad_records_fail_loudly(policy):
    records = [
        {"messages": [{"role": "user", "content": "no answer here"}]},
        {"question": "?"},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
                      {"role": "assistant", "content": "a cat"}]},
    ]  # fmt: skip
    with pytest.raises(DataError) as caught:
        build_split(records, policy, 64, "t.jsonl")
    message = str(caught.value)
    assert "3 record(s) cannot be trained on" in message
    assert "t.jsonl record 1: no assistant tokens" in message
    assert "t.jsonl record 2: a record has keys ['question']" in message
    assert "t.jsonl record 3: image and audio parts are not supported" in message


def test_truncation_is_counted_and_answers_cut_off_entirely_are_refused(policy):
    long = {"messages": [CHAT[1], {"role": "assistant", "content": "word " * 50}]}
    split = build_split([long, {"messages": CHAT[1:3]}], policy, 20, "t")
    assert split.stats()["truncated"] == 1 and split.stats()["max_length"] == 20

    prompt_only = {"messages": [{"role": "user", "content": "x " * 40}, CHAT[2]]}
    with pytest.raises(DataError, match="raise training.max_length"):
        build_split([prompt_only], policy, 20, "t")


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n\n{not json}\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: not valid JSON"):
        read_records(str(path))
    with pytest.raises(DataError, match="does not exist"):
        read_records(str(tmp_path / "missing.jsonl"))


def test_saved_datasets_directory_is_read(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"text": "a"}, {"text": "b"}]).save_to_disk(str(tmp_path / "ds"))
    assert read_records(str(tmp_path / "ds")) == [{"text": "a"}, {"text": "b"}]


def test_packing_restarts_positions_and_keeps_every_target():
    examples = [Example([2, 5, 6, 7], [0, 0, 1, 1]), Example([2, 8, 9], [0, 1, 1])]
    rows = batching.packed(examples, max_length=16)
    assert len(rows) == 1
    row = rows[0]
    assert row["position_ids"] == [0, 1, 2, 3, 0, 1, 2]
    assert row["shift_labels"] == [-100, 6, 7, -100, 8, 9, -100]


@pytest.fixture(scope="module")
def model():
    from conftest_train import MODEL_DIR
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()


def test_target_only_loss_equals_the_models_own_loss(policy, model):
    from train.trainer import target_loss

    examples = [Example(*tokenize({"messages": CHAT}, policy)),
                Example(*tokenize({"messages": CHAT[1:3]}, policy))]  # fmt: skip
    batch = batching.Collator(policy.tokenizer.pad_token_id, False)(
        [batching.unpacked(examples)[i] for i in range(2)]
    )
    labels = batch["input_ids"].clone()
    labels[batch["shift_labels"].roll(1, dims=1) == -100] = -100  # same targets, unshifted
    with torch.no_grad():
        reference = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels
        ).loss
        total, count = target_loss(model, dict(batch))
    assert count == sum(sum(e.loss_mask) for e in examples)
    assert torch.allclose(total / count, reference, atol=1e-4), (total / count, reference)

    # the path taken under DDP / FSDP / DeepSpeed (through the wrapper's forward) agrees too
    from train import trainer

    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "_distributed", lambda model: True)
        wrapped_total, _ = target_loss(model, dict(batch))
    assert torch.allclose(wrapped_total, total, rtol=1e-4), (wrapped_total, total)


def test_head_slices_give_the_same_loss_and_gradient(policy, model):
    """The head is projected a few target positions at a time under checkpointing: slices of 4
    (here 4, then a short 2) give the loss and input gradient of one projection of them all."""
    from train import trainer

    examples = [Example(*tokenize({"messages": CHAT}, policy))]
    batch = batching.Collator(policy.tokenizer.pad_token_id, False)(batching.unpacked(examples))
    keep = batch["shift_labels"] != -100
    with torch.no_grad():
        hidden = model.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state[keep]
    head, targets = model.get_output_embeddings(), batch["shift_labels"][keep]
    assert targets.numel() == 6

    results = []
    for size in (4, 10_000):
        h = hidden.detach().clone().requires_grad_(True)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(trainer, "HEAD_SLICE", size)
            loss = trainer._sliced_head_loss(head, h, targets, None)
        loss.backward()
        results.append((loss.detach(), h.grad))
    (sliced, sliced_grad), (whole, whole_grad) = results
    assert torch.allclose(sliced, whole, rtol=1e-5), (sliced, whole)
    assert torch.allclose(sliced_grad.float(), whole_grad.float(), atol=1e-3)
    assert whole_grad.abs().sum() > 0


def test_packed_rows_do_not_attend_across_examples(policy, model):
    """A packed row must give each example the loss it has alone (block-diagonal attention)."""
    from train.trainer import target_loss

    examples = [Example(*tokenize({"messages": CHAT}, policy)),
                Example(*tokenize({"messages": CHAT[1:3]}, policy))]  # fmt: skip
    collate = batching.Collator(policy.tokenizer.pad_token_id, False)
    with torch.no_grad():
        packed_total, _ = target_loss(model, dict(collate([batching.packed(examples, 256)[0]])))
        alone = [target_loss(model, dict(collate([r])))[0] for r in batching.unpacked(examples)]
    assert torch.allclose(packed_total, sum(alone), rtol=1e-4), (packed_total, alone)


def test_manifest_contract_fields_are_documented():
    import train.manifest as manifest

    for key in ("format", "base_model", "tokenizer", "lora", "data", "config", "metrics"):
        assert f"    {key}" in manifest.__doc__
    assert manifest.MANIFEST == "gemma_stack_adapter.json"
    assert json.dumps({"format": manifest.FORMAT})
