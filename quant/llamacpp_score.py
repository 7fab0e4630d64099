"""Score token windows with llama.cpp itself, for `quant bench`'s reference row.

Runs under the interpreter that has llama-cpp-python (`benchmarks/install_llamacpp.sh` makes
`.venv-llamacpp`), not gemma-stack's: llama.cpp is a reference, not a dependency, so this file
imports only numpy and llama_cpp and is run as a script:

    .venv-llamacpp/bin/python quant/llamacpp_score.py JOB.json

JOB.json: {"gguf": path, "windows": [[ids...], ...], "skips": [n, ...], "threads": 2,
"decode_tokens": 16, "out": dir}. The ids are the windows `quant bench` scores (BOS included, so
llama.cpp adds none). For window i, `out/logprobs-i.npy` holds float16 log-probabilities of the
scored positions (rows: positions, columns: vocabulary); `out/result.json` holds the timings and
the peak resident memory of the timed generation, which runs first, in llama.cpp's ordinary mode.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from llama_cpp import Llama


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    out = Path(job["out"])
    window = max(len(ids) for ids in job["windows"])
    context = window + job["decode_tokens"] + 2  # the decode timing runs on from a full window

    # Speed and memory first, in llama.cpp's ordinary mode (logits of the last token only), so
    # the peak resident memory is llama.cpp's own and not the scoring arrays' below.
    started = time.monotonic()
    llm = Llama(
        model_path=job["gguf"], n_ctx=context, n_batch=window, n_ubatch=window,
        n_threads=job["threads"], n_threads_batch=job["threads"], verbose=False,
    )  # fmt: skip
    load_s = time.monotonic() - started
    prefill_s, decode_s = timed_generation(llm, job["windows"][0], job["decode_tokens"])
    peak_rss_mb = peak_rss_kib() / 1024
    del llm

    scorer = Llama(
        model_path=job["gguf"], n_ctx=context, n_batch=window, n_ubatch=window,
        n_threads=job["threads"], n_threads_batch=job["threads"], logits_all=True,
        verbose=False,
    )  # fmt: skip
    for index, (ids, skip) in enumerate(zip(job["windows"], job["skips"], strict=True)):
        scorer.reset()
        scorer.eval(ids)
        # position p predicts token p+1: the last position predicts nothing scored
        logits = np.asarray(scorer.scores[: len(ids) - 1], dtype=np.float32)[skip:]
        np.save(out / f"logprobs-{index}.npy", log_softmax(logits).astype(np.float16))

    result = {
        "load_s": load_s,
        "prefill_tok_s": len(job["windows"][0]) / prefill_s,
        "decode_tok_s": job["decode_tokens"] / decode_s,
        "peak_rss_mb": peak_rss_mb,
        "llama_cpp_version": __import__("llama_cpp").__version__,
    }
    (out / "result.json").write_text(json.dumps(result))
    return 0


def peak_rss_kib() -> int:
    """This process's peak resident memory. Not getrusage's ru_maxrss: Linux carries that over
    from the parent across fork and exec, so it would report the benchmark's own peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def next_token(llm: Llama) -> int:
    """Greedy pick from the last position's logits. Outside logits_all mode llama-cpp-python
    keeps no copy (`scores` stays empty), so they are read from the context, as it does itself."""
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
    return int(np.argmax(logits))


def timed_generation(llm: Llama, prompt: list[int], tokens: int) -> tuple[float, float]:
    """Seconds of the prompt's prefill, and of `tokens` greedy steps after one warm-up step."""
    llm.eval(prompt[:8])  # warm-up: first-call allocations
    llm.reset()
    started = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - started

    token = next_token(llm)
    llm.eval([token])  # warm-up step
    token = next_token(llm)
    started = time.perf_counter()
    for _ in range(tokens):
        llm.eval([token])
        token = next_token(llm)
    return prefill_s, time.perf_counter() - started


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
