"""What the server must refuse: callers without the key, paths outside their roots, code shipped
inside a checkpoint (remote code, pickled weights), and request bodies in the log.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from serve.security import UnsafeWeightsError, check_weights_format
from tests.conftest import MODEL, REPO, free_port

OPEN_ROUTES = {"/health", "/metrics"}
EXTRA_ROUTES = ["/docs", "/redoc", "/openapi.json", "/no-such-route", "/v1/no-such-route"]
BAD_CREDENTIALS = [
    None,
    "Bearer wrong-key",
    "Basic dGVzdDp0ZXN0",
    "Bearer",
    b"Bearer \xff\xfe",
]


def _model_dir() -> Path:
    from quant.resolve import resolve_model

    return resolve_model(MODEL).path


# -- the API key ----------------------------------------------------------------------------------


def _routes(http) -> list[tuple[str, str]]:
    paths = http.get("/openapi.json").json()["paths"]
    routes = [(method.upper(), path) for path, item in paths.items() for method in item]
    return routes + [("GET", path) for path in EXTRA_ROUTES]


def test_every_route_but_health_and_metrics_needs_the_key(server, http):
    routes = _routes(http)
    assert ("POST", "/v1/chat/completions") in routes and ("GET", "/v1/models") in routes

    for method, path in routes:
        for credential in BAD_CREDENTIALS:
            headers = {} if credential is None else {"Authorization": credential}
            response = httpx.request(method, server.url + path, headers=headers, json={})
            if path in OPEN_ROUTES:
                assert response.status_code == 200, (method, path, response.text[:300])
                continue
            assert response.status_code == 401, (method, path, credential, response.text[:300])
            assert response.headers["www-authenticate"] == "Bearer"
            error = response.json()["error"]
            assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"


def test_the_key_opens_the_protected_routes(http):
    assert http.get("/v1/models").status_code == 200
    assert http.get("/openapi.json").status_code == 200


def _guarded_app(metrics_public: bool):
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from serve.metrics import Metrics
    from serve.middleware import GuardMiddleware

    async def ok(_request):
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route(path, ok) for path in ("/health", "/metrics", "/v1/models")])
    return GuardMiddleware(
        app, api_key="k", max_body_bytes=1024, metrics=Metrics(), metrics_public=metrics_public
    )


@pytest.mark.parametrize("metrics_public", [True, False])
def test_metrics_without_the_key_is_configurable(metrics_public):
    async def status(path: str) -> int:
        transport = httpx.ASGITransport(app=_guarded_app(metrics_public))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return (await client.get(path)).status_code

    assert asyncio.run(status("/health")) == 200
    assert asyncio.run(status("/metrics")) == (200 if metrics_public else 401)
    assert asyncio.run(status("/v1/models")) == 401


# -- adapter and media paths ----------------------------------------------------------------------


def _fake_adapter(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (directory / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    return directory


def test_adapter_paths_stay_inside_the_adapters_dir(server, http, tmp_path):
    pytest.importorskip("serve.adapters")
    outside = _fake_adapter(tmp_path / "outside")
    # Dot-names: the directory watcher skips them, so only these requests ever look at them.
    link = server.adapters_dir / f".escape-{uuid.uuid4().hex[:8]}"
    link.symlink_to(outside, target_is_directory=True)
    inner = server.adapters_dir / f".inner-{uuid.uuid4().hex[:8]}"
    inner.mkdir()
    (inner / "adapter_config.json").symlink_to(outside / "adapter_config.json")
    (inner / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    attempts = [
        "../outside",
        f"{server.adapters_dir}/../outside",
        str(outside),
        "/etc",
        link.name,
        str(link),
        inner.name,
    ]
    try:
        for lora_path in attempts:
            response = http.post(
                "/v1/load_lora_adapter", json={"lora_name": "escape", "lora_path": lora_path}
            )
            assert response.status_code in (400, 403, 404), (lora_path, response.text[:300])
            assert response.json()["error"]["param"] == "lora_path", response.text[:300]
        names = [model["id"] for model in http.get("/v1/models").json()["data"]]
        assert "escape" not in names
    finally:
        link.unlink()
        shutil.rmtree(inner)


def test_media_paths_stay_inside_the_media_dir(tmp_path):
    pytest.importorskip("serve.media")
    from serve.config import ServeConfig
    from serve.media import MediaError, MediaLoader

    root = tmp_path / "media"
    root.mkdir()
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for clients")
    (root / "inside.png").write_bytes(b"inside bytes")
    (root / "link.png").symlink_to(secret)
    (root / "dir-link").symlink_to(tmp_path, target_is_directory=True)
    loader = MediaLoader(ServeConfig(allowed_media_dir=root))

    async def read(url: str) -> bytes:
        source = {"type": "image_url", "image_url": {"url": url}}
        return await loader._image_bytes(source, "messages[0].content[0]")

    assert asyncio.run(read("inside.png")) == b"inside bytes"
    assert asyncio.run(read(f"file://{root}/inside.png")) == b"inside bytes"
    for url in [
        "../secret.png",
        str(secret),
        f"file://{secret}",
        f"file://{root}/../secret.png",
        "link.png",
        "dir-link/secret.png",
        "http://127.0.0.1:9/secret.png",
    ]:
        with pytest.raises(MediaError) as refused:
            asyncio.run(read(url))
        assert "messages[0].content[0]" in str(refused.value)


# -- code inside checkpoints ----------------------------------------------------------------------


class _Touch:
    """A pickle that, when loaded, creates a file: proof that unpickling ran the file's code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickled_checkpoint(directory: Path, marker: Path) -> Path:
    directory.mkdir()
    shutil.copy(_model_dir() / "config.json", directory)
    with (directory / "pytorch_model.bin").open("wb") as handle:
        pickle.dump({"model.embed_tokens.weight": _Touch(marker)}, handle)
    return directory


