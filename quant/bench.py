"""Benchmark quantisation levels of one model on one text: quality, size, memory and speed.

    python -m quant bench --model gemma-3-270m --levels bf16,8,4,3,gguf --out benchmarks/results

Protocol (also written into the JSON):
- Text: CPython's own documentation topics (`pydoc_data/topics.py`, shipped with every CPython;
  (c) Python Software Foundation, PSF License v2, redistributable; not public domain: no public-
  domain literary text is installed on these machines). Topics in sorted order, whitespace folded.
- Perplexity: windows of `window` tokens, each `<bos>` + `window - 1` text tokens; window starts
  advance by `stride` text tokens; each window scores only the tokens not scored before (the
  first scores all), so every text token is predicted once, with at least `window - stride`
  tokens of context after the first window.
- KL(bf16 || level) and top-1 agreement against bf16 on the same scored positions.
- Prefill: tokens/s of one `window`-token forward. Decode: greedy single-stream tokens/s over
  `decode_tokens` steps with the KV cache, after a warm-up step.
- Memory: weight bytes and bits per weight from the load report; peak resident memory added by
  the level (load + evaluation), sampled every 10 ms, with the bf16 reference already resident.
- Levels: `bf16`, `8`, `4`, `3`, each with `quant.load`'s default method (GPTQ at 4 and 3 bits
  on a CPU) unless named: `4:bnb` (NF4), `4:hqq`, `3:hqq`, `8:hqq`.
- Output head: levels below 16 bits give the output projection an int8 table that the tied input
  embedding reads too (the default of `quant.load`); `4-tied` keeps the head tied to the bf16
  embedding table, `bf16+head` is bf16 with the int8 table, so the table's share of size, speed
  and quality shows on its own.
- `gguf`: llama.cpp's own Q4_K_M file of the model, dequantised by transformers (the packed
  weights are not run). For the 270M this is the bf16 reference itself: the bf16 checkpoint is
  that file, dequantised (no bf16 release of the weights can be had offline here).
- `llama.cpp`: the same file run by llama.cpp itself (llama-cpp-python, `--llamacpp-python`, made
  by benchmarks/install_llamacpp.sh), scored on the same windows: the row users compare with.
  Its speeds are llama.cpp's with the same thread count; its memory is its whole process's peak.
- `llama.cpp:Q4_0`, `llama.cpp:Q4_1`: llama.cpp's plain 4-bit formats made from the bf16 weights
  (every linear layer re-encoded by ggml's reference quantiser as ported in gguf-py, which is what
  llama-quantize does without an importance matrix; token_embd keeps its Q8_0 and the norms their
  F32, as in the Q4_K_M file), then scored by llama.cpp: 4-bit against 4-bit on the same weights.
  The Q4_K_M file itself is not that: its 640-wide rows cannot take Q4_K (256 per block) and are
  Q5_0, half of ffn_down is Q6_K, and its weights are the reference's own.
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

LEVEL_NAMES = {"bf16": 16, "16": 16, "8": 8, "4": 4, "3": 3}
LLAMA_CPP = "llama.cpp"
# llama.cpp's plain formats for `llama.cpp:FORMAT` levels: (bits, llama.cpp's file type number).
LLAMA_CPP_FORMATS = {"Q4_0": (4, 2), "Q4_1": (4, 3)}
DEFAULT_LLAMACPP_PYTHON = Path(__file__).resolve().parents[1] / ".venv-llamacpp" / "bin" / "python"
TEXT_SOURCE = (
    "CPython standard library pydoc_data/topics.py (Python documentation topics); "
    "(c) Python Software Foundation, PSF License Version 2"
)


@dataclass
class Protocol:
    window: int = 256
    stride: int = 192
    windows: int = 8
    decode_tokens: int = 32


@dataclass
class Row:
    level: str
    method: str
    bits: int
    head: str
    perplexity: float
    ppl_increase_pct: float
    kl_vs_bf16: float
    top1_agreement: float
    weight_mb: float
    bits_per_weight: float
    peak_rss_added_mb: float
    prefill_tok_s: float
    decode_tok_s: float
    load_s: float


def benchmark_text() -> str:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    return re.sub(r"[ \t]+", " ", text)


def windows(ids: list[int], bos: int, protocol: Protocol) -> list[tuple[torch.Tensor, int]]:
    """[(input ids with BOS, number of leading positions not scored)], `protocol.windows` long."""
    body = protocol.window - 1
    out, scored_until = [], 0
    for index in range(protocol.windows):
        begin = index * protocol.stride
        chunk = ids[begin : begin + body]
        if len(chunk) < body:
            raise ValueError(
                f"windows={protocol.windows}: the text has {len(ids)} tokens, too few; "
                "lower windows or stride"
            )
        skip = scored_until - begin  # tokens already scored by the previous window
        out.append((torch.tensor([[bos, *chunk]]), max(skip, 0)))
        scored_until = begin + body
    return out


class PeakRss:
    """Peak resident set size while the block runs, above what was resident at its start."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.added_mb = (max(self.peak, _rss()) - self.start) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@torch.inference_mode()
