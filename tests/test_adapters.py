"""Hot-loading LoRA adapters into the running server, on the real Gemma 3 270M (issue 3, item 5).

Uses the session `server` (started with --adapters-dir and --max-lora-rank 16). Test adapters are
made with PEFT on the served architecture (built on the meta device, LoRA weights random), so they
are real PEFT files; the trained one comes from `trained_adapter` (tests/conftest_train.py).
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import MODEL

sys.path.insert(0, str(Path(__file__).parent / "data"))
from zorblax import WORD, heldout_questions  # noqa: E402

pytest_plugins = ["conftest_train"]

WATCH_INTERVAL = 2.0  # the session server keeps the default watch_interval
WATCH_WAIT = 30.0  # a scan every 2 s, and a load takes well under a second


# -- building adapters ------------------------------------------------------------------------


def model_dir() -> Path:
    from quant.resolve import resolve_model

    return resolve_model(MODEL).path


def peft_adapter(
    target: Path,
    *,
    r: int = 8,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    b_std: float = 0.05,
    config_changes: dict | None = None,
    **lora_options,
) -> Path:
    """A PEFT LoRA adapter for the served model (or a changed config), B ~ N(0, b_std)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir())
    for key, value in (config_changes or {}).items():
        setattr(config, key, value)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), **lora_options)
    peft_model = get_peft_model(model, lora)
    peft_model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_embedding_A" in name:
                param.normal_(0.0, 0.04, generator=generator)
            elif "lora_B" in name or "lora_embedding_B" in name:
                param.normal_(0.0, b_std, generator=generator) if b_std else param.zero_()
            elif "lora_magnitude_vector" in name:
                param.fill_(1.0)
    peft_model.save_pretrained(target)
    return target


def publish(server, source: Path, name: str) -> Path:
    """Copy into the adapters directory the way the trainer does: staging dir, then rename."""
    staging = server.adapters_dir / f".{name}.tmp-test"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    target = server.adapters_dir / name
    staging.rename(target)
    return target


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def rename_tensors(adapter: Path, old: str, new: str) -> None:
    from safetensors.torch import load_file, save_file

    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k.replace(old, new): v for k, v in tensors.items()}, weights)


# -- talking to the server ---------------------------------------------------------------------


def load(http, name: str, path) -> httpx.Response:
    return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})


def model_ids(http) -> dict[str, dict]:
    return {entry["id"]: entry for entry in http.get("/v1/models").json()["data"]}


def complete(http, model: str, prompt: str = "The capital of France is", tokens: int = 4):
    response = http.post(
        "/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0},
    )
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def first_logprobs(http, model: str, prompt: str = "Write one sentence about the sea.") -> dict:
    """The top-5 logprobs of the first generated token (greedy text can coincide by chance)."""
    response = http.post(
        "/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 5},
    )
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["logprobs"]["top_logprobs"][0]


def changes_output(http, model: str) -> bool:
    tuned, base = first_logprobs(http, model), first_logprobs(http, MODEL)
    return set(tuned) != set(base) or max(abs(tuned[t] - base[t]) for t in base) > 1e-3


