"""Weights: turn a catalog entry into a local transformers folder, then load it.

Sources are tried in the catalog's order. Offline packs and GGUF files are verified
against their sha256, dequantized and converted once into a safetensors folder in the
cache, so later runs reload in seconds. Hub sources go through huggingface_hub and
fail fast, in one line, when the hub cannot be reached.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchharness.config.catalog import GgufSource, HubSource, LocalSource, ModelEntry, PackSource, Source
from benchharness.files import sha256_file
from benchharness.errors import SourceError

log = logging.getLogger(__name__)

MARKER = "benchharness-source.json"


@dataclass(frozen=True)
class ResolvedModel:
    """A model as a local transformers folder, with where it came from."""

    name: str
    path: Path
    source: dict[str, Any]
    weights_sha256: str | None
    revision: str | None
    converted_now: bool = False
    prepare_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Availability:
    available: bool
    detail: str


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def pack_parts(src: PackSource) -> tuple[list[Path], list[str]]:
    """(found part paths, missing part descriptions)."""
    found, missing = [], []
    for part in src.pack:
        package, _, inner = part.partition("/")
        base = package_dir(package)
        path = base / inner if base is not None else None
        if path is None or not path.is_file():
            missing.append(part)
        else:
            found.append(path)
    return found, missing


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}


def availability(src: Source, cache_dir: Path) -> Availability:
    """Whether a source can be used on this machine now, without any network call."""
    if isinstance(src, PackSource):
        _, missing = pack_parts(src)
        if missing:
            return Availability(False, f"pack not installed (missing {missing[0]}); install: {src.install}")
        return Availability(True, "offline pack installed")
    if isinstance(src, GgufSource):
        path = src.gguf.expanduser()
        return Availability(path.is_file(), f"GGUF file {path}" + ("" if path.is_file() else " not found"))
    if isinstance(src, LocalSource):
        path = src.local.expanduser()
        ok = (path / "config.json").is_file()
        return Availability(ok, f"local folder {path}" + ("" if ok else " not found (no config.json)"))
    cached = _hub_cached(src)
    if cached is not None:
        return Availability(True, f"hub {src.hub} in the local hub cache")
    return Availability(False, f"hub {src.hub}: not in the local hub cache (needs the hub)")


def resolve_model(entry: ModelEntry, cache_dir: Path) -> ResolvedModel:
    """The first source of `entry` that works here, as a local transformers folder."""
    reasons: list[str] = []
    for src in entry.sources:
        state = availability(src, cache_dir)
        if not state.available and not (isinstance(src, HubSource) and not hub_offline()):
            reasons.append(state.detail)
            continue
        started = time.perf_counter()
        try:
            resolved = _resolve_source(entry, src, cache_dir)
        except SourceError as exc:
            if isinstance(src, HubSource):
                reasons.append(str(exc))
                continue
            raise
        return ResolvedModel(**{**resolved.__dict__, "prepare_seconds": time.perf_counter() - started})
    raise SourceError(
        f"model '{entry.name}' is not available on this machine: " + "; ".join(reasons)
        + ". Fix: install its pack (make install), point a 'local' or 'gguf' source at a copy, or run where the Hugging Face hub is reachable."
    )


def _resolve_source(entry: ModelEntry, src: Source, cache_dir: Path) -> ResolvedModel:
    if isinstance(src, PackSource):
        parts, _ = pack_parts(src)
        return _from_gguf_parts(entry, parts, src.sha256, src.model_dump(mode="json"), cache_dir)
    if isinstance(src, GgufSource):
        path = src.gguf.expanduser()
        return _from_gguf_parts(entry, [path], src.sha256, src.model_dump(mode="json"), cache_dir)
    if isinstance(src, LocalSource):
        path = src.local.expanduser().resolve()
        return ResolvedModel(entry.name, path, src.model_dump(mode="json"), _folder_weights_sha(path), None)
    return _from_hub(entry, src, cache_dir)


def gguf_file(entry: ModelEntry, cache_dir: Path) -> Path:
    """The model's GGUF file as it is (for engines that run it quantized): a `gguf` source's file,
    a pack's parts assembled once into `<cache>/gguf/<name>-<sha12>.gguf`, or a hub GGUF in the hub
    cache; always checked against the recorded sha256."""
    reasons: list[str] = []
    for src in entry.sources:
        if isinstance(src, GgufSource):
            path = src.gguf.expanduser()
            if path.is_file():
                _check_sha(entry, path, src.sha256, str(path))
                return path
            reasons.append(f"gguf: {path} not found")
        elif isinstance(src, PackSource):
            parts, missing = pack_parts(src)
            if missing:
                reasons.append(f"pack: {', '.join(missing)} not installed ({src.install})")
                continue
            target = cache_dir / "gguf" / f"{entry.name}-{src.sha256[:12]}.gguf"
            if not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(target.name + ".partial")
                _assemble(entry, parts, partial, src.sha256, src.install)
                partial.rename(target)
            return target
        elif isinstance(src, HubSource) and src.gguf_file:
            folder = _hub_cached(src)
            if folder is not None and (folder / src.gguf_file).is_file():
                return folder / src.gguf_file
            reasons.append(f"hub: {src.hub}/{src.gguf_file} not in the local hub cache")
        else:
            reasons.append(f"{src.kind}: not a GGUF build")
    raise SourceError(f"model '{entry.name}': engine llamacpp runs a GGUF file, and none is available here ({'; '.join(reasons)}). "
                      "Fix: give the model a `pack` or `gguf` source (or a hub source with gguf_file), or choose another engine.")


def _assemble(entry: ModelEntry, parts: list[Path], out_path: Path, expected: str | None, how_to_fix: str) -> str:
    """Concatenate GGUF parts into `out_path`, hashing as it copies; the sha256, or SourceError
    (and no file left) when it is not `expected`."""
    log.info("%s: assembling %d part(s) and checking sha256", entry.name, len(parts))
    digest = hashlib.sha256()
    with out_path.open("wb") as out:
        for part in parts:
            with part.open("rb") as fh:
                while block := fh.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    actual = digest.hexdigest()
    if expected is not None and actual != expected:
        out_path.unlink(missing_ok=True)
        raise SourceError(
            f"model '{entry.name}': weights sha256 mismatch: expected {expected}, got {actual} "
            f"(from {', '.join(str(p) for p in parts)}). The pack is corrupted or a different version. "
            f"Fix: reinstall it ({how_to_fix})."
        )
    return actual


def _check_sha(entry: ModelEntry, path: Path, expected: str | None, how_to_fix: str) -> None:
    if expected is None:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise SourceError(f"model '{entry.name}': GGUF sha256 mismatch: expected {expected}, got {actual} ({path}). Fix: reinstall it ({how_to_fix}).")


def load_tokenizer(resolved: ResolvedModel, entry: ModelEntry) -> Any:
    """The tokenizer of a resolved model alone (engines that load the weights themselves)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=entry.trust_remote_code)


