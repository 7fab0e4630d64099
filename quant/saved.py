"""Save a quantised model with its quantisation facts, and load it back exactly as it was.

The facts (method, bits, group size, codec, what was quantised, what was kept and why, library
versions) go into the checkpoint's `config.json` under `gemma_stack_quantization`; the loader reads
them from there, never from a file name. Weights are stored packed (the codec's tensors), so a
reload does not quantise again and gives the same outputs as the model that was saved.

- `hqq`, `gptq` (HQQ's storage): a safetensors file of the packed tensors; reload builds the
  model from its config, puts a QuantLinear / quantised experts where the facts say, and loads
  the tensors.
- `bnb`: transformers' own bitsandbytes serialisation (`quantization_config`) for linear layers;
  packed MoE experts are restored from the same file afterwards.
"""

from __future__ import annotations

import logging
import shutil
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quant import _compat
from quant.codecs import HEAD_KIND, Codec, Int8Embedding, Int8Head, QuantLinear, embed_scale_of
from quant.moe import EXPERT_PARAMETERS, install_expert_storage, is_packed_experts
from quant.report import SHARED_EMBEDDING, QuantReport, build_report, module_name

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
TEXT_FILES = ("chat_template.jinja", "gemma_stack.json")


def save_quantised(loaded, out_dir: str | Path) -> Path:
    """Write `loaded` (a quant.LoadedModel at 8, 4 or 3 bits) to `out_dir`; returns `out_dir`."""
    from quant.loader import FACTS_KEY

    out_dir = Path(out_dir)
    report: QuantReport = loaded.report
    if report.method not in ("hqq", "gptq", "bnb"):
        raise ValueError(
            f"method={report.method!r}: only models quantised by quant.load (hqq, gptq, bnb) are "
            "saved here; a bf16 or pre-quantised model is saved with model.save_pretrained"
        )
    _refuse_checkpoint_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = loaded.model.config
    setattr(config, FACTS_KEY, _facts(report, loaded.dtype))
    try:
        if report.method == "bnb":
            loaded.model.save_pretrained(out_dir, safe_serialization=True)
        else:
            config.save_pretrained(out_dir)
            loaded.model.generation_config.save_pretrained(out_dir)
            save_file(_untied_state(loaded.model), str(out_dir / WEIGHTS_FILE))
    finally:
        delattr(config, FACTS_KEY)
    loaded.tokenizer.save_pretrained(out_dir)
    for name in TEXT_FILES:
        if (loaded.resolved.path / name).exists() and not (out_dir / name).exists():
            shutil.copy(loaded.resolved.path / name, out_dir / name)
    logger.info("saved %s (%s, %s bits) to %s", loaded.resolved.name, report.method,
                report.bits, out_dir)  # fmt: skip
    return out_dir


def _refuse_checkpoint_dir(out_dir: Path) -> None:
    """Nothing stored is overwritten: a directory holding a checkpoint (the source's own, or
    another save, whose leftover processor or index files would also confuse a reload) is refused.
    """
    if not out_dir.is_dir():
        return
    held = sorted(
        path.name
        for path in out_dir.iterdir()
        if path.name == "config.json" or path.suffix in (".safetensors", ".bin", ".gguf")
    )
    if held:
        raise FileExistsError(
            f"out_dir={str(out_dir)!r} already holds a checkpoint ({', '.join(held[:3])}); save "
            "to a new or empty directory (nothing there was changed)"
        )


