"""Build the tiny random checkpoints the tests (and the vLLM engine's tests) load.

    python scripts/build_tiny_checkpoints.py [--only NAME] [--force]

Writes `$GEMMA_STACK_MODELS/tiny/<name>` (default ~/.cache/gemma-stack/models/tiny/<name>):
- `gemma4-moe`: Gemma4ForCausalLM, 2 layers, 4 experts (top 2) with packed 3-D expert tensors
  beside a dense MLP, no per-layer embeddings.
- `gemma3-vision`: Gemma3ForConditionalGeneration with a 1-layer SigLIP vision tower (64x64
  images, 4 soft tokens per image) and a Gemma3Processor built locally.
- `gemma4-multimodal`: Gemma4ForConditionalGeneration with a dense 2-layer text model, a 1-layer
  vision tower (images resized to at most 70 soft tokens, Gemma 4's smallest budget) and a 1-layer
  conformer audio tower (one soft token per 40 ms), and a Gemma4Processor built locally. Gemma
  4's seven media tokens (`<|image>`, `<|image|>`, `<|audio|>`, ...) are added after the 270M
  vocabulary, and its chat template writes `<|image|>` / `<|audio|>` where media parts stand.

Random weights with fixed seeds; the tokenizer is the real Gemma 3 270M one (so token ids mean
what they mean in the real model), which is why the vocabulary stays 262144 (+ the media tokens);
the tied embedding of 262144 x 64 is most of each checkpoint's ~35 MB. Nothing is downloaded.
An existing checkpoint is left alone unless --force is given.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant.convert import CHAT_TEMPLATE_FILE, GEMMA_END_TOKENS, chat_template_text  # noqa: E402
from quant.resolve import models_dir, resolve_model  # noqa: E402

logger = logging.getLogger("build_tiny_checkpoints")

SEED = 1234
HIDDEN = 64
HEAD_DIM = 64  # vLLM's CPU attention kernels take 64; smaller head sizes are not all supported
IMAGE_TOKEN = "<image_soft_token>"  # the 270M tokenizer lacks it; id 262144 as in Gemma 3 4B+
# Gemma 4's media tokens, by the names Gemma4Processor reads off its tokenizer. The 270M tokenizer
# has none of them (Gemma 4's own ids, 255999 and 258880-258884, are other tokens there), so they
# are appended: ids 262144-262150. `<|video|>` is added too because Gemma4Processor adds it on
# every load otherwise, which would grow the vocabulary past the model's embedding.
GEMMA4_MEDIA_TOKENS = {
    "boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
    "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>",
    "video_token": "<|video|>",
}  # fmt: skip
GEMMA4_IMAGE_SOFT_TOKENS = 70  # the smallest budget Gemma 4's image processor accepts


def tiny_root() -> Path:
    return models_dir() / "tiny"


def _text_kwargs(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=HEAD_DIM,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=[1, 106],
    )


def build_gemma4_moe(out: Path, tokenizer) -> None:
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    config = Gemma4TextConfig(
        **_text_kwargs(len(tokenizer)),
        hidden_size_per_layer_input=0,
        enable_moe_block=True,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=64,
        global_head_dim=HEAD_DIM,
    )
    config.architectures = ["Gemma4ForCausalLM"]
    torch.manual_seed(SEED)
    model = Gemma4ForCausalLM(config).to(torch.bfloat16)
    _save(model, tokenizer, out)


def build_gemma3_vision(out: Path, tokenizer) -> None:
    from transformers import (
        AutoTokenizer,
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    # Gemma3Processor reads boi/eoi/image tokens as named attributes of the tokenizer;
    # passed as a dict they are registered as model-specific special tokens and saved.
    tokenizer = AutoTokenizer.from_pretrained(
        tokenizer.name_or_path,
        extra_special_tokens={
            "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
            "image_token": IMAGE_TOKEN,
        },
    )  # fmt: skip
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id != len(tokenizer) - 1:
        raise RuntimeError(f"{IMAGE_TOKEN} got id {image_token_id}, expected the last id")
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=64, patch_size=16, vision_use_head=False,
    )  # fmt: skip
    config = Gemma3Config(
        text_config=Gemma3TextConfig(**_text_kwargs(image_token_id + 1)),
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=image_token_id,
        tie_word_embeddings=True,
    )
    config.architectures = ["Gemma3ForConditionalGeneration"]
    torch.manual_seed(SEED)
    model = Gemma3ForConditionalGeneration(config).to(torch.bfloat16)
    images = Gemma3ImageProcessor(
        size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        do_pan_and_scan=False,
    )  # fmt: skip
    processor = Gemma3Processor(
        image_processor=images, tokenizer=tokenizer, image_seq_length=4,
        chat_template=CHAT_TEMPLATE_FILE.read_text(),
    )  # fmt: skip
    _save(model, processor, out)
    _published_vision_layout(out)


def _published_vision_layout(out: Path) -> None:
    """transformers 5.19 saves the SigLIP tower as `vision_tower.<...>`; Google's Gemma 3
    checkpoints (and vLLM 0.32's loader) have `vision_tower.vision_model.<...>`, which transformers
    loads to the same parameters. Write the published layout, so both engines load the file."""
    from safetensors.torch import load_file, save_file

    path = out / "model.safetensors"
    prefix, published = "vision_tower.", "vision_tower.vision_model."
    state = {
        published + key[len(prefix) :]
        if key.startswith(prefix) and not key.startswith(published)
        else key: value
        for key, value in load_file(path).items()
    }
    save_file(state, path, metadata={"format": "pt"})
    path.chmod(0o644)


def build_gemma4_multimodal(out: Path, tokenizer) -> None:
    from transformers import (
        AutoTokenizer,
        Gemma4AudioConfig,
        Gemma4AudioFeatureExtractor,
        Gemma4Config,
        Gemma4ForConditionalGeneration,
        Gemma4Processor,
        Gemma4TextConfig,
        Gemma4VisionConfig,
    )
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(
        tokenizer.name_or_path, extra_special_tokens=GEMMA4_MEDIA_TOKENS
    )
    ids = {
        name: tokenizer.convert_tokens_to_ids(token) for name, token in GEMMA4_MEDIA_TOKENS.items()
    }
    if sorted(ids.values()) != list(range(len(tokenizer) - len(ids), len(tokenizer))):
        raise RuntimeError(f"Gemma 4 media tokens got ids {ids}, expected the last ones")
    text = Gemma4TextConfig(
        **_text_kwargs(len(tokenizer)),
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=len(tokenizer),
        global_head_dim=HEAD_DIM,
    )
    # default_output_length is not a field of transformers' config; vLLM reads it as the most
    # soft tokens an image can take, which must be what the image processor allows.
    vision = Gemma4VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, patch_size=16, pooling_kernel_size=3,
        position_embedding_size=256, default_output_length=GEMMA4_IMAGE_SOFT_TOKENS,
    )  # fmt: skip
    # The first subsampling convolution keeps as many channels as there are mel bins (128), since
    # the projection after it assumes so; the second may be small.
    audio = Gemma4AudioConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        subsampling_conv_channels=[128, 16], output_proj_dims=32,
    )  # fmt: skip
    config = Gemma4Config(
        text_config=text, vision_config=vision, audio_config=audio,
        boi_token_id=ids["boi_token"], eoi_token_id=ids["eoi_token"],
        image_token_id=ids["image_token"], video_token_id=ids["video_token"],
        boa_token_id=ids["boa_token"], eoa_token_index=ids["eoa_token"],
        audio_token_id=ids["audio_token"], tie_word_embeddings=True,
    )  # fmt: skip
    config.architectures = ["Gemma4ForConditionalGeneration"]
    torch.manual_seed(SEED)
    model = Gemma4ForConditionalGeneration(config).to(torch.bfloat16)
    template = chat_template_text({"image": "<|image|>", "audio": "<|audio|>"})
    processor = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessorPil(max_soft_tokens=GEMMA4_IMAGE_SOFT_TOKENS),
        tokenizer=tokenizer, video_processor=_gemma4_video_processor(),
        image_seq_length=GEMMA4_IMAGE_SOFT_TOKENS, chat_template=template,
    )  # fmt: skip
    _save(model, processor, out, template)


def _gemma4_video_processor():
    """Gemma4Processor requires a video processor; the real one needs torchvision. Without it the
    stand-in from quant/_compat.py is saved under the real class's name, so the checkpoint loads
    the real one wherever torchvision is installed."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        from transformers import Gemma4VideoProcessor

        return Gemma4VideoProcessor()
    from quant._compat import no_video_processor

    return no_video_processor({"video_processor_type": "Gemma4VideoProcessor"})


BUILDERS = {
    "gemma4-moe": build_gemma4_moe,
    "gemma3-vision": build_gemma3_vision,
    "gemma4-multimodal": build_gemma4_multimodal,
}


def _save(model, tokenizer_or_processor, out: Path, template: str | None = None) -> None:
    tokenizer = getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)
    end_ids = [tokenizer.convert_tokens_to_ids(token) for token in GEMMA_END_TOKENS]
    model.generation_config.eos_token_id = end_ids
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer_or_processor.save_pretrained(out)
    if template is None:
        shutil.copy(CHAT_TEMPLATE_FILE, out / "chat_template.jinja")
    else:
        (out / "chat_template.jinja").write_text(template)
    for file in out.iterdir():
        file.chmod(0o644)  # safetensors writes owner-only files; servers may run as another user


def build(name: str, root: Path, force: bool = False) -> Path:
    from transformers import AutoTokenizer

    from quant._compat import processors_without_torchvision

    processors_without_torchvision()  # Gemma4Processor cannot be built without it here

    target = root / name
    if (target / "config.json").exists() and not force:
        logger.info("%s exists, skipped (--force rebuilds it)", target)
        return target
    source = resolve_model("gemma-3-270m").path  # the real tokenizer, converted locally
    tokenizer = AutoTokenizer.from_pretrained(source)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    staging.chmod(0o755)
    try:
        BUILDERS[name](staging, tokenizer)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("built %s", target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(BUILDERS), action="append")
    parser.add_argument("--force", action="store_true", help="rebuild existing checkpoints")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in args.only or sorted(BUILDERS):
        print(build(name, tiny_root(), force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
