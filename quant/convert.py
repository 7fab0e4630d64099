"""Turn a GGUF file into a plain bf16 Hugging Face checkpoint that vLLM and transformers both load.

A model loaded from GGUF refuses `save_pretrained`, so the weights are dequantised by transformers,
copied into a plain model built from the same config, and saved as safetensors. The tokenizer
converted from GGUF does not add `<bos>` although the file asks for it, and a base model's file has
no chat template: both are fixed here, once, so every consumer sees the same tokens.

    python -m quant convert path/to/model.gguf --out models/my-model
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

logger = logging.getLogger(__name__)

CHAT_TEMPLATE_FILE = Path(__file__).with_name("chat_template.jinja")
PROVENANCE_FILE = "gemma_stack.json"
# Gemma ends a chat turn with <end_of_turn> (106) and a document with <eos> (1); a generation must
# stop on both, so both go into the generation config that vLLM and transformers read.
GEMMA_END_TOKENS = ("<eos>", "<end_of_turn>")
# What the template writes where an image or audio part stands: the marker the Gemma 3 / 3n
# processors expand into the part's soft tokens.
TEMPLATE_MEDIA_MARKERS = {"image": "<start_of_image>", "audio": "<start_of_audio>"}


def chat_template_text(media_markers: dict[str, str] | None = None) -> str:
    """The Gemma chat template, with other media markers for a model whose processor expands
    other tokens (Gemma 4 expands `<|image|>` and `<|audio|>`). The turn format is the same."""
    text = CHAT_TEMPLATE_FILE.read_text()
    for kind, marker in (media_markers or {}).items():
        quoted = f"'{TEMPLATE_MEDIA_MARKERS[kind]}'"
        if text.count(quoted) != 1:
            raise RuntimeError(f"{CHAT_TEMPLATE_FILE} does not write {quoted} exactly once")
        text = text.replace(quoted, repr(marker))
    return text


def sha256_file(path: Path, progress: bool = True) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with (
        path.open("rb") as handle,
        tqdm(
            total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}", disable=not progress
        ) as bar,
    ):
        while block := handle.read(4 << 20):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def convert_gguf(gguf_path: Path, out_dir: Path, expected_sha256: str | None = None) -> Path:
    """Convert `gguf_path` into a bf16 checkpoint at `out_dir`, atomically; returns `out_dir`."""
    started = time.monotonic()
    checksum = sha256_file(gguf_path)
    if expected_sha256 and checksum != expected_sha256:
        raise ValueError(
            f"{gguf_path} has sha256 {checksum}, expected {expected_sha256}; the file is "
            "damaged or not the one this model name refers to. "
            "Delete it and run again to reassemble it."
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a model directory is read by other users
    try:
        _write_checkpoint(gguf_path, staging)
        _write_provenance(staging, gguf_path, checksum)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    logger.info("converted %s -> %s in %.0f s", gguf_path.name, out_dir, time.monotonic() - started)
    return out_dir


def _write_checkpoint(gguf_path: Path, staging: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, GgufConfig

    logger.info("dequantising %s to bf16 (about 30 s for a 270M model)", gguf_path.name)
    packed = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=gguf_path.name, dequantize=True),
    )
    state = {name: tensor.to(torch.bfloat16) for name, tensor in packed.state_dict().items()}

    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    config.dtype = torch.bfloat16
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    # The output head is tied to the embedding, so its absence from the file is expected.
    missing = [name for name in missing if name != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(
            f"GGUF weights do not fit the model: missing={missing} extra={unexpected}"
        )
    plain.tie_weights()

    end_ids = _save_tokenizer(gguf_path, staging)
    plain.generation_config.eos_token_id = end_ids
    plain.generation_config.bos_token_id = config.bos_token_id
    plain.generation_config.pad_token_id = config.pad_token_id
    plain.save_pretrained(staging, safe_serialization=True)


def _save_tokenizer(gguf_path: Path, staging: Path) -> list[int]:
    """Save the tokenizer with one BOS and the Gemma chat template; returns the end-of-turn ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.add_bos_token = True
    tokenizer.add_eos_token = False
    tokenizer.chat_template = CHAT_TEMPLATE_FILE.read_text()
    tokenizer.save_pretrained(staging)

    reloaded = AutoTokenizer.from_pretrained(staging)
    ids = reloaded("Hello").input_ids
    if ids.count(reloaded.bos_token_id) != 1 or ids[0] != reloaded.bos_token_id:
        raise RuntimeError(f"converted tokenizer does not add exactly one BOS: {ids}")
    return [reloaded.convert_tokens_to_ids(token) for token in GEMMA_END_TOKENS]


def _write_provenance(staging: Path, gguf_path: Path, checksum: str) -> None:
    record = {"source": str(gguf_path.name), "source_sha256": checksum, "format": "gguf->bf16"}
    (staging / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
