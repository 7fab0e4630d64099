"""What a --model value means: a GGUF file, a checkpoint directory, a known name, the HF cache."""

from __future__ import annotations

import json
import shutil

import pytest

from quant.resolve import KNOWN_MODELS, ModelNotFoundError, gguf_for_known, resolve_model
from tests.conftest import MODEL


def test_a_known_name_resolves_to_a_converted_checkpoint():
    resolved = resolve_model(MODEL)
    assert (resolved.path / "config.json").exists()
    assert (resolved.path / "model.safetensors").exists()
    provenance = json.loads((resolved.path / "gemma_stack.json").read_text())
    assert provenance["source_sha256"] == KNOWN_MODELS[MODEL].sha256


def test_a_gguf_file_is_converted_once_with_one_bos_and_the_chat_template(tmp_path):
    from transformers import AutoTokenizer

    gguf = tmp_path / "my-gemma.gguf"
    shutil.copy(gguf_for_known(MODEL), gguf)
    resolved = resolve_model(str(gguf), root=tmp_path / "models")
    assert resolved.name == "my-gemma" and resolved.gguf == gguf
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    ids = tokenizer("Hello").input_ids
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert "<start_of_turn>" in tokenizer.chat_template
    generation = json.loads((resolved.path / "generation_config.json").read_text())
    assert sorted(generation["eos_token_id"]) == [1, 106]

    stamp = (resolved.path / "model.safetensors").stat().st_mtime_ns
    again = resolve_model(str(gguf), root=tmp_path / "models")
    assert (again.path / "model.safetensors").stat().st_mtime_ns == stamp  # not converted twice


def test_a_checkpoint_directory_is_used_as_it_is(tmp_path):
    source = resolve_model(MODEL).path
    copy = tmp_path / "local-gemma"
    copy.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, copy / name)
    resolved = resolve_model(str(copy))
    assert resolved.path == copy.resolve() and resolved.name == "local-gemma"

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        resolve_model(str(empty))


def test_an_entry_of_the_local_hugging_face_cache_is_found_offline(tmp_path, monkeypatch):
    # The cache's own layout: models--ORG--NAME/{refs/main, snapshots/<commit>/...}.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-gemma"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    resolved = resolve_model("acme/tiny-gemma", root=tmp_path / "models")
    assert resolved.path == snapshot


def test_an_unknown_model_says_what_would_resolve(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model("acme/not-here", root=tmp_path / "models")
    message = str(caught.value)
    assert "acme/not-here" in message and MODEL in message and "model hub" in message
