"""Images and audio in chat messages: the loader's limits, then the real servers on tiny models.

The loader tests need no model: they decode real PNG / JPEG / WebP / WAV / MP3 bytes made here and
fetch over a loopback HTTP server started here (allow-listed by its address). The server tests run
`python -m serve` on the tiny random Gemma 3 image-text checkpoint built by
scripts/build_tiny_checkpoints.py, through vLLM and through transformers, and check that the
prompt length each engine reports equals what the model's own HF processor makes of the same
messages (so every image placeholder was expanded exactly once, with one BOS).

    pytest tests/test_media.py
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from serve.media import AUDIO_SAMPLE_RATE, MediaError, MediaLoader

# -- real media, made here -----------------------------------------------------------------------


def image_bytes(fmt: str = "PNG", size=(40, 30), color="red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def audio_bytes(seconds: float, rate: int = 16_000, fmt: str = "WAV", channels: int = 1) -> bytes:
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, np.stack([tone] * channels, axis=1), rate, format=fmt)
    return buffer.getvalue()


def image_part(url: str, where: str = "messages[0].content[0]") -> dict:
    return {
        "type": "image",
        "source": {"type": "image_url", "image_url": {"url": url}},
        "where": where,
    }


def audio_part(raw: bytes, fmt: str = "wav", where: str = "messages[0].content[0]") -> dict:
    data = base64.b64encode(raw).decode()
    source = {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}
    return {"type": "audio", "source": source, "where": where}


def loader(**overrides) -> MediaLoader:
    settings = dict(
        allowed_media_dir=None, allowed_media_domains=[], max_media_mb=1.0, media_timeout=2.0,
        max_images=4, max_audios=4,
    )  # fmt: skip
    settings.update(overrides)
    return MediaLoader(SimpleNamespace(**settings))


def load(media: MediaLoader, *parts: dict) -> list[dict]:
    return asyncio.run(media.load(list(parts)))


def refused(media: MediaLoader, part: dict, *words: str) -> MediaError:
    with pytest.raises(MediaError) as caught:
        load(media, part)
    message = str(caught.value)
    assert part["where"] in message and caught.value.param.startswith(part["where"]), message
    for word in words:
        assert word in message, message
    return caught.value


# -- data URLs and audio -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt,mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")]
)
def test_data_url_images_decode_to_rgb(fmt, mime):
    (item,) = load(loader(), image_part(data_url(image_bytes(fmt, (37, 21)), mime)))
    assert item["kind"] == "image"
    assert item["data"].mode == "RGB" and item["data"].size == (37, 21)


def test_bad_image_payloads_name_the_part():
    media = loader()
    refused(media, image_part("data:image/png;base64,@@not-base64@@"), "base64")
    refused(media, image_part(data_url(b"plain text, not pixels")), "not a readable image")
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, "GIF")
    refused(media, image_part(data_url(gif.getvalue(), "image/gif")), "image/gif")
    refused(media, image_part(data_url(gif.getvalue(), "image/png")), "GIF")
    truncated = image_bytes("PNG", (64, 64))[:-40]
    refused(media, image_part(data_url(truncated)), "damaged")
    refused(media, image_part("ftp://example.invalid/cat.png"), "'ftp'")


def test_size_cap_applies_before_decoding():
    big = np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(big).save(buffer, "PNG")  # noise does not compress: ~1.4 MiB
    refused(loader(max_media_mb=1.0), image_part(data_url(buffer.getvalue())), "max_media_mb")


def test_audio_wav_and_mp3_become_mono_16k():
    media = loader()
    wav, mp3 = audio_bytes(1.0, 16_000), audio_bytes(0.5, 44_100, "MP3", channels=2)
    first, second = load(media, audio_part(wav), audio_part(mp3, "mp3", "messages[0].content[1]"))
    samples, rate = first["data"]
    assert rate == AUDIO_SAMPLE_RATE and samples.dtype == np.float32 and samples.ndim == 1
    assert len(samples) == 16_000
    samples, rate = second["data"]
    # MP3 frames pad the clip a little; the length follows the duration, not the source rate.
    assert rate == AUDIO_SAMPLE_RATE and abs(len(samples) / 16_000 - 0.5) < 0.1
    spectrum = np.abs(np.fft.rfft(samples))
    assert abs(np.argmax(spectrum) * 16_000 / len(samples) - 440) < 10  # the tone survived


def test_bad_audio_names_the_part():
    media = loader()
    refused(media, audio_part(b"RIFF....not a wave"), "not readable wav")
    refused(media, audio_part(audio_bytes(0.2), "mp3"), "format='mp3'", "WAV")
    refused(media, audio_part(audio_bytes(0.2), "flac"), "'flac'")


def test_counts_over_the_limit_name_the_first_extra_part():
    parts = [image_part(data_url(image_bytes()), f"messages[0].content[{i}]") for i in range(3)]
    with pytest.raises(MediaError, match=r"messages\[0\]\.content\[2\].*max_images"):
        load(loader(max_images=2), *parts)


# -- files -----------------------------------------------------------------------------------------


def test_files_only_inside_the_allowed_dir(tmp_path: Path):
    allowed, outside = tmp_path / "media", tmp_path / "private"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "cat.png").write_bytes(image_bytes(size=(9, 7)))
    (outside / "secret.png").write_bytes(image_bytes())
    (allowed / "link.png").symlink_to(outside / "secret.png")
    media = loader(allowed_media_dir=allowed)

    for url in (str(allowed / "cat.png"), f"file://{allowed / 'cat.png'}", "cat.png"):
        (item,) = load(media, image_part(url))
        assert item["data"].size == (9, 7)
    refused(media, image_part(str(allowed / "link.png")), "outside the allowed media directory")
    refused(media, image_part(str(allowed / ".." / "private" / "secret.png")), "outside")
    refused(media, image_part(f"file://{outside / 'secret.png'}"), "outside")
    refused(media, image_part(str(allowed / "missing.png")), "no file")
    refused(loader(), image_part(str(allowed / "cat.png")), "--allowed-media-dir")


# -- http(s), against a loopback server started here ---------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    routes: dict = {}
    seen: list = []

    def do_GET(self):  # noqa: N802 (the stdlib's name)
        self.seen.append(self.path)
        status, headers, body, delay = self.routes.get(self.path, (404, {}, b"", 0))
        if delay:
            threading.Event().wait(delay)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def web():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    _Handler.routes = {
        "/cat.png": (200, {"Content-Type": "image/png"}, image_bytes(size=(11, 5)), 0),
        "/moved": (302, {"Location": "/cat.png"}, b"", 0),
        "/away": (302, {"Location": "http://localhost:9/cat.png"}, b"", 0),
        "/loop": (302, {"Location": "/loop"}, b"", 0),
        "/big": (200, {}, b"x" * (2 * 1024 * 1024), 0),
        "/slow": (200, {}, image_bytes(), 3.0),
    }
    yield SimpleNamespace(base=base, seen=_Handler.seen)
    server.shutdown()


def test_urls_are_off_by_default(web):
    web.seen.clear()
    refused(loader(), image_part(f"{web.base}/cat.png"), "fetches no URLs")
    assert web.seen == []  # refused before any request was sent


def test_allowed_host_with_redirects_and_caps(web):
    media = loader(allowed_media_domains=["127.0.0.1"], media_timeout=1.0)
    (item,) = load(media, image_part(f"{web.base}/cat.png"))
    assert item["data"].size == (11, 5)
    (item,) = load(media, image_part(f"{web.base}/moved"))
    assert item["data"].size == (11, 5)

    web.seen.clear()
    refused(media, image_part(f"{web.base}/away"), "localhost", "not on an allowed host")
    assert web.seen == ["/away"]  # the redirect target on another host was never asked
    refused(media, image_part(f"{web.base}/loop"), "redirected more than")
    refused(media, image_part(f"{web.base}/big"), "max_media_mb")
    refused(media, image_part(f"{web.base}/slow"), "longer than 1 s")
    refused(media, image_part(f"{web.base}/nothing-here"), "HTTP 404")
    other_port = loader(allowed_media_domains=["127.0.0.1:9"])
    refused(other_port, image_part(f"{web.base}/cat.png"), "allowed hosts are 127.0.0.1:9")


# -- the real servers on the tiny image-text Gemma 3 ---------------------------------------------

TWO_IMAGES = [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (90, 64), "blue")]


def tiny_checkpoint(name: str) -> Path:
    """scripts/build_tiny_checkpoints.py's checkpoint, built on first use (about a minute)."""
    import subprocess
    import sys

    from quant.resolve import models_dir

    path = models_dir() / "tiny" / name
    if not (path / "config.json").exists():
        script = Path(__file__).resolve().parents[1] / "scripts" / "build_tiny_checkpoints.py"
        subprocess.run([sys.executable, str(script), "--only", name], check=True)
    return path


