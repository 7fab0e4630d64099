"""LoRA adapters loaded into the running server: checked, probed, listed, watched.

    python -m serve --model gemma-3-270m --adapters-dir DIR

Adapters come only from DIR: through `POST /v1/load_lora_adapter {"lora_name", "lora_path"}`, or by
appearing there (a watcher polls DIR every `watch_interval` seconds, loads each complete adapter
under its directory's name and unloads those whose directory went away).

Before the engine sees an adapter its files are checked without loading a tensor: the path lies in
DIR, the files are complete, the base model matches (the trainer's manifest fingerprint, or the PEFT
config and the tensor shapes where there is no manifest), the rank fits the server's maximum, every
LoRA module exists in the served architecture, and nothing vLLM cannot apply is present (DoRA,
embeddings, lm_head, full modules to save). All problems are reported in one 4xx. After the engine
loads it, a one-token probe through the adapter and through the base model must differ, or the
adapter is unloaded again: an adapter that changes nothing is a training or export bug.

The engine knows each adapter under a private name (`NAME@N`) that clients cannot send; a name
becomes visible to clients only once its adapter passed the probe, and replacing an adapter swaps
names atomically, so requests never see a half-loaded or rejected one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import re
import shutil
import struct
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve.engine.base import AdapterError, Engine, GenerationRequest, SamplingOptions

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "gemma_stack_adapter.json"  # written by train/ (train/manifest.py)
MANIFEST_FORMAT = "gemma-stack-adapter/1"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # what LoadAdapterRequest accepts

# A fixed chat turn: trained adapters are trained on chat turns, so this is where they differ most.
PROBE_MESSAGES = [{"role": "user", "content": "What is the password for the library?"}]
PROBE_TOP = 20  # vLLM's default max_logprobs
# A zero-B adapter gives exactly the base logprobs (adding zeros is exact); base and adapter
# probes run in the same batch, so even bf16 kernels see the same shapes. Measured noise: 0.0.
PROBE_MIN_DELTA = 1e-3

# Module names PEFT may target that vLLM cannot apply as LoRA.
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "embed_vision", "embed_audio")
# Parts of an image-text model outside the language model, where vLLM applies no LoRA.
NON_TEXT_PARTS = ("vision_tower", "audio_tower", "multi_modal_projector", "embed_vision")


# -- paths ----------------------------------------------------------------------------------------


def resolve_inside(root: Path, lora_path: str) -> Path:
    """The adapter directory `lora_path` names, which must lie inside `root` after symlinks."""
    raw = Path(lora_path).expanduser()
    if ".." in raw.parts:
        raise AdapterError(
            f"lora_path={lora_path!r} contains '..'; give a path inside the adapters directory "
            f"{str(root)!r} without '..'",
            status=400,
            param="lora_path",
        )
    candidate = raw if raw.is_absolute() else root / raw
    resolved = candidate.resolve()
    if resolved == root or not resolved.is_relative_to(root):
        via = " through a symlink" if candidate.absolute().is_relative_to(root) else ""
        raise AdapterError(
            f"lora_path={lora_path!r} resolves{via} to {str(resolved)!r}, outside the adapters "
            f"directory {str(root)!r}; this server loads adapters from there only (copy it there)",
            status=403,
            param="lora_path",
        )
    if not resolved.is_dir():
        raise AdapterError(
            f"lora_path={lora_path!r} is not a directory in {str(root)!r}",
            status=404,
            param="lora_path",
        )
    for file_name in (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE):
        target = (resolved / file_name).resolve()
        if (resolved / file_name).exists() and not target.is_relative_to(root):
            raise AdapterError(
                f"lora_path={lora_path!r}: {file_name} is a symlink to {str(target)!r}, outside "
                f"the adapters directory {str(root)!r}",
                status=403,
                param="lora_path",
            )
    return resolved


def signature(adapter_dir: Path) -> tuple:
    """What changes when an adapter is rewritten: each file's size and modification time."""
    parts = []
    for file_name in (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE):
        try:
            stat = (adapter_dir / file_name).stat()
            parts.append((file_name, stat.st_size, stat.st_mtime_ns))
        except OSError:
            parts.append((file_name, None, None))
    return tuple(parts)


