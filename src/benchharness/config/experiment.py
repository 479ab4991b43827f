"""The experiment schema: load a YAML file, validate it into typed specs, apply overrides, hash it."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from benchharness.config.catalog import Catalog, ModelEntry, load_catalog, normalise_sources, resolve_local_paths
from benchharness.errors import ConfigError
from benchharness.config.speed_spec import ProbeSpec
from benchharness.config.yamlfile import read_yaml_mapping, validate


# benchharness: the harness's engine; hf: lm-eval's HFLM (the reference); llamacpp: the GGUF file
# as it is through llama.cpp; vllm / sglang: lm-eval's classes for those GPU engines.
Engine = Literal["benchharness", "hf", "llamacpp", "vllm", "sglang"]
# Engines that run the weights themselves: the harness loads only the tokenizer and config.
EXTERNAL_ENGINES = ("llamacpp", "vllm", "sglang")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SuiteSpec(_Strict):
    name: str
    limit: int | None = Field(default=None, gt=0, description="items per task; a stratified, deterministic subset")
    num_fewshot: int | None = Field(default=None, ge=0)
    max_gen_toks: int | None = Field(default=None, gt=0, description="tokens a generation task may write, every model (null: the task's own)")
    reasoning_max_gen_toks: int | None = Field(default=None, gt=0, description="the same for reasoning models while they think (null: reasoning.max_gen_toks)")


class InferenceSpec(_Strict):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    batch_size: int | Literal["auto"] = "auto"
    max_batch_tokens: int | None = Field(default=None, gt=0)
    # "auto": transformers/accelerate spread a model too large for one GPU over every visible GPU (and CPU).
    device_map: Literal["auto"] | None = None

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in {"auto", "cpu", "cuda", "mps"} and not value.startswith("cuda:"):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value <= 0:
            raise ValueError("must be a positive integer or 'auto'")
        return value


class LlamaCppSpec(_Strict):
    """`engine: llamacpp`: how llama.cpp runs the GGUF file."""

    n_ctx: int = Field(default=2048, gt=0, description="context length; llama.cpp keeps n_ctx x vocabulary logits")
    n_threads: int | None = Field(default=None, gt=0, description="threads; null: every core this process may use")
    n_batch: int = Field(default=512, gt=0, description="tokens per llama.cpp decode call")


class GpuEngineSpec(_Strict):
    """`engine: vllm` or `engine: sglang` (through lm-eval's model classes): how they spread a model over GPUs."""

    tensor_parallel_size: int = Field(default=1, gt=0)
    data_parallel_size: int = Field(default=1, gt=0)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1, description="share of each GPU's memory the engine may take")
    max_model_len: int | None = Field(default=None, gt=0, description="context length; null: the model's own")


class ReasoningSpec(_Strict):
    """Reasoning models (catalog `reasoning: true`): their thinking switch, the markers of their
    reasoning blocks, and how much room their generations get."""

    thinking: bool | None = Field(default=None, description="passed to chat templates that have the switch (Qwen3's enable_thinking); null: the template's default")
    start: str = Field(default="<think>", min_length=1, description="the marker that opens a reasoning block")
    end: str = Field(default="</think>", min_length=1, description="the marker that closes it; the scorer sees only what follows")
    max_gen_toks: int = Field(default=4096, gt=0, description="tokens a reasoning model may write on a generation task while thinking is on")


class ParitySpec(_Strict):
    """The parity certificate: per model, task and request type, this many requests (whole
    documents) re-answered by lm-eval's `hf` model and compared with the engine's; 0 turns it off."""

    requests: int = Field(default=16, ge=0)


class ExperimentFile(_Strict):
    """What an experiment YAML may contain. Paths are relative to the file's folder."""

    name: str
    description: str = ""
    catalog: Path = Path("../models.yaml")
    tasks_dir: Path = Path("../tasks")
    include_paths: list[Path] = Field(default_factory=list, description="more folders of lm-eval task YAMLs")
    data_sources: dict[str, Path] = Field(default_factory=dict, description="suite or data name -> local folder of its raw data")
    chat_template: bool = Field(default=False, description="evaluate instruction-tuned models through their chat template")
    log_prompts: bool = Field(default=True, description="keep each item's prompt text in samples/*.jsonl (false for private data)")
    models: list[str | dict[str, Any]] = Field(min_length=1)
    suites: list[str | SuiteSpec] = Field(min_length=1)
    engine: Engine = "benchharness"
    inference: InferenceSpec = InferenceSpec()
    llamacpp: LlamaCppSpec = Field(default_factory=LlamaCppSpec, description="engine: llamacpp settings")
    gpu_engine: GpuEngineSpec = Field(default_factory=GpuEngineSpec, description="engine: vllm / sglang settings")
    seed: int = 1234
    output_dir: Path = Path("results")
    speed: ProbeSpec | None = Field(default_factory=ProbeSpec, description="the fixed-shape speed probe; null turns it off")
    parallel: Literal["data", "models"] = Field(
        default="data", description="with several processes: shard every task's items over them (data), or give each process whole models (models)"
    )
    parity: ParitySpec = Field(default_factory=ParitySpec, description="the run's parity certificate (engine: benchharness)")
    reasoning: ReasoningSpec = Field(default_factory=ReasoningSpec, description="reasoning models: thinking switch, markers, generation room")


