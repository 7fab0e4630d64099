"""Audio (and images beside it) in chat, through the real servers on a tiny Gemma 4.

`python -m serve` runs the tiny random Gemma 4 image+audio checkpoint built by
scripts/build_tiny_checkpoints.py (`gemma4-multimodal`) behind vLLM and behind transformers, one
at a time. WAV and MP3 clips and images are made here. Each request asks for the prompt's token
ids back (`return_token_ids`), and they must equal what the checkpoint's own HF processor makes
of the same messages: so every `<|audio|>` and `<|image|>` marker was expanded into exactly as
many soft tokens as the processor says, in prompt order, with one BOS.

    pytest tests/test_audio.py
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_media import audio_bytes, data_url, image_bytes, tiny_checkpoint

MODEL = "gemma4-multimodal"
MAX_MODEL_LEN = 1024
RATE = 16_000


def audio_part(raw: bytes, fmt: str = "wav") -> dict:
    data = base64.b64encode(raw).decode()
    return {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def decoded(raw: bytes, fmt: str) -> np.ndarray:
    """A clip as the server hands it to the engines (mono, 16 kHz). Only its length matters to
    the token count; MP3 frames pad a clip, so an MP3's length is known only once decoded."""
    from serve.media import decode_audio

    samples, rate = decode_audio(raw, fmt, "test")
    assert rate == RATE
    return samples


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    from quant._compat import processors_without_torchvision

    processors_without_torchvision()
    return AutoProcessor.from_pretrained(tiny_checkpoint(MODEL))


def expected_ids(processor, content, images=(), clips=()) -> list[int]:
    """The checkpoint's own processor on the same messages, rendered by the same chat policy."""
    from quant.chat import ChatPolicy

    path = tiny_checkpoint(MODEL)
    policy = ChatPolicy(processor.tokenizer, path / "generation_config.json")
    rendered = policy.render([{"role": "user", "content": content}])
    inputs = processor(
        text=[rendered.text], images=[list(images)] if images else None,
        audio=list(clips) or None, add_special_tokens=False, return_tensors="pt",
    )  # fmt: skip
    return inputs["input_ids"][0].tolist()


@pytest.fixture(scope="module", params=["vllm", "transformers"])
def server(request, tmp_path_factory):
    """The tiny Gemma 4 behind each engine in turn (one at a time: the machine is small)."""
    from tests.conftest import start_server, stop_server

    root = tmp_path_factory.mktemp(f"audio-{request.param}")
    media_dir = root / "media"
    media_dir.mkdir()
    # Eager mode and a small step keep the tiny vLLM server quick to start and small in memory.
    vllm_only = ["--enforce-eager", "--max-num-batched-tokens", "512"]
    running = start_server(
        [
            "--model", str(tiny_checkpoint(MODEL)), "--engine", request.param,
            "--max-model-len", str(MAX_MODEL_LEN), "--allowed-media-dir", str(media_dir),
            "--max-images", "2", "--max-audios", "3", "--cpu-kv-cache-gib", "1",
            *(vllm_only if request.param == "vllm" else []),
        ],
        root / "server.log",
    )  # fmt: skip
    running.media_dir = media_dir
    yield running
    stop_server(running.process)


def chat(running, content, model: str = MODEL, **extra):
    import httpx

    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 3,
        "temperature": 0,
        "return_token_ids": True,
        **extra,
    }
    return httpx.post(f"{running.base_url}/chat/completions", json=body, timeout=600)


def served_ids(response) -> list[int]:
    assert response.status_code == 200, response.text
    body = response.json()
    ids = body["prompt_token_ids"]
    assert body["usage"]["prompt_tokens"] == len(ids), body["usage"]
    assert body["usage"]["completion_tokens"] >= 1
    return ids


def test_wav_and_mp3_clips_of_different_lengths(server, processor):
    wav = audio_bytes(1.0)  # 16 kHz mono
    mp3 = audio_bytes(0.45, rate=44_100, fmt="MP3", channels=2)
    content = [
        {"type": "text", "text": "Which clip is longer, this one"},
        audio_part(wav),
        {"type": "text", "text": "or this one?"},
        audio_part(mp3, "mp3"),
    ]
    ids = served_ids(chat(server, content))
    clips = [decoded(wav, "wav"), decoded(mp3, "mp3")]
    assert ids == expected_ids(processor, content, clips=clips)

    # Each clip is wrapped in <|audio> ... <audio|> with one soft token per 40 ms: 25 for the
    # 1.0 s WAV (the processor's own arithmetic agrees), fewer for the MP3.
    tokenizer = processor.tokenizer
    boa, eoa = (tokenizer.convert_tokens_to_ids(t) for t in ("<|audio>", "<audio|>"))
    runs = [ids[ids.index(boa, start) + 1 : ids.index(eoa, start)] for start in _starts(ids, boa)]
    assert [len(run) for run in runs] == [25, len(runs[1])] and 5 <= len(runs[1]) < 25, runs
    assert all(set(run) == {processor.audio_token_id} for run in runs)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def _starts(ids: list[int], token: int) -> list[int]:
    return [i for i, value in enumerate(ids) if value == token]


