"""A training process killed with SIGKILL after its first checkpoint resumes from it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

pytest_plugins = ["conftest_train"]

pytestmark = pytest.mark.slow

STEPS = 6


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    from conftest_train import CPU_CONFIG, MODEL_DIR, ROOT, run_train

    if not (MODEL_DIR / "config.json").exists():
        pytest.fail("needs the converted gemma-3-270m checkpoint (`make model`)")
    output_dir = tmp_path / "run"
    args = [
        str(CPU_CONFIG),
        "--set", f"output_dir={output_dir}",
        "--set", f"training.max_steps={STEPS}",
        "--set", "training.save_steps=2",
        "--set", "training.save_total_limit=null",
        "--set", "training.eval_steps=null",
        "--set", "training.max_length=40",
    ]  # fmt: skip
    first = subprocess.Popen(
        [sys.executable, "-m", "train", *args], cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    state = output_dir / "checkpoint-2" / "trainer_state.json"
    deadline = time.monotonic() + 600
    while not state.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert state.exists(), "the first run never wrote checkpoint-2"
    assert first.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (output_dir / "adapter").exists()
    done_before_kill = max(int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*"))
    assert done_before_kill < STEPS

    second = run_train(*args)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resuming from" in second.stderr
    manifest = json.loads((output_dir / "adapter" / "gemma_stack_adapter.json").read_text())
    assert manifest["metrics"]["steps"] == STEPS
    assert manifest["metrics"]["resumed_from_step"] >= 2  # not step 0
    final = json.loads((output_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    logged_steps = [entry["step"] for entry in final["log_history"] if "loss" in entry]
    assert logged_steps == sorted(set(logged_steps))  # history continued, not restarted


def test_incomplete_checkpoint_is_skipped(tmp_path):
    from train.run import last_complete_checkpoint

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-10").mkdir()  # killed while saving: no trainer_state.json yet
    (tmp_path / "checkpoint-4").mkdir()
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert last_complete_checkpoint(tmp_path / "absent") is None