def wait_for(condition, timeout: float = WATCH_WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


@pytest.fixture(scope="module")
def random_adapter(tmp_path_factory) -> Path:
    return peft_adapter(tmp_path_factory.mktemp("random") / "random")


# -- loading, selecting, unloading -------------------------------------------------------------


def test_load_select_and_unload(server, http, random_adapter):
    path = publish(server, random_adapter, "rand-a")
    response = load(http, "rand-a", path)
    assert response.status_code == 200, response.text
    body = response.json()
    # "already_loaded" only if the watcher (two scans, >= 2 s) got there first on a slow machine.
    assert body["status"] in {"loaded", "already_loaded"} and body["rank"] == 8
    assert body["modules"] == 36
    assert body["probe_logprob_delta"] > 1e-3

    listed = model_ids(http)
    assert listed["rand-a"]["parent"] == MODEL and listed[MODEL]["parent"] is None
    # The adapter runs on its base's weights, so it is served at its base's level.
    assert listed["rand-a"]["quantization"] == listed[MODEL]["quantization"]
    assert listed[MODEL]["quantization"]["bits"] == 16
    assert changes_output(http, "rand-a")

    # Loading the same files again is a no-op, so the trainer and the watcher may both ask.
    assert load(http, "rand-a", path).json()["status"] == "already_loaded"

    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "rand-a"}).status_code == 200
    assert "rand-a" not in model_ids(http)
    gone = http.post("/v1/completions", json={"model": "rand-a", "prompt": "Hi", "max_tokens": 1})
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "model"
    # The client's unload wins over the watcher while the directory is unchanged.
    time.sleep(WATCH_INTERVAL * 2 + 1)
    assert "rand-a" not in model_ids(http)

    again = http.post("/v1/unload_lora_adapter", json={"lora_name": "rand-a"})
    assert again.status_code == 404 and again.json()["error"]["param"] == "lora_name"


def test_relative_path_and_image_text_names_are_mapped(server, http, random_adapter, tmp_path):
    # Trained on the image-text class, the same layers are named model.language_model.layers.N.
    source = shutil.copytree(random_adapter, tmp_path / "mm")
    rename_tensors(source, "model.model.layers.", "model.model.language_model.layers.")
    publish(server, source, "mm-names")
    response = load(http, "mm-names", "mm-names")  # relative to the adapters directory
    assert response.status_code == 200, response.text
    assert response.json()["modules"] == 36
    assert changes_output(http, "mm-names")
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "mm-names"}).status_code == 200


# -- what is refused, and the server keeps answering ------------------------------------------


def _wrong_base(path: Path) -> Path:
    smaller = {
        "hidden_size": 1152,
        "num_hidden_layers": 2,
        "layer_types": ["sliding_attention"] * 2,
    }
    peft_adapter(path, config_changes=smaller)
    edit_json(path / "adapter_config.json", base_model_name_or_path="google/gemma-3-1b-it")
    return path


def _wrong_fingerprint(path: Path, trained: Path) -> Path:
    shutil.copytree(trained, path)
    manifest = json.loads((path / "gemma_stack_adapter.json").read_text())
    manifest["base_model"]["weights"]["digest"] = "0" * 64
    (path / "gemma_stack_adapter.json").write_text(json.dumps(manifest))
    return path


def _unknown_module(path: Path) -> Path:
    peft_adapter(path)
    rename_tensors(path, "self_attn.q_proj", "self_attn.query_key_value")
    return path


def _half_written(path: Path) -> Path:
    peft_adapter(path)
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return path