def test_pickled_weights_are_refused_unless_allowed(tmp_path):
    marker = tmp_path / "unpickled"
    checkpoint = _pickled_checkpoint(tmp_path / "ckpt", marker)

    with pytest.raises(UnsafeWeightsError, match="allow-pickle"):
        check_weights_format(checkpoint, allow_pickle=False)
    check_weights_format(checkpoint, allow_pickle=True)
    (checkpoint / "model.safetensors").write_bytes(b"")
    check_weights_format(checkpoint, allow_pickle=False)
    assert not marker.exists()


def test_server_refuses_a_pickled_checkpoint_before_loading_it(tmp_path):
    marker = tmp_path / "unpickled"
    checkpoint = _pickled_checkpoint(tmp_path / "ckpt", marker)

    result = subprocess.run(
        [sys.executable, "-m", "serve", "--model", str(checkpoint), "--port", str(free_port())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "pytorch_model.bin" in result.stderr and "--allow-pickle" in result.stderr
    assert not marker.exists()


def _remote_code_checkpoint(directory: Path, marker: Path) -> Path:
    """The real model, plus an `auto_map` naming code that creates `marker` when imported."""
    model = _model_dir()
    directory.mkdir()
    for name in os.listdir(model):
        if name not in ("config.json", "tokenizer_config.json"):
            (directory / name).symlink_to(model / name)
    code = "auto_code"
    for name in ("config.json", "tokenizer_config.json"):
        settings = json.loads((model / name).read_text())
        settings["auto_map"] = {"AutoTokenizer": [f"{code}.Tokenizer", None]}
        if name == "config.json":
            settings["auto_map"]["AutoConfig"] = f"{code}.Config"
            settings["auto_map"]["AutoModelForCausalLM"] = f"{code}.Model"
        (directory / name).write_text(json.dumps(settings))
    (directory / f"{code}.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import Gemma3ForCausalLM as Model\n"
        "from transformers import Gemma3TextConfig as Config\n"
        "from transformers import PreTrainedTokenizerFast as Tokenizer\n"
    )
    return directory


def test_remote_code_in_a_checkpoint_does_not_run_by_default(tmp_path):
    from transformers import AutoTokenizer

    from serve.config import parse_args
    from serve.engine import build_engine
    from serve.server import load_policy

    marker = tmp_path / "remote-code-ran"
    checkpoint = _remote_code_checkpoint(tmp_path / "ckpt", marker)

    policy = load_policy(checkpoint)
    assert not marker.exists()
    config = parse_args(["--model", str(checkpoint), "--engine", "vllm"])
    assert config.trust_remote_code is False
    assert build_engine(config, checkpoint, policy).settings.trust_remote_code is False
    assert parse_args(["--trust-remote-code"]).trust_remote_code is True

    # The same checkpoint does run its code once trusted, so the check above can fail.
    AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
    assert marker.exists()


# -- logs -----------------------------------------------------------------------------------------


def test_request_bodies_stay_out_of_the_info_log(server, http):
    marker = f"secret-{uuid.uuid4().hex}"
    unknown_field = f"unused_{uuid.uuid4().hex[:12]}"
    user = [{"role": "user", "content": f"Repeat: {marker}"}]
    requests = [
        ("/v1/chat/completions", {"model": MODEL, "messages": user, "max_tokens": 2}),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": user, "max_tokens": 2, "stream": True},
        ),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": marker, "max_tokens": 2, unknown_field: marker},
        ),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": marker, "content": "x"}]}),
        ("/v1/chat/completions", {"model": marker, "messages": user, "max_tokens": 2}),
        ("/v1/completions", {"model": MODEL, "prompt": [1, 10**9], "user": marker}),
    ]
    statuses = [http.post(path, json=body).status_code for path, body in requests]
    assert statuses[:3] == [200, 200, 200] and all(400 <= s < 500 for s in statuses[3:]), statuses

    log = server.log()
    # The unknown field's name is logged at WARNING (that is how misspellings surface), which
    # also shows this is the log these requests went to.
    assert unknown_field in log
    assert marker not in log
