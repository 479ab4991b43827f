"""The model split in two: the body (embeddings + decoder layers + final norm) and
the output layer, so the engine can run the output layer on the scored rows only.

The split is checked once against the model's own forward on a short probe: if an
architecture post-processes its logits in a way this module does not reproduce,
the engine refuses it with a clear message instead of returning wrong scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from benchharness.engine import cascade
from benchharness.engine.cpu_kernels import CpuKernels, plan_cpu_kernels


class UnsupportedModelError(ValueError):
    """The model cannot be run by the benchharness engine; use `engine: hf` for it."""


@dataclass(frozen=True)
class SplitModel:
    """A causal LM as body + output layer, with the logits post-processing it needs."""

    model: torch.nn.Module
    body: torch.nn.Module
    output_layer: torch.nn.Module
    final_logit_softcapping: float | None
    kernels: CpuKernels  # forwards swapped in during the engine's calls (cpu_kernels.py)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def config(self):  # transformers.PretrainedConfig; untyped to avoid importing it here
        return self.model.config

    @property
    def text_config(self):
        """The decoder's own config: for a composite model (Gemma 3 at 4B and up, which loads as
        an image-text model) its text part, where the layer types and window are; as
        transformers' own caches read it."""
        return self.model.config.get_text_config()

    @property
    def layer_kinds(self) -> frozenset[str]:
        return layer_kinds(self.text_config)

    @property
    def sliding_window(self) -> int | None:
        return sliding_window(self.text_config)

    @property
    def per_layer_masks(self) -> bool:
        """Whether the decoder takes one mask per layer type (a dict) rather than one mask for all layers."""
        return bool(getattr(self.text_config, "layer_types", None))

    def forward_body(self, skip_padding: bool = False, shared_prefixes: cascade.SharedPrefixes | None = None, **kwargs: Any) -> Any:
        """The body's forward (its transformers output), with the engine's CPU kernels swapped in;
        `skip_padding`: rows attend in groups that skip their left padding where `skips_padding`;
        `shared_prefixes`: rows also attend to their prefixes held once (cascade.py), and every
        layer must have taken them."""
        if shared_prefixes is not None:
            kwargs[cascade.KWARG] = shared_prefixes
        with self.kernels.applied(skip_padding):
            out = self.body(**kwargs)
        if shared_prefixes is not None:
            shared_prefixes.check_taken()
        return out

    @property
    def skips_padding(self) -> bool:
        """Whether `forward_body(skip_padding=True)` attends in row groups: the engine's CPU attention
        is on and the model runs SDPA attention (attention.row_grouped_sdpa)."""
        return self.kernels.attention and getattr(self.config, "_attn_implementation", None) == "sdpa"

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits for hidden states of any leading shape, as the model's forward computes them."""
        return self.logits_slice(hidden, 0, int(self.output_layer.weight.shape[0]))

    def logits_slice(self, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Logits of vocabulary entries [start, stop) only, as `logits` computes them."""
        full = self.output_layer.weight
        # The whole weight itself (not a slice of it), so the kernels find its packed copy.
        weight = full if (start, stop) == (0, int(full.shape[0])) else full[start:stop]
        bias = self.output_layer.bias
        # Called on the weight directly, this skips the module's hooks: with `device_map`
        # the output layer may sit on another device than the body's last hidden states.
        logits = self.kernels.linear(hidden.to(weight.device), weight, None if bias is None else bias[start:stop])
        return self._softcap(logits)

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        if self.final_logit_softcapping is None:
            return logits
        # Gemma 2/3 style: logits = cap * tanh(logits / cap), exactly as in their forward. In place:
        # the same operations in the same order, without two more vocabulary-wide tensors (64 rows x
        # Gemma 3's 262k entries: 67 MB each, at every decode step). `logits` is the linear's own output.
        cap = self.final_logit_softcapping
        return logits.div_(cap).tanh_().mul_(cap)

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Log-softmax over the vocabulary, computed in fp32 whatever the model's dtype."""
        return torch.log_softmax(self.logits(hidden).float(), dim=-1)


def layer_kinds(text_config: Any) -> frozenset[str]:
    """Attention kinds of a decoder's layers, as its own masks apply them: per-layer `layer_types`
    where the config has them (Gemma 2/3, Qwen2/3, Ministral), else every layer sliding where the
    config sets a window (Mistral, Phi-3), else full attention. `text_config`: the decoder's config
    (`config.get_text_config()`; a composite config's top level has neither field)."""
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types:
        return frozenset(layer_types)
    if getattr(text_config, "sliding_window", None) is not None:
        return frozenset({"sliding_attention"})
    return frozenset({"full_attention"})


def sliding_window(text_config: Any) -> int | None:
    """The window of the decoder's sliding layers, if any layer slides."""
    if "sliding_attention" not in layer_kinds(text_config):
        return None
    return int(text_config.sliding_window)


def split_model(model: torch.nn.Module, check: bool = True, cpu_kernels: bool = True, small_rows: bool = True) -> SplitModel:
    """Split a transformers causal LM, and (by default) check the split, run with the CPU kernels
    (`cpu_kernels.py`, where they apply; `small_rows`: with the small-row kernel), reproduces its logits."""
    body = getattr(model, "base_model", None)
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or body is model or output_layer is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no separate body and output layer (lm_head); "
            "the benchharness engine supports decoder-only causal LMs. Use `engine: hf` for this model."
        )
    softcap = getattr(model.config, "final_logit_softcapping", None)
    split = SplitModel(
        model=model,
        body=body,
        output_layer=output_layer,
        final_logit_softcapping=float(softcap) if softcap else None,
        kernels=plan_cpu_kernels(model, enabled=cpu_kernels, small_rows=small_rows),
    )
    if check:
        _check_split(split)
    return split


@torch.no_grad()
def _check_split(split: SplitModel) -> None:
    """Compare body+output layer with the model's forward on a short fixed input."""
    vocab = int(split.output_layer.weight.shape[0])
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(0, vocab, (1, 8), generator=generator).to(split.device)
    reference = split.model(input_ids=probe).logits.float()
    hidden = split.forward_body(input_ids=probe).last_hidden_state
    ours = split.logits(hidden).float()
    if reference.shape != ours.shape:
        raise UnsupportedModelError(
            f"{type(split.model).__name__}: logits shape {tuple(reference.shape)} from the model, "
            f"{tuple(ours.shape)} from body + output layer. Use `engine: hf` for this model."
        )
    # Tolerance relative to the logits' scale: fp32 agrees to ~1e-5, bf16 to ~1e-2 of the scale.
    scale = float(reference.abs().max().clamp_min(1.0))
    tolerance = 1e-4 if split.dtype == torch.float32 else 3e-2
    diff = float((reference - ours).abs().max())
    if diff > tolerance * scale:
        raise UnsupportedModelError(
            f"{type(split.model).__name__}: body + output layer differ from the model's logits by {diff:.3g} "
            "(the architecture post-processes logits in a way the engine does not reproduce). "
            "Use `engine: hf` for this model."
        )
