"""The `speed` section of an experiment: the fixed-shape probe's shapes and repetitions, and its serving scenario."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ProbeShape(BaseModel):
    """One probe shape: `batch` sequences of `prompt_len` tokens, then `new_tokens` generated."""

    model_config = ConfigDict(extra="forbid")

    batch: int = Field(default=4, gt=0)
    prompt_len: int = Field(default=128, gt=0)
    new_tokens: int = Field(default=32, ge=2, description="forced; >= 2 so there is a decode step after the first token")


class ServeSpec(BaseModel):
    """The serving-style scenario of the speed probe: `requests` synthetic prompts of `prompt_len`
    tokens, all arriving at once, each forced to its own output length (`new_tokens`, cycled over
    the requests), decoded by the engine's continuous batching at each `concurrency` (slots)."""

    model_config = ConfigDict(extra="forbid")

    requests: int = Field(default=16, gt=0)
    prompt_len: int = Field(default=64, gt=0)
    new_tokens: list[int] = Field(default_factory=lambda: [4, 8, 16, 32], min_length=1, description="output lengths, cycled")
    concurrency: list[int] = Field(default_factory=lambda: [1, 4, 16], min_length=1, description="slots decoding at once")

    @model_validator(mode="after")
    def _positive(self) -> ServeSpec:
        if min(self.new_tokens) < 2 or min(self.concurrency) < 1:
            raise ValueError("serve.new_tokens must be >= 2 (a decode step after the first token) and serve.concurrency >= 1")
        return self


class ProbeSpec(ProbeShape):
    """The `speed` section of an experiment: the probe's shape(s) and repetitions."""

    serve: ServeSpec | None = Field(
        default_factory=ServeSpec, description="the continuous-batching scenario (engine: benchharness); null turns it off"
    )
    extra_shapes: list[ProbeShape] = Field(default_factory=list, description="more shapes, probed after the main one")
    warmup: int = Field(default=2, ge=0, description="untimed runs before the timed ones")
    min_reps: int = Field(default=5, ge=1, description="timed runs at least")
    min_seconds: float = Field(default=3.0, ge=0, description="timed seconds at least, per phase and shape")
    seed: int = Field(default=0, description="seed of the synthetic prompt token ids")
    limits_min_seconds: float = Field(default=2.0, ge=0, description="seconds per machine-limit measurement")

    @model_validator(mode="after")
    def _distinct(self) -> ProbeSpec:
        shapes = [(s.batch, s.prompt_len, s.new_tokens) for s in self.shapes()]
        if len(set(shapes)) != len(shapes):
            raise ValueError("extra_shapes repeats a shape; list each batch/prompt_len/new_tokens once")
        return self

    def shapes(self) -> list[ProbeShape]:
        main = ProbeShape(batch=self.batch, prompt_len=self.prompt_len, new_tokens=self.new_tokens)
        return [main, *self.extra_shapes]