class Experiment(_Strict):
    """A validated experiment with models resolved from the catalog: everything a run needs."""

    name: str
    description: str
    source_file: Path
    catalog: Path
    tasks_dir: Path
    include_paths: list[Path]
    data_sources: dict[str, Path]
    chat_template: bool
    models: list[ModelEntry]
    log_prompts: bool = True
    suites: list[SuiteSpec]
    engine: Engine
    inference: InferenceSpec
    llamacpp: LlamaCppSpec = LlamaCppSpec()
    gpu_engine: GpuEngineSpec = GpuEngineSpec()
    seed: int
    output_dir: Path
    speed: ProbeSpec | None
    parallel: Literal["data", "models"] = "data"
    parity: ParitySpec = ParitySpec()
    reasoning: ReasoningSpec = ReasoningSpec()

    def resolved(self) -> dict[str, Any]:
        """The content that decides results (paths of this machine left out), for hashing and the manifest.

        `parallel` only says how processes share the work (results are the same), and `parity` how
        many of the engine's answers are re-checked (the scores are the same), and `log_prompts` only
        whether prompt text is kept beside the hashes, so these are left out;
        `inference.device_map` only when unset, so configs written before it keep their hash; an
        engine's own section (`llamacpp`, `gpu_engine`) only when that engine runs.
        """
        data = self.model_dump(mode="json", exclude={"source_file", "catalog", "tasks_dir", "include_paths", "data_sources", "output_dir", "description", "parallel", "parity", "log_prompts"})
        if data["inference"].get("device_map") is None:
            data["inference"].pop("device_map", None)
        # Keys added since the first configs count only where they are set, so older configs keep
        # their hash; published scores are read beside the results and never decide them.
        for suite in data["suites"]:
            for key in ("max_gen_toks", "reasoning_max_gen_toks"):
                if suite.get(key) is None:
                    suite.pop(key, None)
        for model in data["models"]:
            model.pop("published", None)
            if not model.get("reasoning"):
                model.pop("reasoning", None)
        if not any(m.reasoning for m in self.models):
            data.pop("reasoning")
        if self.engine != "llamacpp":
            data.pop("llamacpp")
        if self.engine not in ("vllm", "sglang"):
            data.pop("gpu_engine")
        return data

    def config_hash(self) -> str:
        blob = json.dumps(self.resolved(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:8]


class Overrides(_Strict):
    """Command-line overrides of the common keys; None leaves the file's value."""

    limit: int | None = Field(default=None, gt=0)
    models: list[str] | None = None
    suites: list[str] | None = None
    device: str | None = None
    output: Path | None = None
    engine: Engine | None = None
    batch_size: int | Literal["auto"] | None = None
    # `--set key.path=value`: any key of the experiment file, applied to the file's content before
    # it is validated (so a value is checked like one written in the file, and changes the hash).
    set: list[str] = Field(default_factory=list)


def apply_sets(path: Path, raw: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """A copy of the experiment file's mapping with each `key.path=value` applied in order.

    The value is read as YAML (`5`, `true`, `null`, `[a, b]`, `{name: mmlu, limit: 5}`); a
    numeric part of the key path indexes a list (`suites.0.limit=5`); a missing mapping key is created.
    """
    data = copy.deepcopy(raw)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"command line: --set {assignment!r}: expected key.path=value. Fix: e.g. --set inference.batch_size=8 or --set suites.0.limit=5.")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"command line: --set {assignment!r}: the value is not valid YAML ({exc.__class__.__name__}). Fix: quote it, e.g. --set 'name=\"my run\"'.") from exc
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"{path}: --set {key}: '{'.'.join(parts[:depth]) or '(top level)'}' is a list of {len(node)}; '{part}' is not an index in it. Fix: use 0 to {len(node) - 1}, or set the whole list.")
                index = int(part)
                if last:
                    node[index] = value
                else:
                    node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(f"{path}: --set {key}: '{'.'.join(parts[:depth])}' is {node!r}, not a mapping or list, so it has no key '{part}'. "
                                  f"Fix: set '{'.'.join(parts[:depth])}' as a whole (a YAML mapping) instead.")
    return data