def load_skeleton(resolved: ResolvedModel, entry: ModelEntry) -> Any:
    """The model's architecture with no weights (on the meta device): its parameter counts, for
    the useful-FLOP figures of engines that run the weights themselves."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolved.path, trust_remote_code=entry.trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=entry.trust_remote_code)


def _from_gguf_parts(entry: ModelEntry, parts: list[Path], sha256: str | None, source: dict[str, Any], cache_dir: Path) -> ResolvedModel:
    """Assemble (concatenate) GGUF parts, verify the hash, convert once into a safetensors folder."""
    models_dir = cache_dir / "models"
    if sha256 is not None:
        target = models_dir / f"{entry.name}-{sha256[:12]}"
        if (target / MARKER).is_file():
            return ResolvedModel(entry.name, target, source, sha256, None)
    models_dir.mkdir(parents=True, exist_ok=True)
    gguf_dir = cache_dir / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    assembled = gguf_dir / f"{entry.name}.gguf.partial"
    actual = _assemble(entry, parts, assembled, sha256, source.get("install", "reinstall the file"))
    target = models_dir / f"{entry.name}-{actual[:12]}"
    if (target / MARKER).is_file():
        assembled.unlink(missing_ok=True)
        return ResolvedModel(entry.name, target, source, actual, None)
    started = time.perf_counter()
    try:
        _convert_gguf(assembled, target, entry, {"source": source, "gguf_sha256": actual})
    finally:
        assembled.unlink(missing_ok=True)
    log.info("%s: converted to %s in %.1f s", entry.name, target, time.perf_counter() - started)
    return ResolvedModel(entry.name, target, source, actual, None, converted_now=True)


def _convert_gguf(gguf: Path, target: Path, entry: ModelEntry, meta: dict[str, Any]) -> None:
    """Dequantize a GGUF file through transformers and save it as an fp32 safetensors folder."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("%s: dequantizing GGUF (one time, 20-60 s)", entry.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many kinds here; all mean "this GGUF won't load"
        raise SourceError(f"model '{entry.name}': transformers could not load the GGUF file: {exc}. Fix: check that the `gguf` package is installed and the file is a supported architecture.") from exc
    # A dequantized model saves as plain weights only without the GGUF quantizer attached.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    meta = {**meta, "transformers": transformers.__version__, "torch": torch.__version__, "dtype": "float32"}
    (tmp / MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _hub_cached(src: HubSource) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        allow = [src.gguf_file] if src.gguf_file else None
        return Path(snapshot_download(src.hub, revision=src.revision, local_files_only=True, allow_patterns=allow))
    except Exception:  # not in the cache, in any of the ways huggingface_hub says so
        return None


def _from_hub(entry: ModelEntry, src: HubSource, cache_dir: Path) -> ResolvedModel:
    from huggingface_hub import snapshot_download

    allow = [src.gguf_file] if src.gguf_file else ["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.jinja", "*.tiktoken"]
    try:
        folder = Path(snapshot_download(src.hub, revision=src.revision, allow_patterns=allow, local_files_only=hub_offline()))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"hub {src.hub}@{src.revision} unreachable or not cached ({type(exc).__name__}: {first})") from exc
    commit = folder.name
    if src.gguf_file:
        resolved = _from_gguf_parts(entry, [folder / src.gguf_file], None, src.model_dump(mode="json"), cache_dir)
        return ResolvedModel(**{**resolved.__dict__, "revision": commit})
    return ResolvedModel(entry.name, folder, src.model_dump(mode="json"), _folder_weights_sha(folder), commit)


