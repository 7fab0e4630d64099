"""Images and audio from chat content parts, fetched and decoded under the server's limits.

    loader = MediaLoader(config)
    items = await loader.load(rendered.media)  # [{"kind": "image", "data": PIL.Image}, ...]

Where media may come from, each source off unless configured:
- `data:` URLs (PNG, JPEG, WebP images) and `input_audio` parts (base64 WAV or MP3): always;
- files, as `file://` URLs or plain paths, only inside `allowed_media_dir` (symlinks resolved, so a
  link cannot lead out of it);
- `http(s)://` URLs only for hosts named in `allowed_media_domains`, with the size cap, the timeout
  and at most `MAX_REDIRECTS` redirects, each of which must stay on an allowed host.

Every refusal is a `MediaError` (a 400) that names the part (`messages[i].content[j]`), says what
was wrong with it and what to send instead. Audio is returned as mono float32 at 16 kHz, the rate
Gemma's audio encoders take, so no engine has to resample it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import numpy as np

from quant.chat import ChatError

logger = logging.getLogger(__name__)

AUDIO_SAMPLE_RATE = 16_000  # what Gemma 3n / Gemma 4 audio feature extractors expect
IMAGE_FORMATS = {"PNG", "JPEG", "WEBP"}
AUDIO_FORMATS = {"wav": "WAV", "mp3": "MP3"}
MAX_REDIRECTS = 3
MAX_IMAGE_PIXELS = 50_000_000  # decompression-bomb guard: 50 megapixels is far past any encoder
_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?),(?P<data>.*)$", re.S
)


class MediaError(ChatError):
    """A content part that cannot be used; answered as a 400 naming the part."""


class MediaLoader:
    def __init__(self, config):
        self.media_dir = (
            Path(config.allowed_media_dir).resolve() if config.allowed_media_dir else None
        )
        self.domains = [domain.lower() for domain in config.allowed_media_domains]
        self.max_bytes = int(config.max_media_mb * 1024 * 1024)
        self.timeout = config.media_timeout
        self.limits = {"image": config.max_images, "audio": config.max_audios}

    async def load(self, parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Decode every part, in prompt order, after checking the per-request counts."""
        self._check_counts(parts)
        return list(await asyncio.gather(*(self._load_one(part) for part in parts)))

    def _check_counts(self, parts: list[dict[str, Any]]) -> None:
        for kind, limit in self.limits.items():
            of_kind = [part for part in parts if part["type"] == kind]
            if len(of_kind) > limit:
                where = of_kind[limit]["where"]
                raise MediaError(
                    f"{where}: this request has {len(of_kind)} {kind} parts, more than the "
                    f"server's limit of {limit} per request (max_{kind}s); send at most {limit}",
                    where,
                )

    async def _load_one(self, part: dict[str, Any]) -> dict[str, Any]:
        where, source = part["where"], part["source"]
        if part["type"] == "image":
            raw = await self._image_bytes(source, where)
            return {"kind": "image", "data": decode_image(raw, where)}
        audio = source.get("input_audio") or source.get("audio") or {}
        if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
            raise MediaError(f"{where}.input_audio.data is missing; send base64 WAV or MP3", where)
        raw = self._base64(audio["data"], f"{where}.input_audio.data")
        return {"kind": "audio", "data": decode_audio(raw, audio.get("format"), where)}

    # -- where image bytes come from ------------------------------------------------------------

    async def _image_bytes(self, source: dict[str, Any], where: str) -> bytes:
        image_url = source.get("image_url", source.get("image"))
        url = image_url.get("url") if isinstance(image_url, dict) else image_url
        if not isinstance(url, str) or not url:
            raise MediaError(f"{where}.image_url.url is missing; send a data: URL or a path", where)
        scheme = urlsplit(url).scheme.lower()
        if scheme == "data":
            return self._data_url(url, where)
        if scheme in ("http", "https"):
            try:
                return await asyncio.wait_for(self._fetch(url, where), self.timeout)
            except (TimeoutError, httpx.HTTPError) as error:
                raise self._unreachable(url, where, error) from error
        if scheme == "file" or scheme == "":
            path = unquote(urlsplit(url).path) if scheme == "file" else url
            return await asyncio.to_thread(self._read_file, path, where)
        raise MediaError(
            f"{where}.image_url.url has scheme {scheme!r}; use data:, file:// (inside the "
            "allowed media directory) or http(s):// (for an allowed domain)",
            where,
        )

    def _data_url(self, url: str, where: str) -> bytes:
        match = _DATA_URL.match(url)
        if match is None or ";base64" not in (match["params"] or ""):
            raise MediaError(
                f"{where}.image_url.url is not a base64 data URL; send "
                "'data:image/png;base64,<data>' (PNG, JPEG or WebP)",
                where,
            )
        mime = (match["mime"] or "").lower()
        if mime not in ("image/png", "image/jpeg", "image/jpg", "image/webp"):
            raise MediaError(
                f"{where}.image_url.url has media type {mime or '(none)'!r}; "
                "send image/png, image/jpeg or image/webp",
                where,
            )
        return self._base64(match["data"], f"{where}.image_url.url")

    def _base64(self, text: str, where: str) -> bytes:
        if len(text) * 3 // 4 > self.max_bytes:
            raise self._too_large(where, len(text) * 3 // 4)
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as error:
            raise MediaError(
                f"{where} is not valid base64 ({error}); send the bytes base64-encoded", where
            ) from error

    def _read_file(self, value: str, where: str) -> bytes:
        if self.media_dir is None:
            raise MediaError(
                f"{where}: file paths are off on this server; send a data: URL, or start the "
                "server with --allowed-media-dir DIR",
                where,
            )
        candidate = Path(value)
        if not candidate.is_absolute():
            candidate = self.media_dir / candidate
        try:
            path = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            raise MediaError(
                f"{where}: no file at {value!r} in the allowed media directory", where
            ) from None
        if not path.is_relative_to(self.media_dir) or not path.is_file():
            raise MediaError(
                f"{where}: {value!r} is outside the allowed media directory {self.media_dir} "
                "(symlinks are resolved); put the file inside it",
                where,
            )
        size = path.stat().st_size
        if size > self.max_bytes:
            raise self._too_large(where, size)
        return path.read_bytes()

    async def _fetch(self, url: str, where: str) -> bytes:
        # trust_env=False: no proxy from the environment may see (or redirect) the request.
        async with httpx.AsyncClient(
            follow_redirects=False, timeout=self.timeout, trust_env=False
        ) as client:
            for _ in range(MAX_REDIRECTS + 1):
                self._check_host(url, where)
                async with client.stream("GET", url) as response:
                    if response.is_redirect:
                        url = str(response.url.join(response.headers.get("location", "")))
                        continue
                    if response.status_code != 200:
                        raise MediaError(
                            f"{where}: {url} answered HTTP {response.status_code}; send a URL "
                            "that serves the image",
                            where,
                        )
                    return await self._read_capped(response, where)
        raise MediaError(f"{where}: {url} redirected more than {MAX_REDIRECTS} times", where)

    def _check_host(self, url: str, where: str) -> None:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        with_port = f"{host}:{parts.port}" if parts.port else host
        allowed = any(
            entry in (host, with_port) or (entry.startswith("*.") and host.endswith(entry[1:]))
            for entry in self.domains
        )
        if parts.scheme.lower() not in ("http", "https") or not allowed:
            fix = (
                "this server fetches no URLs; send a data: URL or start it with "
                "--allowed-media-domains HOST"
                if not self.domains
                else f"allowed hosts are {', '.join(self.domains)}"
            )
            raise MediaError(f"{where}: {url!r} is not on an allowed host; {fix}", where)

    async def _read_capped(self, response, where: str) -> bytes:
        declared = int(response.headers.get("content-length") or 0)
        if declared > self.max_bytes:
            raise self._too_large(where, declared)
        chunks, total = [], 0
        async for chunk in response.aiter_bytes():
            total += len(chunk)
            if total > self.max_bytes:
                raise self._too_large(where, total)
            chunks.append(chunk)
        return b"".join(chunks)

    def _unreachable(self, url: str, where: str, error: Exception) -> MediaError:
        reason = (
            f"took longer than {self.timeout:g} s" if isinstance(error, TimeoutError) else error
        )
        return MediaError(
            f"{where}: {url} could not be fetched ({reason or type(error).__name__}); send the "
            "image as a data: URL, or raise media_timeout",
            where,
        )

    def _too_large(self, where: str, size: int) -> MediaError:
        return MediaError(
            f"{where} is {size / 2**20:.1f} MiB or more, over the server's limit of "
            f"{self.max_bytes / 2**20:.1f} MiB (max_media_mb); send a smaller file",
            where,
        )


def decode_image(raw: bytes, where: str):
    """PNG, JPEG or WebP bytes -> an RGB PIL image, fully decoded (so truncation shows here)."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(raw))
    except (UnidentifiedImageError, OSError) as error:
        raise MediaError(
            f"{where} is not a readable image ({error}); send PNG, JPEG or WebP", where
        ) from error
    if image.format not in IMAGE_FORMATS:
        raise MediaError(f"{where} is a {image.format} image; send PNG, JPEG or WebP", where)
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise MediaError(
            f"{where} is {width}x{height} pixels, over the limit of {MAX_IMAGE_PIXELS}; "
            "send a smaller image",
            where,
        )
    try:
        image.load()
    except (OSError, Image.DecompressionBombError) as error:
        raise MediaError(f"{where} is a damaged {image.format} image ({error})", where) from error
    return image.convert("RGB")


def decode_audio(raw: bytes, declared: str | None, where: str) -> tuple[np.ndarray, int]:
    """WAV or MP3 bytes -> (mono float32 samples at 16 kHz, 16000)."""
    import soundfile

    if declared not in AUDIO_FORMATS:
        raise MediaError(
            f"{where}.input_audio.format={declared!r} is not supported; send 'wav' or 'mp3'", where
        )
    try:
        with soundfile.SoundFile(io.BytesIO(raw)) as file:
            actual, rate = file.format, file.samplerate
            samples = file.read(dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
        raise MediaError(
            f"{where}.input_audio.data is not readable {declared} audio ({error}); send base64 "
            "of a WAV or MP3 file",
            where,
        ) from error
    if actual != AUDIO_FORMATS[declared]:
        raise MediaError(
            f"{where}.input_audio.format={declared!r}, but the data is {actual}; "
            "set format to match the data",
            where,
        )
    if samples.shape[0] == 0:
        raise MediaError(f"{where}.input_audio.data holds no samples; send a non-empty clip", where)
    mono = samples.mean(axis=1)
    return resample(mono, rate, AUDIO_SAMPLE_RATE), AUDIO_SAMPLE_RATE


def processor_inputs(processor, text: str, media: list[dict[str, Any]]):
    """What a model's HF processor makes of a rendered prompt and its decoded media, in prompt
    order: token ids with every image and audio marker expanded into its soft tokens, and the
    pixel and audio-feature tensors (a BatchFeature of tensors with a batch dimension of 1)."""
    images = [item["data"] for item in media if item["kind"] == "image"]
    audio = [item["data"][0] for item in media if item["kind"] == "audio"]
    extra = {"sampling_rate": AUDIO_SAMPLE_RATE} if audio else {}
    # The rendered text already holds its one BOS.
    return processor(
        text=[text], images=[images] if images else None, audio=audio or None,
        add_special_tokens=False, return_tensors="pt", **extra,
    )  # fmt: skip


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Band-limited resampling by the FFT (exact for the short clips a chat request carries)."""
    if rate == target:
        return samples.astype(np.float32)
    length = max(1, round(len(samples) * target / rate))
    spectrum = np.fft.rfft(samples.astype(np.float64))
    keep = min(len(spectrum), length // 2 + 1)
    out = np.fft.irfft(spectrum[:keep], n=length) * (length / len(samples))
    return out.astype(np.float32)
