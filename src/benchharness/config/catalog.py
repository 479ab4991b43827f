"""The model catalog: who made each model, where it comes from, and where its weights are."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from benchharness.errors import ConfigError
from benchharness.config.yamlfile import read_yaml_mapping, validate

Origin = Literal["CN", "US", "EU"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HubSource(_Strict):
    """A model on the Hugging Face hub; needs the hub (or its local cache)."""

    kind: Literal["hub"] = "hub"
    hub: str = Field(description="hub repository id, e.g. Qwen/Qwen2.5-0.5B-Instruct")
    revision: str = "main"
    gguf_file: str | None = Field(default=None, description="a GGUF file inside the repository, if the weights are GGUF")


class LocalSource(_Strict):
    """A transformers folder (config.json, weights, tokenizer) on this machine."""

    kind: Literal["local"] = "local"
    local: Path


class GgufSource(_Strict):
    """A single GGUF file on this machine; dequantized and converted once into the cache."""

    kind: Literal["gguf"] = "gguf"
    gguf: Path
    sha256: str | None = None


class PackSource(_Strict):
    """A GGUF file shipped inside installed Python packages, possibly split into parts."""

    kind: Literal["pack"] = "pack"
    pack: list[str] = Field(description="part files as <package>/<path inside it>, concatenated in this order")
    sha256: str
    install: str = Field(description="the command that installs the packages, shown when they are missing")

    @field_validator("pack")
    @classmethod
    def _non_empty(cls, parts: list[str]) -> list[str]:
        if not parts or any("/" not in p for p in parts):
            raise ValueError("list each part as <package>/<path inside it>")
        return parts

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("must be 64 lowercase hex digits")
        return value


Source = Annotated[Union[HubSource, LocalSource, GgufSource, PackSource], Field(discriminator="kind")]


class PublishedScore(_Strict):
    """A score the model's makers (or a paper) published, with the protocol it was measured under
    and where it was read. Compared with the harness's own in the report ("against published");
    never part of a run's results or its config hash."""

    suite: str = Field(min_length=1, description="the harness suite it corresponds to (mmlu, cmmlu, gsm8k, humaneval, ...)")
    value: float = Field(ge=0, le=100, description="as published, in percent")
    metric: str = Field(min_length=1, description="acc, exact_match, pass@1, ...")
    shots: int | None = Field(ge=0, description="few-shot examples; null where the source does not say")
    chat_template: bool | None = Field(description="measured through the chat template; null where the source does not say")
    prompt: str = Field(min_length=1, description="the protocol as the source describes it, e.g. '5-shot', '4-shot CoT'")
    variant: str = Field(min_length=1, description="the exact model the number is for, e.g. 'Qwen2.5-0.5B (base)'")
    source: str = Field(min_length=1, description="URL of the model card, README or paper")
    table: str = Field(min_length=1, description="where in the source (table, section)")
    quote: str = Field(min_length=1, description="the row or sentence of the source that holds the number")


class ModelEntry(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    origin: Origin
    organisation: str
    family: str
    params: str = Field(description="parameter count as published, e.g. '0.5B'")
    license: str
    build: str = Field(default="full precision", description="quantization / variant actually evaluated")
    instruct: bool = False
    reasoning: bool = Field(default=False, description="writes a reasoning block (<think>...</think>) before its answer")
    trust_remote_code: bool = False
    sources: list[Source] = Field(min_length=1)
    published: list[PublishedScore] = Field(default_factory=list, description="scores its makers published, with protocol and source")


class Catalog(_Strict):
    path: Path
    models: dict[str, ModelEntry]

    def get(self, name: str) -> ModelEntry:
        if name not in self.models:
            close = [n for n in self.models if name.lower() in n.lower() or n.lower() in name.lower()]
            hint = f" Did you mean: {', '.join(close[:5])}?" if close else " Run `benchharness models` to list them."
            raise ConfigError(f"unknown model '{name}': not in the catalog {self.path}.{hint}")
        return self.models[name]


def normalise_sources(raw: dict) -> dict:
    """Add the 'kind' discriminator to sources written as {hub: ...}, {local: ...}, {gguf: ...}, {pack: ...}."""
    if not isinstance(raw, dict) or not isinstance(raw.get("sources"), list):
        return raw
    sources = []
    for src in raw["sources"]:
        if isinstance(src, dict) and "kind" not in src:
            kinds = [k for k in ("hub", "local", "gguf", "pack") if k in src]
            if len(kinds) == 1:
                src = {**src, "kind": kinds[0]}
        sources.append(src)
    return {**raw, "sources": sources}


class _CatalogFile(_Strict):
    models: list[ModelEntry] = Field(min_length=1)


def load_catalog(path: Path) -> Catalog:
    data = read_yaml_mapping(path, "model catalog")
    raw_models = data.get("models")
    if isinstance(raw_models, list):
        data = {**data, "models": [normalise_sources(m) for m in raw_models]}
    parsed = validate(path, data, _CatalogFile)
    models: dict[str, ModelEntry] = {}
    for i, entry in enumerate(parsed.models):
        if entry.name in models:
            raise ConfigError(f"{path}: models[{i}].name: '{entry.name}' appears twice. Fix: give each entry a unique name.")
        models[entry.name] = resolve_local_paths(entry, path.parent)
    return Catalog(path=path, models=models)


def resolve_local_paths(entry: ModelEntry, base: Path) -> ModelEntry:
    """Relative local and GGUF paths are taken from the folder of the file that names them."""
    sources: list[Source] = []
    for src in entry.sources:
        if isinstance(src, LocalSource) and not src.local.expanduser().is_absolute():
            src = src.model_copy(update={"local": (base / src.local).resolve()})
        elif isinstance(src, GgufSource) and not src.gguf.expanduser().is_absolute():
            src = src.model_copy(update={"gguf": (base / src.gguf).resolve()})
        sources.append(src)
    return entry.model_copy(update={"sources": sources})