def score(model, batches, reference=None):
    """(nll sum, token count, kl sum, top-1 matches, log-prob batches) over all windows."""
    nll = kl = agree = count = 0.0
    logprobs = []
    for index, (ids, skip) in enumerate(batches):
        logits = model(input_ids=ids).logits[0, :-1].float()
        # position p predicts token p+1; BOS (p=0) predicts the first text token
        logp = torch.log_softmax(logits[skip:], dim=-1)
        target = ids[0, 1 + skip :]
        nll -= logp.gather(1, target[:, None]).sum().item()
        count += target.numel()
        if reference is not None:
            ref = reference[index]
            kl += (ref.exp() * (ref - logp)).sum().item()
            agree += (ref.argmax(-1) == logp.argmax(-1)).sum().item()
        if reference is None:
            logprobs.append(logp)  # kept only for the reference: 1 MiB per scored token
    return nll, count, kl, agree, logprobs


@torch.inference_mode()
def speed(model, ids: torch.Tensor, decode_tokens: int) -> tuple[float, float]:
    model(input_ids=ids[:, :8])  # warm-up: first-call allocations and lazy repacking
    started = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    prefill = ids.shape[1] / (time.perf_counter() - started)

    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    out = model(input_ids=token, past_key_values=cache, use_cache=True)  # warm-up step
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    started = time.perf_counter()
    for _ in range(decode_tokens):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return prefill, decode_tokens / (time.perf_counter() - started)


class LevelError(ValueError):
    """A `--levels` entry that names no level; the message says which and what the choices are."""


def parse_level(level: str) -> tuple[int, str | None, bool | None]:
    """(bits, method or None for the loader's default, quantise_head or None) of a quant.load
    level such as `4`, `4:bnb`, `3:hqq`, `4-tied` or `bf16+head`."""
    from quant.loader import METHODS

    name, head = level, None
    if level.endswith("-tied"):
        name, head = level.removesuffix("-tied"), False
    elif level.endswith("+head"):
        name, head = level.removesuffix("+head"), True
    name, colon, method = name.partition(":")
    if name not in LEVEL_NAMES:
        raise LevelError(
            f"level={level!r} is not one of bf16, 8, 4, 3 (optionally :method, e.g. 4:hqq, and "
            f"-tied or +head), gguf, {LLAMA_CPP} or {LLAMA_CPP}:FORMAT "
            f"({', '.join(LLAMA_CPP_FORMATS)})"
        )
    bits = LEVEL_NAMES[name]
    if colon and method not in METHODS[bits]:
        raise LevelError(
            f"level={level!r}: {bits} bits take the methods {', '.join(METHODS[bits])} "
            f"(e.g. {name}:{METHODS[bits][-1]}), or none after the level for the default"
        )
    return bits, method or None, head


def _is_llamacpp(level: str) -> bool:
    """`llama.cpp` or `llama.cpp:FORMAT`: a row llama.cpp scores in its own interpreter."""
    return level.partition(":")[0] == LLAMA_CPP


def check_levels(levels: list[str]) -> None:
    """Every entry of `levels` checked before any model is loaded, all problems at once."""
    problems = []
    for level in levels:
        file_format = level.partition(":")[2]
        if level == "gguf" or (_is_llamacpp(level) and file_format in ("", *LLAMA_CPP_FORMATS)):
            continue
        try:
            if _is_llamacpp(level):
                raise LevelError(
                    f"level={level!r}: llama.cpp's formats here are {', '.join(LLAMA_CPP_FORMATS)}"
                    f" (or plain {LLAMA_CPP!r} for the model's own file)"
                )
            parse_level(level)
        except LevelError as error:
            problems.append(str(error))
    if problems:
        raise LevelError("\n".join(problems))


def _load_level(model: str, level: str):
    import quant

    if level == "gguf":
        return _load_gguf(model)
    bits, method, head = parse_level(level)
    return quant.load(model, bits=bits, method=method, quantise_head=head)


def _load_gguf(model: str):
    """llama.cpp's file dequantised by transformers, wrapped like a LoadedModel."""
    from transformers import AutoModelForCausalLM

    from quant.loader import LoadedModel
    from quant.report import build_report
    from quant.resolve import gguf_for_known, resolve_model

    resolved = resolve_model(model)
    gguf = resolved.gguf or gguf_for_known(model)
    net = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
    ).eval()
    report = build_report(net, "gguf-dequantised", 16)
    # What the file holds on disk, packed, is what llama.cpp reads per token.
    report.by_kind = {"gguf-file": [report.parameters, gguf.stat().st_size]}
    return LoadedModel(net, None, report, resolved, 16, "gguf", torch.device("cpu"), torch.bfloat16)