def start_tiny(engine: str, root: Path):
    from tests.conftest import start_server

    media_dir = root / "media"
    media_dir.mkdir()
    # Eager mode and a small step keep the tiny vLLM server quick to start and small in memory.
    vllm_only = ["--enforce-eager", "--max-num-batched-tokens", "512"] if engine == "vllm" else []
    running = start_server(
        [
            "--model", str(tiny_checkpoint("gemma3-vision")), "--engine", engine,
            "--max-model-len", "1024", "--allowed-media-dir", str(media_dir),
            "--max-images", "3", "--max-audios", "1", "--cpu-kv-cache-gib", "1", *vllm_only,
        ],
        root / f"{engine}.log",
    )  # fmt: skip
    running.media_dir = media_dir
    return running


@pytest.fixture(scope="module", params=["vllm", "transformers"])
def vision_server(request, tmp_path_factory):
    """The same tiny checkpoint behind each engine in turn (one at a time: memory is shared)."""
    from tests.conftest import stop_server

    running = start_tiny(request.param, tmp_path_factory.mktemp(request.param))
    running.engine = request.param
    yield running
    stop_server(running.process)


def chat(running, content, max_tokens: int = 4):
    import httpx

    body = {
        "model": Path(tiny_checkpoint("gemma3-vision")).name,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    return httpx.post(f"{running.base_url}/chat/completions", json=body, timeout=600)


def processor_count(content, images) -> int:
    """Prompt length per the checkpoint's own HF processor, for the same messages."""
    from transformers import AutoProcessor

    from quant.chat import ChatPolicy

    processor = AutoProcessor.from_pretrained(tiny_checkpoint("gemma3-vision"))
    rendered = ChatPolicy(processor.tokenizer).render([{"role": "user", "content": content}])
    inputs = processor(
        text=[rendered.text], images=[images], add_special_tokens=False, return_tensors="pt"
    )
    ids = inputs["input_ids"][0].tolist()
    config = json.loads((tiny_checkpoint("gemma3-vision") / "config.json").read_text())
    assert ids.count(processor.tokenizer.bos_token_id) == 1
    assert ids.count(config["image_token_index"]) == config["mm_tokens_per_image"] * len(images)
    return len(ids)


def test_images_and_text_counted_as_the_processor_counts(vision_server):
    content = [
        {"type": "text", "text": "Compare the first picture"},
        {"type": "image_url", "image_url": {"url": data_url(image_bytes("PNG", (40, 30), "red"))}},
        {"type": "text", "text": "with the second one:"},
        {"type": "image_url", "image_url": {"url": "blue.webp"}},
    ]
    (vision_server.media_dir / "blue.webp").write_bytes(image_bytes("WEBP", (90, 64), "blue"))
    response = chat(vision_server, content)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] == processor_count(content, TWO_IMAGES), usage
    assert usage["completion_tokens"] >= 1


def test_refusals_name_the_part(vision_server):
    wav = base64.b64encode(audio_bytes(0.3)).decode()
    audio = {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}
    cases = [
        ([{"type": "text", "text": "hi"}, audio], "messages[0].content[1]", "audio"),
        (
            [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
            "messages[0].content[0]", "not a readable image",
        ),
        (
            [{"type": "image_url", "image_url": {"url": "/etc/hostname"}}],
            "messages[0].content[0]", "outside the allowed media directory",
        ),
        (
            [{"type": "image_url", "image_url": {"url": data_url(image_bytes())}}] * 4,
            "messages[0].content[3]", "max_images",
        ),
    ]  # fmt: skip
    for content, where, words in cases:
        response = chat(vision_server, content)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert where in error["message"] and error["param"] == where, error
        assert words in error["message"], error
    assert chat(vision_server, "still serving").status_code == 200


def test_text_only_model_refuses_images(client):
    import openai

    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": data_url(image_bytes())}},
    ]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="gemma-3-270m", messages=[{"role": "user", "content": content}], max_tokens=4
        )
    message = caught.value.body["message"]
    assert "messages[0].content[1]" in message and "does not accept images" in message