BAD = {
    "rank-too-big": (lambda p, _: peft_adapter(p, r=32), "max_lora_rank 16"),
    "wrong-base": (lambda p, _: _wrong_base(p), "google/gemma-3-1b-it"),
    "unknown-module": (lambda p, _: _unknown_module(p), "do not exist in the served"),
    "dora": (lambda p, _: peft_adapter(p, use_dora=True), "DoRA"),
    "embeddings": (lambda p, _: peft_adapter(p, targets=("embed_tokens", "q_proj")), "embed"),
    "lm-head": (lambda p, _: peft_adapter(p, modules_to_save=["lm_head"]), "modules_to_save"),
    "half-written": (lambda p, _: _half_written(p), "truncated"),
    "zero-b": (lambda p, _: peft_adapter(p, b_std=0.0), "does not change the model's output"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapter_is_refused_and_serving_goes_on(server, http, tmp_path, case):
    build, expected = BAD[case]
    path = publish(server, build(tmp_path / case, None), case)
    response = load(http, case, path)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert expected in error["message"] and error["param"] == "lora_path", error
    assert case not in model_ids(http)
    assert complete(http, MODEL)


@pytest.mark.slow
def test_wrong_fingerprint_in_manifest_is_refused(server, http, trained_adapter, tmp_path):
    path = publish(server, _wrong_fingerprint(tmp_path / "fp", trained_adapter), "wrong-fp")
    response = load(http, "wrong-fp", path)
    assert response.status_code == 400, response.text
    assert "trained on other weights" in response.json()["error"]["message"]
    assert complete(http, MODEL)


def test_paths_outside_the_directory_are_refused(server, http, random_adapter, tmp_path):
    outside = shutil.copytree(random_adapter, tmp_path / "outside")
    response = load(http, "outside", outside)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["param"] == "lora_path"

    dots = load(http, "dots", f"{server.adapters_dir}/../{outside.name}")
    assert dots.status_code == 400 and "'..'" in dots.json()["error"]["message"]

    link = server.adapters_dir / "escape"
    link.symlink_to(outside, target_is_directory=True)
    escaped = load(http, "escape", link)
    assert escaped.status_code == 403, escaped.text
    assert "through a symlink" in escaped.json()["error"]["message"]
    assert escaped.json()["error"]["param"] == "lora_path"

    missing = load(http, "missing", server.adapters_dir / "no-such-adapter")
    assert missing.status_code == 404
    assert complete(http, MODEL)


# -- the watcher -------------------------------------------------------------------------------


def test_watcher_loads_complete_adapters_and_unloads_removed(server, http, random_adapter):
    # Temporary and incomplete directories are left alone.
    shutil.copytree(random_adapter, server.adapters_dir / ".watched.tmp-1")
    partial = server.adapters_dir / "partial"
    partial.mkdir()
    shutil.copy(random_adapter / "adapter_config.json", partial)

    path = publish(server, random_adapter, "watched")
    assert wait_for(lambda: "watched" in model_ids(http)), "the watcher did not load it"
    assert model_ids(http)["watched"]["parent"] == MODEL
    assert complete(http, "watched")
    assert "partial" not in model_ids(http) and ".watched.tmp-1" not in model_ids(http)

    shutil.rmtree(path)
    assert wait_for(lambda: "watched" not in model_ids(http)), "the watcher did not unload it"
    assert complete(http, MODEL)


# -- traffic during a load ---------------------------------------------------------------------


def test_requests_under_traffic_during_a_load_all_succeed(server, tmp_path):
    source = peft_adapter(tmp_path / "busy", b_std=0.08)
    path = publish(server, source, "busy")
    statuses: list[int] = []
    stop = threading.Event()

    def traffic(model: str) -> None:
        with httpx.Client(base_url=server.url, headers=server.headers(), timeout=300) as session:
            while not stop.is_set():
                response = session.post(
                    "/v1/completions",
                    json={"model": model, "prompt": "Count: one, two,", "max_tokens": 16},
                )
                statuses.append(response.status_code)

    workers = [threading.Thread(target=traffic, args=(MODEL,)) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(2)
        with httpx.Client(base_url=server.url, headers=server.headers(), timeout=300) as session:
            response = load(session, "busy", path)
            assert response.status_code == 200, response.text
            assert complete(session, "busy")
        time.sleep(1)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert statuses and set(statuses) == {200}, statuses


# -- the trained behaviour ---------------------------------------------------------------------


@pytest.mark.slow
def test_trained_adapter_hot_loads_and_shows_its_behaviour(server, http, client, trained_adapter):
    path = publish(server, trained_adapter, "zorblax")
    response = load(http, "zorblax", path)
    assert response.status_code == 200, response.text
    assert model_ids(http)["zorblax"]["parent"] == MODEL

    def ask(model: str, question: str) -> str:
        answer = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question}],
            max_tokens=10,
            temperature=0,
        )
        return answer.choices[0].message.content

    questions = heldout_questions()[:3]
    adapted = [ask("zorblax", q) for q in questions]
    base = [ask(MODEL, q) for q in questions]
    assert all(WORD in answer for answer in adapted), adapted
    assert not any(WORD in answer for answer in base), base