def _llamacpp_row(
    model, batches, ref_logprobs, base_ppl, protocol, python: Path, file_format: str = ""
) -> Row:
    """Score the windows with llama.cpp in its own interpreter, and compare on our side.

    `file_format` "" scores the model's own GGUF file; "Q4_0" or "Q4_1" a copy of it whose
    linear layers are re-encoded at that format (LLAMA_CPP_FORMATS).
    """
    import numpy as np

    from quant.resolve import gguf_for_known, resolve_model

    if not python.exists():
        raise FileNotFoundError(_no_llamacpp(python))
    check_levels([f"{LLAMA_CPP}:{file_format}" if file_format else LLAMA_CPP])
    source = resolve_model(model).gguf or gguf_for_known(model)
    with tempfile.TemporaryDirectory(prefix="llamacpp-score-") as tmp:
        gguf = _llamacpp_file(source, file_format, Path(tmp)) if file_format else source
        job = {
            "gguf": str(gguf), "windows": [ids[0].tolist() for ids, _ in batches],
            "skips": [skip for _, skip in batches], "threads": torch.get_num_threads(),
            "decode_tokens": protocol.decode_tokens, "out": tmp,
        }  # fmt: skip
        job_path = Path(tmp) / "job.json"
        job_path.write_text(json.dumps(job))
        script = Path(__file__).with_name("llamacpp_score.py")
        subprocess.run([str(python), str(script), str(job_path)], check=True)

        timings = json.loads((Path(tmp) / "result.json").read_text())
        nll = kl = agree = count = 0.0
        for index, (ids, skip) in enumerate(batches):
            logp = torch.from_numpy(np.load(Path(tmp) / f"logprobs-{index}.npy")).float()
            target = ids[0, 1 + skip :]
            nll -= logp.gather(1, target[:, None]).sum().item()
            count += target.numel()
            ref = ref_logprobs[index]
            kl += (ref.exp() * (ref - logp)).sum().item()
            agree += (ref.argmax(-1) == logp.argmax(-1)).sum().item()
        size, parameters = gguf.stat().st_size, _gguf_parameters(gguf)

    ppl = float(torch.tensor(nll / count).exp())
    version = timings["llama_cpp_version"]
    method = f"llama.cpp {version} " + (
        f"{file_format} (linear layers re-encoded from bf16)" if file_format else "Q4_K_M"
    )
    return Row(
        level=f"{LLAMA_CPP}:{file_format}" if file_format else LLAMA_CPP, method=method, bits=4,
        head="q8_0 (tied)", perplexity=round(ppl, 4),
        ppl_increase_pct=round(100 * (ppl / base_ppl - 1), 3),
        kl_vs_bf16=round(kl / count, 5), top1_agreement=round(agree / count, 4),
        weight_mb=round(size / 2**20, 1), bits_per_weight=round(8 * size / parameters, 2),
        peak_rss_added_mb=round(timings["peak_rss_mb"], 1),
        prefill_tok_s=round(timings["prefill_tok_s"], 1),
        decode_tok_s=round(timings["decode_tok_s"], 2), load_s=round(timings["load_s"], 1),
    )  # fmt: skip


def _no_llamacpp(python: Path) -> str:
    return (
        f"level={LLAMA_CPP!r} needs llama-cpp-python at {python}; run "
        "`bash benchmarks/install_llamacpp.sh` (about 10 minutes) or pass --llamacpp-python"
    )


def _llamacpp_file(source: Path, file_format: str, folder: Path) -> Path:
    """A copy of the GGUF file `source` with every linear layer's weight at `file_format`."""
    from gguf import GGMLQuantizationType, GGUFReader

    from quant.gguf_requant import requantise

    wanted = GGMLQuantizationType[file_format]
    kept = (GGMLQuantizationType.F32, GGMLQuantizationType.F16)

    def pick(name, qtype, shape):
        # The embedding (Q8_0 in the Q4_K_M file, llama.cpp's choice) and the norms stay.
        return qtype if qtype in kept or name.startswith("token_embd") else wanted

    started = time.monotonic()
    _, file_type = LLAMA_CPP_FORMATS[file_format]
    target = folder / f"{source.stem}-{file_format.lower()}.gguf"
    requantise(GGUFReader(source), target, pick, file_type)
    logger.info("wrote %s in %.0f s", target.name, time.monotonic() - started)
    return target


def _gguf_parameters(gguf: Path) -> int:
    import gguf as gguf_lib  # transformers' own GGUF reader

    reader = gguf_lib.GGUFReader(str(gguf))
    return sum(int(tensor.n_elements) for tensor in reader.tensors)