def _folder_weights_sha(folder: Path) -> str | None:
    """A sha256 over the folder's weight files (name and content), in name order."""
    files = sorted(p for p in folder.iterdir() if p.suffix in {".safetensors", ".bin"} and p.is_file()) if folder.is_dir() else []
    if not files:
        return None
    marker = folder / MARKER
    if marker.is_file():
        recorded = json.loads(marker.read_text()).get("gguf_sha256")
        if recorded:
            return recorded
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise SourceError(f"device '{requested}' requested but torch sees no CUDA GPU (torch {torch.__version__}). Fix: set inference.device: cpu, or install a CUDA build of torch.")
    return requested


def pick_dtype(requested: str, device: str) -> str:
    """fp32 on CPU (bf16 is several times slower without native support); bf16 on CUDA."""
    if requested != "auto":
        return requested
    return "bfloat16" if device.startswith("cuda") else "float32"


def load_model(resolved: ResolvedModel, entry: ModelEntry, dtype: str, device: str, device_map: str | None = None) -> tuple[Any, Any]:
    """Load model and tokenizer from the resolved folder; eval mode, on `device`.

    With `device_map="auto"` accelerate places the layers over every visible GPU (then CPU)
    while loading, for a model larger than one device; it is not moved afterwards.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    # Attention: transformers' default, SDPA where the architecture supports it (eager otherwise,
    # e.g. Gemma 2's softcapped attention); the engine builds its masks for either.
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": entry.trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=entry.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
    except Exception as exc:
        raise SourceError(f"model '{entry.name}': could not load {resolved.path}: {type(exc).__name__}: {exc}. Fix: delete that folder from the cache to rebuild it, or check the source.") from exc
    if device_map is None:
        model.to(device)
    model.eval()
    return model, tokenizer