def _untied_state(net) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once, under its first name (the embedding)."""
    state, seen = {}, set()
    for key, tensor in net.state_dict().items():
        if tensor.data_ptr() in seen:
            continue  # the output head tied to the embedding; tie_weights restores it
        seen.add(tensor.data_ptr())
        state[key] = tensor.contiguous()
    return state


def _facts(report: QuantReport, dtype: torch.dtype) -> dict:
    library = {"hqq": "hqq", "gptq": "hqq", "bnb": "bitsandbytes"}[report.method]
    return {
        "method": report.method,
        "bits": report.bits,
        "group_size": Codec(report.method, report.bits).group_size,
        "codec": Codec(report.method, report.bits).kind,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "quantised": sorted(report.quantised),
        "skipped": dict(sorted(report.skipped.items())),
        "head": report.head,
        "head_module": report.head_module,
        "embedding": report.embedding,
        "notes": list(report.notes),
        "library": f"{library} {version(library)}",
    }


def read_facts(config) -> dict:
    from quant.loader import FACTS_KEY

    facts = getattr(config, FACTS_KEY)
    for field in ("method", "bits", "group_size", "quantised", "skipped"):
        if field not in facts:
            raise ValueError(
                f"{FACTS_KEY}.{field} is missing from the checkpoint's config.json; the "
                "checkpoint was not written by quant.save_quantised, save it again"
            )
    return facts


def load_saved(path: Path, config, device: torch.device, dtype: torch.dtype):
    """Rebuild a model saved by `save_quantised`; returns (model, report)."""
    from quant.loader import model_class

    facts = read_facts(config)
    if facts["method"] == "awq":
        from quant.loader import LoadError

        raise LoadError(
            f"{path} is a 4-bit export for vLLM's int4 kernels (quant.export_vllm), not a "
            "checkpoint the transformers loader rebuilds; serve it with `python -m serve --model "
            "DIR`, or load its source with bits=4"
        )
    codec = Codec(facts["method"], int(facts["bits"]), int(facts["group_size"]))
    tensors = _read_tensors(path / WEIGHTS_FILE)
    head_name = facts.get("head_module") if facts.get("head", "tied") != "tied" else None
    head = _parts(tensors, f"{head_name}.") if head_name else {}
    tensors = {key: value for key, value in tensors.items() if not _under(key, head_name)}
    quantised = [name for name in facts["quantised"] if name != head_name]
    cls = model_class(config)
    if codec.method == "bnb":
        net = cls.from_pretrained(path, dtype=dtype, device_map={"": str(device)})
    else:
        net = cls._from_config(config, dtype=dtype)
        _install_linears(net, codec, dtype, quantised, tensors)
    _install_experts(net, codec, dtype, quantised, tensors)
    shared = facts.get("embedding") == SHARED_EMBEDDING
    if codec.method != "bnb":
        # A shared table was saved once, as the head's: the embedding has no tensor of its own.
        embedding = module_name(net, net.get_input_embeddings()) if shared else None
        _load_rest(net, tensors, embedding)
    if head_name:
        head = _install_head(net, facts["head"], head, dtype)
        if shared:
            net.set_input_embeddings(
                Int8Embedding(head, embed_scale_of(net.get_input_embeddings()))
            )
    net = net.to(device).eval()
    report = build_report(net, codec.method, codec.bits, facts["skipped"])
    report.notes.extend(facts.get("notes", []))
    return net, report


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(file), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118


def _parts(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}


def _under(key: str, module: str | None) -> bool:
    return module is not None and key.startswith(f"{module}.")


def _install_head(net, kind: str, parts: dict[str, torch.Tensor], dtype) -> Int8Head:
    """Put the saved int8 head in place, after the weights were tied, so it stays untied."""
    if kind != HEAD_KIND:
        raise ValueError(
            f"head={kind!r} in the checkpoint's facts is not a head this version can rebuild "
            f"({HEAD_KIND!r}); quantise and save the model again"
        )
    qweight = parts["qweight"]
    head = Int8Head(qweight.shape[1], qweight.shape[0], dtype)
    head.qweight = _compat.aligned_for_int8_mm(qweight)
    head.scale = parts["scale"].to(dtype)
    net.set_output_embeddings(head)
    return head


def _install_linears(net, codec, dtype, names, tensors) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        module = getattr(net.get_submodule(parent_name) if parent_name else net, child)
        if not isinstance(module, torch.nn.Linear):
            continue  # a packed expert parameter, installed by _install_experts
        layer = QuantLinear(codec, module.in_features, module.out_features, dtype)
        layer.set_parts({k: v for k, v in _parts(tensors, name + ".").items() if k != "bias"})
        if module.bias is not None:
            layer.bias = torch.nn.Parameter(tensors[f"{name}.bias"], requires_grad=False)
        setattr(net.get_submodule(parent_name) if parent_name else net, child, layer)


def _install_experts(net, codec, dtype, names, tensors) -> None:
    modules = {name.rpartition(".")[0] for name in names if name.endswith(EXPERT_PARAMETERS)}
    for name in sorted(modules):
        module = net.get_submodule(name)
        if not is_packed_experts(module):
            continue  # a dense MLP's down_proj, installed as a linear layer
        encoded = {}
        for param in EXPERT_PARAMETERS:
            shape = getattr(module, param).shape
            encoded[param] = (shape, _parts(tensors, f"{name}.{param}_"))
        install_expert_storage(module, codec, dtype, encoded)


def _load_rest(net, tensors, embedding: str | None = None) -> None:
    """Load the plain tensors; `embedding` names an embedding module whose table is not saved."""
    missing, unexpected = net.load_state_dict(tensors, strict=False)
    tied = set(getattr(net, "_tied_weights_keys", None) or {})
    missing = [key for key in missing if key not in tied and not key.endswith("lm_head.weight")]
    missing = [key for key in missing if key != f"{embedding}.weight"]
    if missing or unexpected:
        raise RuntimeError(
            f"saved tensors do not fit the model rebuilt from its config: missing={missing[:5]} "
            f"unexpected={unexpected[:5]}; the checkpoint is damaged or from another version"
        )
    net.tie_weights()
