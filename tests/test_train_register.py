"""Registering an adapter with a server over HTTP, against a small loopback server set up here
(the real server's hot-load test lives with serve/ and uses the `trained_adapter` fixture)."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from train.register import RegisterError, place_adapter, register


@pytest.fixture
def server():
    received: list[dict] = []
    reply = {"status": 200, "body": "Success: LoRA adapter 'zorblax' added successfully."}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"path": self.path, "json": json.loads(body),
                             "auth": self.headers.get("Authorization")})  # fmt: skip
            self.send_response(reply["status"])
            self.end_headers()
            self.wfile.write(reply["body"].encode())

        def log_message(self, *args):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", received, reply
    httpd.shutdown()


def _adapter(tmp_path):
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "gemma_stack_adapter.json").write_text("{}")
    return adapter


def test_copies_into_adapters_dir_and_posts_the_openai_style_body(server, tmp_path):
    url, received, _ = server
    adapters_dir = tmp_path / "adapters"
    path = place_adapter(_adapter(tmp_path), str(adapters_dir), "zorblax")
    answer = register(url + "/", "zorblax", path, api_key="secret")

    assert path == adapters_dir.resolve() / "zorblax"
    assert (path / "gemma_stack_adapter.json").is_file()
    assert [p.name for p in adapters_dir.iterdir()] == ["zorblax"]  # no staging left behind
    assert received == [{
        "path": "/v1/load_lora_adapter",
        "json": {"lora_name": "zorblax", "lora_path": str(path)},
        "auth": "Bearer secret",
    }]  # fmt: skip
    assert answer.status == 200 and "added successfully" in answer.body


def test_adapter_already_inside_adapters_dir_is_not_copied(tmp_path):
    adapter = _adapter(tmp_path)
    assert place_adapter(adapter, str(tmp_path), "x") == adapter.resolve()
    assert place_adapter(adapter, None, "x") == adapter.resolve()


def test_a_4xx_is_reported_with_the_servers_answer(server, tmp_path):
    url, _, reply = server
    reply.update(status=400, body='{"error": {"message": "lora_path does not exist"}}')
    with pytest.raises(RegisterError) as caught:
        register(url, "zorblax", tmp_path / "nowhere")
    message = str(caught.value)
    assert "refused the adapter: HTTP 400" in message
    assert "lora_path does not exist" in message and "lora_name='zorblax'" in message


def test_an_unreachable_server_says_so(tmp_path):
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(RegisterError, match="could not reach .*is the server running"):
        register(f"http://127.0.0.1:{port}", "x", tmp_path, timeout_s=5)