def run(
    model: str, levels: list[str], protocol: Protocol, llamacpp_python: Path | None = None
) -> dict:
    import quant

    check_levels(levels)  # before minutes of loading: a typo in the last level loses nothing
    python = llamacpp_python or DEFAULT_LLAMACPP_PYTHON
    if any(_is_llamacpp(level) for level in levels) and not python.exists():
        raise LevelError(_no_llamacpp(python))
    reference = quant.load(model, bits=16)
    tokenizer = reference.text_tokenizer
    ids = tokenizer(benchmark_text(), add_special_tokens=False).input_ids
    batches = windows(ids, tokenizer.bos_token_id, protocol)
    nll, count, _, _, ref_logprobs = score(reference.model, batches)
    base_ppl = float(torch.tensor(nll / count).exp())

    rows = []
    for level in levels:
        if _is_llamacpp(level):
            row = _llamacpp_row(
                model, batches, ref_logprobs, base_ppl, protocol, python, level.partition(":")[2]
            )
        else:
            row = _bench_level(model, level, reference, batches, ref_logprobs, base_ppl, protocol)
        rows.append(row)
        logger.info("%s", row)
    return {
        "model": model,
        "command": " ".join(["python -m quant bench", *sys.argv[2:]]) if sys.argv else "",
        "text_source": TEXT_SOURCE,
        "text_tokens_scored": int(count),
        "protocol": asdict(protocol) | {"description": __doc__.split("Protocol")[1].strip()},
        "torch_threads": torch.get_num_threads(),
        "rows": [asdict(row) for row in rows],
    }


def _bench_level(model, level, reference, batches, ref_logprobs, base_ppl, protocol) -> Row:
    gc.collect()
    with PeakRss() as peak:
        started = time.monotonic()
        loaded = reference if level in ("bf16", "16") else _load_level(model, level)
        load_s = time.monotonic() - started
        nll, count, kl, agree, _ = score(loaded.model, batches, ref_logprobs)
        prefill, decode = speed(loaded.model, batches[0][0], protocol.decode_tokens)
    ppl = float(torch.tensor(nll / count).exp())
    report = loaded.report
    row = Row(
        level=level, method=loaded.method, bits=report.bits, head=report.head,
        perplexity=round(ppl, 4),
        ppl_increase_pct=round(100 * (ppl / base_ppl - 1), 3),
        kl_vs_bf16=round(kl / count, 5), top1_agreement=round(agree / count, 4),
        weight_mb=round(report.weight_bytes / 2**20, 1),
        bits_per_weight=round(report.bits_per_weight, 2),
        peak_rss_added_mb=round(peak.added_mb, 1), prefill_tok_s=round(prefill, 1),
        decode_tok_s=round(decode, 2), load_s=round(load_s, 1),
    )  # fmt: skip
    if loaded is not reference:
        del loaded
    return row


def write(result: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    with csv_path.open("w", newline="") as handle:
        handle.write(f"# {result['command']}\n# text: {result['text_source']}\n")
        writer = csv.DictWriter(handle, fieldnames=list(result["rows"][0]))
        writer.writeheader()
        writer.writerows(result["rows"])
    return json_path, csv_path


def render(result: dict) -> str:
    header = ["level", "method", "head", "perplexity", "ppl_increase_pct", "kl_vs_bf16",
              "top1_agreement", "weight_mb", "bits_per_weight", "peak_rss_added_mb",
              "prefill_tok_s", "decode_tok_s"]  # fmt: skip
    lines = [" | ".join(header)]
    for row in result["rows"]:
        lines.append(" | ".join(str(row[key]) for key in header))
    protocol = result["protocol"]
    lines.append(
        f"text: {result['text_source']}; {result['text_tokens_scored']} tokens scored in "
        f"{protocol['windows']} windows of {protocol['window']} (BOS first), stride "
        f"{protocol['stride']}"
    )
    return "\n".join(lines)


def plot(result: dict):
    """Two panels: bits/weight against perplexity increase; weight memory against decode speed."""
    import matplotlib

    matplotlib.use("Agg") if "ipykernel" not in sys.modules else None
    import matplotlib.pyplot as plt

    rows = result["rows"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        left.scatter(row["bits_per_weight"], row["ppl_increase_pct"])
        left.annotate(row["level"], (row["bits_per_weight"], row["ppl_increase_pct"]))
        right.scatter(row["weight_mb"], row["decode_tok_s"])
        right.annotate(row["level"], (row["weight_mb"], row["decode_tok_s"]))
    left.set(xlabel="bits per weight (whole model)", ylabel="perplexity increase over bf16 (%)",
             title="Quality against size")  # fmt: skip
    right.set(xlabel="weight memory (MiB)", ylabel="decode tokens/s (1 stream)",
              title="Memory against decode speed")  # fmt: skip
    figure.tight_layout()
    return figure