def load_experiment(path: Path, overrides: Overrides | None = None) -> Experiment:
    path = Path(path)
    raw = read_yaml_mapping(path, "experiment config")
    if overrides is not None and overrides.set:
        raw = apply_sets(path, raw, overrides.set)
        spec = validate(Path(f"{path} (with --set {' '.join(overrides.set)})"), raw, ExperimentFile)
    else:
        spec = validate(path, raw, ExperimentFile)
    base = path.parent
    catalog_path = _relative_to(base, spec.catalog)
    tasks_dir = _relative_to(base, spec.tasks_dir)
    if not tasks_dir.is_dir():
        raise ConfigError(f"{path}: tasks_dir: folder {tasks_dir} not found. Fix: point tasks_dir at the folder of task YAMLs (default ../tasks).")
    include_paths = [_relative_to(base, p) for p in spec.include_paths]
    for i, folder in enumerate(include_paths):
        if not folder.is_dir():
            raise ConfigError(f"{path}: include_paths[{i}]: folder {folder} not found. Fix: name an existing folder of lm-eval task YAMLs.")
    catalog = load_catalog(catalog_path)
    overrides = overrides or Overrides()

    model_items: list[str | dict[str, Any]] = list(overrides.models) if overrides.models else list(spec.models)
    models = [_model_entry(path, i, item, catalog) for i, item in enumerate(model_items)]
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: models: a model is listed twice ({', '.join(sorted({n for n in names if names.count(n) > 1}))}). Fix: list each once.")

    suites = [SuiteSpec(name=s) if isinstance(s, str) else s for s in spec.suites]
    if overrides.suites:
        by_name = {s.name: s for s in suites}
        suites = [by_name.get(name, SuiteSpec(name=name)) for name in overrides.suites]
    if overrides.limit is not None:
        suites = [s.model_copy(update={"limit": overrides.limit}) for s in suites]

    inference = spec.inference
    if overrides.device is not None:
        inference = validate(path, {**inference.model_dump(), "device": overrides.device}, InferenceSpec, prefix="--device ")
    if overrides.batch_size is not None:
        inference = inference.model_copy(update={"batch_size": overrides.batch_size})

    engine = overrides.engine or spec.engine
    if engine == "llamacpp":
        # llama.cpp runs the GGUF file as it is: the build behind every score says so.
        models = [m.model_copy(update={"build": quantized_build(m.build)}) for m in models]

    # The file's paths are relative to the file; a command-line --output to the current folder.
    output_dir = overrides.output if overrides.output is not None else _relative_to(base, spec.output_dir)
    return Experiment(
        name=spec.name,
        description=spec.description,
        source_file=path,
        catalog=catalog_path,
        tasks_dir=tasks_dir,
        include_paths=include_paths,
        data_sources={name: _relative_to(base, folder) for name, folder in spec.data_sources.items()},
        chat_template=spec.chat_template,
        log_prompts=spec.log_prompts,
        models=models,
        suites=suites,
        engine=engine,
        inference=inference,
        seed=spec.seed,
        output_dir=output_dir,
        speed=spec.speed,
        parallel=spec.parallel,
        parity=spec.parity,
        llamacpp=spec.llamacpp,
        gpu_engine=spec.gpu_engine,
        reasoning=spec.reasoning,
    )


def quantized_build(build: str) -> str:
    """A catalog build as llama.cpp runs it: the GGUF's own quantized kernels, not dequantized weights."""
    return build.replace(" dequantized", "").rstrip(", ") + "; run quantized by llama.cpp"


def _model_entry(path: Path, index: int, item: str | dict[str, Any], catalog: Catalog) -> ModelEntry:
    if isinstance(item, str):
        try:
            return catalog.get(item)
        except ConfigError as exc:
            raise ConfigError(f"{path}: models[{index}]: {exc}") from None
    # An inline model: a full catalog entry written in the experiment itself.
    return resolve_local_paths(
        validate(path, normalise_sources(item), ModelEntry, prefix=f"models[{index}]."), path.parent
    )


def _relative_to(base: Path, p: Path) -> Path:
    p = p.expanduser()
    return p if p.is_absolute() else (base / p).resolve()