def test_images_and_audio_mixed(server, processor):
    (server.media_dir / "wide.webp").write_bytes(image_bytes("WEBP", (90, 40), "blue"))
    clip = audio_bytes(0.6, rate=8_000)  # resampled to 16 kHz by the server
    content = [
        {"type": "text", "text": "Describe"},
        image_part(data_url(image_bytes("PNG", (40, 30), "red"))),
        {"type": "text", "text": "while you hear"},
        audio_part(clip),
        {"type": "text", "text": "and compare with"},
        image_part("wide.webp"),
    ]
    ids = served_ids(chat(server, content))
    images = [Image.new("RGB", (40, 30)), Image.new("RGB", (90, 40))]
    assert ids == expected_ids(processor, content, images, [decoded(clip, "wav")])
    # Media in prompt order: image, audio, image.
    order = [
        kind
        for token in ids
        for kind, marker in (("image", "<|image>"), ("audio", "<|audio>"))
        if token == processor.tokenizer.convert_tokens_to_ids(marker)
    ]
    assert order == ["image", "audio", "image"]
    assert ids.count(processor.image_token_id) > 0 and ids.count(processor.audio_token_id) == 15


def test_bad_audio_is_a_400_naming_the_part(server):
    cases = [
        (audio_part(b"RIFF\x24\x00\x00\x00WAVEfmt but not really a wave"), "not readable wav"),
        ({"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}, "base64"),
        (audio_part(audio_bytes(0.2), "mp3"), "the data is WAV"),
    ]
    for part, words in cases:
        response = chat(server, [{"type": "text", "text": "hear this"}, part])
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"].startswith("messages[0].content[1]"), error
        assert "messages[0].content[1]" in error["message"] and words in error["message"], error
    assert chat(server, [audio_part(audio_bytes(0.2))]).status_code == 200  # still serving


def test_over_the_context_only_after_expansion(server, processor):
    """Markers alone fit in the context; what the images become does not: a 400 with the limit
    and the expanded count, from either engine, and the server keeps serving."""
    from quant.chat import ChatPolicy

    picture = image_part(data_url(image_bytes("PNG", (64, 64), "green")))
    content = [{"type": "text", "text": "word " * 900}, picture, picture]
    images = [Image.new("RGB", (64, 64))] * 2
    expanded = len(expected_ids(processor, content, images))
    policy = ChatPolicy(processor.tokenizer)
    markers_only = len(policy.render([{"role": "user", "content": content}]).token_ids)
    assert markers_only < MAX_MODEL_LEN < expanded, (markers_only, expanded)

    response = chat(server, content, max_tokens=None)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages", error
    assert f"{MAX_MODEL_LEN} tokens" in error["message"], error
    assert f"{expanded} tokens" in error["message"], error

    # Fits with its images, but not with the completion asked for: the limit names max_tokens.
    content = [{"type": "text", "text": "word " * 800}, picture]
    expanded = len(expected_ids(processor, content, images[:1]))
    response = chat(server, content, max_tokens=MAX_MODEL_LEN - expanded + 1)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "max_tokens", error
    assert f"{expanded} in the messages" in error["message"], error
    assert f"at most {MAX_MODEL_LEN - expanded}" in error["message"], error
    assert chat(server, content, max_tokens=MAX_MODEL_LEN - expanded).status_code == 200


@pytest.fixture(scope="module")
def text_only(tmp_path_factory):
    """The tiny text-only Gemma 4 on the transformers engine: starts in seconds."""
    from tests.conftest import start_server, stop_server

    root = tmp_path_factory.mktemp("text-only")
    running = start_server(
        ["--model", str(tiny_checkpoint("gemma4-moe")), "--engine", "transformers"],
        root / "server.log",
    )
    yield running
    stop_server(running.process)


def test_text_only_model_refuses_audio(text_only):
    content = [{"type": "text", "text": "What is this?"}, audio_part(audio_bytes(0.3))]
    response = chat(text_only, content, model="gemma4-moe")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages[0].content[1]", error
    assert error["code"] == "unsupported_modality", error
    assert "audio input" in error["message"] and "does not accept audios" in error["message"]


def test_checkpoint_is_small_and_says_what_it_takes():
    from serve.engine import modalities_of

    path = tiny_checkpoint(MODEL)
    assert modalities_of(path) == {"text", "image", "audio"}
    size = sum(file.stat().st_size for file in Path(path).iterdir())
    assert size < 100 * 2**20, size
    template = (path / "chat_template.jinja").read_text()
    assert "'<|image|>'" in template and "'<|audio|>'" in template


def test_processor_refuses_video_with_the_reason(processor):
    """Without torchvision the checkpoint's video processor is a stand-in (quant/_compat.py)."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: the real video processor is used")
    with pytest.raises(ValueError, match="torchvision"):
        processor.video_processor(np.zeros((2, 32, 32, 3), dtype=np.uint8))
    assert '"video_processor_type": "Gemma4VideoProcessor"' in processor.to_json_string()