# -- reading an adapter without loading it ---------------------------------------------------------


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from the header; raises ValueError if the file is cut short."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"{path.name} is {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise ValueError(f"{path.name} is truncated inside its header ({size} bytes)")
        header = json.loads(handle.read(header_len))
    header.pop("__metadata__", None)
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + header_len + end != size:
        raise ValueError(
            f"{path.name} is {size} bytes but its header describes {8 + header_len + end}; "
            "it is truncated or still being written"
        )
    return {name: entry["shape"] for name, entry in header.items()}


def incomplete_reason(adapter_dir: Path) -> str | None:
    """Why `adapter_dir` is not (yet) a complete adapter, or None."""
    if adapter_dir.name.startswith(".") or ".tmp" in adapter_dir.name:
        return "it is a temporary directory"
    for file_name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (adapter_dir / file_name).is_file():
            return f"{file_name} is missing"
    for file_name in (CONFIG_FILE, MANIFEST_FILE):
        file_path = adapter_dir / file_name
        if file_name == MANIFEST_FILE and not file_path.exists():
            continue
        try:
            json.loads(file_path.read_text())
        except (OSError, ValueError) as error:
            return f"{file_name} is not readable JSON ({error})"
    try:
        safetensors_shapes(adapter_dir / WEIGHTS_FILE)
    except (OSError, ValueError) as error:
        return str(error)
    return None


# -- the served model's facts ----------------------------------------------------------------------


@dataclass
class ServedModel:
    """What an adapter is checked against: the served checkpoint's architecture and weights."""

    name: str
    path: Path
    architecture: str
    text_config: dict[str, Any]
    linear: dict[str, tuple[int, int]]  # language-model Linear module -> (in, out) features
    image_text: bool  # the language model sits under `model.language_model.`
    chat_template_sha256: str | None
    digest: asyncio.Future | None = None  # sha256 fingerprint of the weights, computed at start

    @property
    def family(self) -> str:
        return _family(self.architecture)


def _family(architecture: str) -> str:
    """Gemma3ForCausalLM and Gemma3ForConditionalGeneration share the family Gemma3."""
    return re.sub(r"For[A-Z]\w*$", "", architecture or "")


def describe_model(name: str, model_path: Path, chat_template: str | None) -> ServedModel:
    """Build the architecture on the meta device (no memory, no weights) to list its modules."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_path)
    architecture = (config.architectures or [type(config).__name__])[0]
    model_class = getattr(transformers, architecture)
    with torch.device("meta"):
        model = model_class._from_config(config)
    linear = {}
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not _outside_text_model(module_name):
            linear[module_name] = (module.in_features, module.out_features)
    text_config = getattr(config, "text_config", None) or config
    template_sha = hashlib.sha256(chat_template.encode()).hexdigest() if chat_template else None
    return ServedModel(
        name=name,
        path=model_path,
        architecture=architecture,
        text_config=text_config.to_dict(),
        linear=linear,
        image_text=any(key.startswith("model.language_model.") for key in linear),
        chat_template_sha256=template_sha,
    )


def _outside_text_model(module_name: str) -> bool:
    parts = module_name.split(".")
    return parts[-1] in EMBEDDING_MODULES or any(part in NON_TEXT_PARTS for part in parts)


def weights_digest(model_path: Path) -> str:
    """The manifest's fingerprint: sha256 of the one weights file, else of "name hash" lines."""
    files = sorted(model_path.glob("*.safetensors")) or sorted(model_path.glob("*.bin"))
    hashes = {}
    for weights in files:
        digest = hashlib.sha256()
        with weights.open("rb") as handle:
            while chunk := handle.read(16 << 20):
                digest.update(chunk)
        hashes[weights.name] = digest.hexdigest()
    if len(hashes) == 1:
        return next(iter(hashes.values()))
    return hashlib.sha256("".join(f"{n} {h}\n" for n, h in hashes.items()).encode()).hexdigest()


# -- checks ----------------------------------------------------------------------------------------


@dataclass
class Checked:
    """An adapter that passed the file checks, and how the engine should load it."""

    path: Path
    rank: int
    modules: int
    renames: dict[str, str] = field(default_factory=dict)  # tensor key -> served name


def check_adapter(path: Path, served: ServedModel, digest: str | None, max_rank: int) -> Checked:
    """Every reason the engine must not load the adapter at `path`, raised as one 400."""
    reason = incomplete_reason(path)
    if reason is not None:
        raise AdapterError(
            f"the adapter at {str(path)!r} is incomplete: {reason}; wait until it is fully "
            "written (the trainer renames a finished adapter into place)",
            status=400,
            param="lora_path",
        )
    config = json.loads((path / CONFIG_FILE).read_text())
    manifest_path = path / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    shapes = safetensors_shapes(path / WEIGHTS_FILE)

    problems = check_features(config, shapes)
    problems += check_base(config, manifest, served, digest)
    rank, rank_problems = check_rank(config, shapes, max_rank)
    problems += rank_problems
    renames, module_problems, modules = check_modules(shapes, served)
    problems += module_problems
    if problems:
        raise AdapterError(
            f"the adapter at {str(path)!r} cannot be served: " + "; ".join(problems),
            status=400,
            param="lora_path",
        )
    return Checked(path=path, rank=rank, modules=modules, renames=renames)


def check_features(config: dict, shapes: dict[str, list[int]]) -> list[str]:
    """PEFT features vLLM cannot apply: other PEFT types, DoRA, embeddings, full modules."""
    problems = []
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        problems.append(f"peft_type={peft_type!r} is not LoRA; vLLM serves LoRA adapters only")
    if config.get("use_dora") or any("lora_magnitude_vector" in key for key in shapes):
        problems.append("it is a DoRA adapter (use_dora=true); vLLM cannot apply DoRA, retrain "
                        "with use_dora=false")  # fmt: skip
    if config.get("modules_to_save"):
        problems.append(
            f"modules_to_save={config['modules_to_save']!r} saves full modules, which vLLM "
            "cannot apply; retrain without modules_to_save"
        )
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    embedded = sorted({t for t in targets for m in EMBEDDING_MODULES if t.endswith(m)})
    if embedded or any("lora_embedding_" in key for key in shapes):
        problems.append(
            f"it adapts the embeddings or lm_head (target_modules {embedded or 'with embeddings'}"
            "); vLLM applies LoRA to the linear layers only, retrain without them"
        )
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("it trains biases (bias/lora_bias); vLLM cannot apply them")
    if config.get("layer_replication"):
        problems.append("it uses layer_replication, which vLLM cannot apply")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() in ("pissa", "olora", "corda", "loftq"):
        problems.append(f"init_lora_weights={init!r} changes the base weights; convert it first")
    return problems


def check_base(
    config: dict, manifest: dict | None, served: ServedModel, digest: str | None
) -> list[str]:
    """The adapter was trained on the weights this server serves."""
    if manifest is not None:
        return _check_manifest(manifest, served, digest)
    problems = []
    base = config.get("base_model_name_or_path") or ""
    base_dir = Path(base).expanduser()
    if base and (base_dir / "config.json").is_file():
        theirs = json.loads((base_dir / "config.json").read_text())
        theirs = theirs.get("text_config") or theirs
        for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
            mine, other = _comparable(key, served.text_config.get(key)), theirs.get(key)
            if other is not None and _comparable(key, other) != mine:
                problems.append(
                    f"its base model {base!r} has {key}={other!r}, the served model "
                    f"{served.name!r} has {served.text_config.get(key)!r}"
                )
    elif base and not _same_model_name(base, served):
        problems.append(
            f"it was trained on base_model_name_or_path={base!r}, but this server serves "
            f"{served.name!r}; train it on {served.name!r} (or fix base_model_name_or_path if "
            "it was)"
        )
    their_class = (config.get("auto_mapping") or {}).get("base_model_class")
    if their_class and _family(their_class) != served.family:
        problems.append(
            f"it was trained on a {their_class}, but this server serves a {served.architecture}"
        )
    return problems


def _comparable(key: str, value):
    # gemma3 (image-text) and gemma3_text name the same language model.
    return str(value).removesuffix("_text") if key == "model_type" else value


def _same_model_name(base: str, served: ServedModel) -> bool:
    """`google/gemma-3-270m` and `.../gemma-3-270m-it` name the model served as gemma-3-270m."""
    theirs = Path(base.rstrip("/")).name.lower()
    return any(theirs.startswith(mine.lower()) for mine in (served.name, served.path.name))


def _check_manifest(manifest: dict, served: ServedModel, digest: str | None) -> list[str]:
    if manifest.get("format") != MANIFEST_FORMAT:
        return [f"{MANIFEST_FILE} has format {manifest.get('format')!r}, not {MANIFEST_FORMAT!r}"]
    problems = []
    base = manifest.get("base_model") or {}
    theirs = (base.get("weights") or {}).get("digest")
    if theirs != digest:
        problems.append(
            f"it was trained on other weights: {MANIFEST_FILE} fingerprints its base "
            f"{base.get('name')!r} as sha256 {str(theirs)[:16]}..., the served {served.name!r} is "
            f"{str(digest)[:16]}...; train it on the served model"
        )
    if base.get("architecture") and _family(base["architecture"]) != served.family:
        problems.append(
            f"it was trained on a {base['architecture']}, this server serves a "
            f"{served.architecture}"
        )
    template = (manifest.get("tokenizer") or {}).get("chat_template_sha256")
    if template and served.chat_template_sha256 and template != served.chat_template_sha256:
        problems.append(
            "it was trained with another chat template (chat_template_sha256 differs), so the "
            "served prompts would not be the ones it learned"
        )
    return problems


def check_rank(config: dict, shapes: dict[str, list[int]], max_rank: int) -> tuple[int, list[str]]:
    """The largest rank in the config or the tensors must fit the engine's LoRA slots."""
    declared = [config.get("r") or 0, *(config.get("rank_pattern") or {}).values()]
    actual = [shape[0] for key, shape in shapes.items() if key.endswith("lora_A.weight")]
    rank = max([*declared, *actual], default=0)
    if rank > max_rank:
        return rank, [
            f"its rank {rank} is above this server's max_lora_rank {max_rank}; retrain with "
            f"r <= {max_rank} or restart the server with --max-lora-rank {_next_rank(rank)}"
        ]
    return rank, []


def _next_rank(rank: int) -> int:
    return 1 << math.ceil(math.log2(max(rank, 1)))


def check_modules(
    shapes: dict[str, list[int]], served: ServedModel
) -> tuple[dict[str, str], list[str], int]:
    """Each LoRA tensor must adapt a linear layer of the served language model, in its shape.

    Adapters trained on the text-only class (`model.layers.N`) and on the image-text class
    (`model.language_model.layers.N`) differ only in that prefix; such names are renamed.
    """
    renames: dict[str, str] = {}
    unknown: set[str] = set()
    misshaped: list[str] = []
    modules: set[str] = set()
    for key, shape in shapes.items():
        match = re.match(r"^(?:base_model\.model\.)?(.+)\.(lora_[AB])\.weight$", key)
        if match is None:
            continue  # DoRA vectors, embeddings and full modules are reported by check_features
        module, which = match.groups()
        served_name = _served_module(module, served)
        if served_name is None:
            if module.rsplit(".", 1)[-1] not in EMBEDDING_MODULES:
                unknown.add(module)
            continue
        if served_name != module:
            renames[key] = key.replace(module, served_name, 1)
        modules.add(served_name)
        in_features, out_features = served.linear[served_name]
        expected = in_features if which == "lora_A" else out_features
        axis = 1 if which == "lora_A" else 0
        if len(shape) != 2 or shape[axis] != expected:
            misshaped.append(f"{module}.{which} {shape} (the served layer is {in_features} -> "
                             f"{out_features})")  # fmt: skip
    problems = []
    if unknown:
        shown = ", ".join(sorted(unknown)[:3]) + (
            f" and {len(unknown) - 3} more" * (len(unknown) > 3)
        )
        problems.append(
            f"{len(unknown)} of its modules do not exist in the served {served.architecture} "
            f"({shown}); it targets another architecture"
        )
    if misshaped:
        problems.append(
            f"{len(misshaped)} of its tensors do not fit the served layers, so it was trained "
            f"on another model size (e.g. {misshaped[0]})"
        )
    if not modules and not problems:
        problems.append(f"{WEIGHTS_FILE} holds no LoRA tensors (lora_A/lora_B weights)")
    return renames, problems, len(modules)


def _served_module(module: str, served: ServedModel) -> str | None:
    if module in served.linear:
        return module
    if served.image_text:
        candidates = [re.sub(r"^model\.layers\.", "model.language_model.layers.", module)]
    else:
        candidates = [
            re.sub(r"^model\.language_model\.", "model.", module),
            re.sub(r"^language_model\.model\.", "model.", module),
        ]
    return next((c for c in candidates if c in served.linear), None)


def write_renamed(checked: Checked, into: Path) -> Path:
    """A copy of the adapter whose tensor names are the served model's, for the engine to load."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(checked.path / WEIGHTS_FILE)
    renamed = {checked.renames.get(key, key): value for key, value in tensors.items()}
    target = into / f"{checked.path.name}-{uuid.uuid4().hex[:8]}"
    target.mkdir(parents=True)
    save_file(renamed, target / WEIGHTS_FILE, metadata={"format": "pt"})
    shutil.copy2(checked.path / CONFIG_FILE, target / CONFIG_FILE)
    return target


# -- the registry ----------------------------------------------------------------------------------


@dataclass
class Loaded:
    name: str  # what clients send as `model`
    engine_name: str  # the engine's private name for it
    path: Path
    signature: tuple
    rank: int
    modules: int
    probe_delta: float
    phases: dict[str, float]  # seconds spent checking, loading into the engine, probing
    copy: Path | None = None  # a renamed copy the engine loaded instead of `path`


class AdapterRegistry:
    """The adapters a server serves; `load`, `unload` and the watcher all go through one lock."""

    def __init__(self, config, engine: Engine, model_path: Path):
        self.root = Path(config.adapters_dir).expanduser().resolve()
        self.engine = engine
        self.model_path = Path(model_path)
        self.max_rank = config.max_lora_rank
        self.interval = config.watch_interval
        self.served_name = config.name
        self._loaded: dict[str, Loaded] = {}
        self._lock = asyncio.Lock()
        self._serial = 0
        self._served: ServedModel | None = None
        self._digest: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self._copies = Path(tempfile.mkdtemp(prefix="gemma-stack-adapters-"))
        # The watcher's memory, by adapter directory: the signature seen on the last scan, and
        # signatures it must not load again (refused, or unloaded by a client) until they change.
        self._seen: dict[Path, tuple] = {}
        self._skip: dict[Path, tuple] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        chat_template = getattr(self.engine.policy.tokenizer, "chat_template", None)
        self._served = await asyncio.to_thread(
            describe_model, self.served_name, self.model_path, chat_template
        )
        # Hashing the weights takes a second or more; only manifests need it, so it runs aside.
        self._digest = asyncio.create_task(asyncio.to_thread(weights_digest, self.model_path))
        self._watcher = asyncio.create_task(self._watch())
        logger.info(
            "adapters: serving LoRA adapters from %s (max rank %d, scanned every %.1f s)",
            self.root,
            self.max_rank,
            self.interval,
        )

    async def stop(self) -> None:
        for task in (self._watcher, self._digest):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        shutil.rmtree(self._copies, ignore_errors=True)

    # -- what clients see --------------------------------------------------------------------

    def served(self) -> dict[str, str]:
        """Client-visible adapter name -> the engine's name for it."""
        return {name: loaded.engine_name for name, loaded in self._loaded.items()}

    # -- load and unload ---------------------------------------------------------------------

    async def load(self, name: str, lora_path: str, watcher: bool = False) -> dict[str, Any]:
        path = resolve_inside(self.root, lora_path)
        async with self._lock:
            current = self._loaded.get(name)
            if current and current.path == path and current.signature == signature(path):
                return self._answer("already_loaded", current, 0.0)
            # A client may have unloaded it while the watcher waited for the lock.
            if watcher and self._skip.get(path) == signature(path):
                return {"status": "skipped", "lora_name": name}
            loaded, seconds = await self._load_checked(name, path)
            self._skip.pop(path, None)
        return self._answer("loaded", loaded, seconds)

    async def unload(self, name: str) -> None:
        async with self._lock:
            loaded = self._loaded.get(name)
            if loaded is None:
                raise AdapterError(
                    f"lora_name={name!r} is not loaded; loaded adapters: "
                    f"{sorted(self._loaded) or 'none'}",
                    status=404,
                    param="lora_name",
                )
            # A client's unload wins over the watcher until the adapter is rewritten.
            self._skip[loaded.path] = loaded.signature
            await self._unload(loaded)

    async def _load_checked(self, name: str, path: Path) -> tuple[Loaded, float]:
        started = mark = time.perf_counter()
        phases: dict[str, float] = {}

        def lap(phase: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            phases[phase] = round(now - mark, 3)
            mark = now

        sig = signature(path)
        digest = await self._weights_digest() if (path / MANIFEST_FILE).exists() else None
        checked = await asyncio.to_thread(check_adapter, path, self._served, digest, self.max_rank)
        copy = None
        if checked.renames:
            copy = await asyncio.to_thread(write_renamed, checked, self._copies)
        lap("check_s")
        self._serial += 1
        engine_name = f"{name}@{self._serial}"
        await self.engine.load_adapter(engine_name, str(copy or path))
        lap("engine_load_s")
        try:
            delta = await self._probe_delta(engine_name)
        except BaseException:
            await self._discard(engine_name, copy)
            raise
        lap("probe_s")
        if delta < PROBE_MIN_DELTA:
            await self._discard(engine_name, copy)
            raise AdapterError(
                f"the adapter at {str(path)!r} does not change the model's output (largest "
                f"logprob change on a probe prompt: {delta:.2g}); its LoRA B weights are "
                "probably all zero (untrained, or exported before training); it was unloaded",
                status=400,
                param="lora_path",
            )
        loaded = Loaded(
            name, engine_name, path, sig, checked.rank, checked.modules, delta, phases, copy
        )
        previous = self._loaded.get(name)
        self._loaded[name] = loaded  # the swap: from here requests use the new adapter
        if previous is not None:
            await self._discard(previous.engine_name, previous.copy)
        seconds = time.perf_counter() - started
        logger.info(
            "adapter %r %s from %s in %.2f s (%s; rank %d, %d modules, probe delta %.3g)",
            name,
            "replaced" if previous else "loaded",
            path,
            seconds,
            ", ".join(f"{key} {value:.2f}" for key, value in phases.items()),
            checked.rank,
            checked.modules,
            delta,
        )
        return loaded, seconds

    async def _unload(self, loaded: Loaded) -> None:
        started = time.perf_counter()
        del self._loaded[loaded.name]
        await self._discard(loaded.engine_name, loaded.copy)
        logger.info("adapter %r unloaded in %.2f s", loaded.name, time.perf_counter() - started)

    async def _discard(self, engine_name: str, copy: Path | None) -> None:
        try:
            await self.engine.unload_adapter(engine_name)
        finally:
            if copy is not None:
                shutil.rmtree(copy, ignore_errors=True)

    async def _weights_digest(self) -> str | None:
        try:
            return await asyncio.shield(self._digest)
        except Exception:
            logger.exception("could not fingerprint the served weights")
            return None

    def _answer(self, status: str, loaded: Loaded, seconds: float) -> dict[str, Any]:
        return {
            "status": status,
            "lora_name": loaded.name,
            "lora_path": str(loaded.path),
            "parent": self.engine.model_name,
            "rank": loaded.rank,
            "modules": loaded.modules,
            "probe_logprob_delta": round(loaded.probe_delta, 4),
            "load_seconds": round(seconds, 3),
            "phases": loaded.phases if status == "loaded" else {},
        }

    # -- the probe ---------------------------------------------------------------------------

    async def _probe_delta(self, engine_name: str) -> float:
        """Largest change in the first token's top logprobs, adapter against base model.

        Both probes are submitted together so the engine runs them in one batch. A token in only
        one top-k counts with the other side's k-th logprob, a lower bound on its change.
        """
        prompt = self.engine.policy.render(PROBE_MESSAGES).token_ids
        base, tuned = await asyncio.gather(
            self._first_token_logprobs(prompt, None),
            self._first_token_logprobs(prompt, engine_name),
        )
        base_floor, tuned_floor = min(base.values()), min(tuned.values())
        return max(
            abs(base.get(token, base_floor) - tuned.get(token, tuned_floor))
            for token in set(base) | set(tuned)
        )

    async def _first_token_logprobs(self, prompt: list[int], adapter: str | None) -> dict:
        request = GenerationRequest(
            request_id=f"adapter-probe-{uuid.uuid4().hex}",
            prompt_token_ids=prompt,
            sampling=SamplingOptions(max_tokens=1, temperature=0.0, logprobs=PROBE_TOP),
            adapter=adapter,
        )
        top: dict[int, float] = {}
        async for step in self.engine.generate(request):
            for choice in step.choices:
                for entry in choice.logprobs or []:
                    top.update({token_id: value for token_id, _, value in entry.top})
        return top

    # -- the watcher -------------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            try:
                await self.scan()
            except Exception:  # the watcher must outlive a bad scan
                logger.exception("adapters: scanning %s failed", self.root)
            await asyncio.sleep(self.interval)

    async def scan(self) -> None:
        """Load complete adapters that appeared in the directory, unload those that went away."""
        for loaded in list(self._loaded.values()):
            if not (loaded.path / CONFIG_FILE).exists():
                async with self._lock:
                    if self._loaded.get(loaded.name) is loaded:
                        logger.info("adapter %r: %s was removed", loaded.name, loaded.path)
                        await self._unload(loaded)
        seen = {}
        for entry in sorted(self.root.iterdir()):
            if entry.is_dir() and not entry.name.startswith("."):
                seen[entry] = signature(entry)
                await self._consider(entry, seen[entry])
        self._seen = seen

    async def _consider(self, entry: Path, sig: tuple) -> None:
        # Loaded only once it looks complete and has not changed since the previous scan, so a
        # directory still being copied in is left alone.
        path = entry.resolve()
        if self._seen.get(entry) != sig or self._skip.get(path) == sig:
            return
        if incomplete_reason(entry) is not None or not NAME_PATTERN.match(entry.name):
            return
        holder = next((a for a in self._loaded.values() if a.path == path), None)
        if holder is not None and holder.signature == sig:
            return
        name = holder.name if holder else entry.name
        if holder is None and name in self._loaded:
            self._skip[path] = sig
            logger.warning("adapters: %s not loaded, the name %r is taken", entry, name)
            return
        try:
            await self.load(name, str(entry), watcher=True)
        except AdapterError as error:
            self._skip[path] = sig
            logger.warning("adapters: %s refused: %s", entry, error)
