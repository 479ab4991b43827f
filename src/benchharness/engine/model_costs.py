"""What a model costs per token: its matmul parameters (FLOPs) and the bytes its weights occupy and a decode step reads.

- Model FLOPs per token = 2 x (matmul parameters of the body + the output layer). "Matmul
  parameters" are all parameters with two or more dimensions except the input embedding table
  (a lookup, not a matmul); the output layer counts even when tied to the embedding. Norm
  weights and biases (1-D) are left out, and so are the attention score/value products (which
  grow with context): the figure is a lower bound, the usual "6N/2N" convention. For a
  mixture-of-experts model every expert is counted, not only the active ones.
- Decode bound: one step reads every weight once (`decode_read_bytes`) and yields `batch`
  tokens, so the bound is batch x bandwidth / bytes; KV-cache reads are not in the bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MatmulParams:
    """Parameters that take part in matmuls: the body and the output layer (see the module docstring)."""

    body: int
    head: int

    @property
    def flops_per_token(self) -> float:
        return 2.0 * (self.body + self.head)

    def generation_flops(self, prompt_tokens: int, generated_tokens: int) -> float:
        """Useful FLOPs of generation: each prompt token once through the body, each generated
        token through the body and the output layer."""
        return 2.0 * (self.body * prompt_tokens + (self.body + self.head) * generated_tokens)


def _unique_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    # parameters() already deduplicates tied tensors by identity.
    return list(model.parameters())


def _input_embedding_ids(model: torch.nn.Module) -> set[int]:
    ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter) and getter() is not None:
        ids.add(id(getter().weight))
    return ids


def _output_weight(model: torch.nn.Module) -> torch.Tensor | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return None if head is None else head.weight


def matmul_params(model: torch.nn.Module) -> MatmulParams:
    """Count the body's matmul parameters and the output layer's (tied or not)."""
    embedding_ids = _input_embedding_ids(model)
    head = _output_weight(model)
    head_id = None if head is None else id(head)
    body = sum(
        p.numel() for p in _unique_parameters(model) if p.dim() >= 2 and id(p) not in embedding_ids and id(p) != head_id
    )
    return MatmulParams(body=body, head=0 if head is None else head.numel())


def model_flops_per_token(model: torch.nn.Module) -> float:
    """2 x (body matmul parameters + output layer parameters): forward FLOPs per token with logits."""
    return matmul_params(model).flops_per_token


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all (unique) parameters: what the weights occupy in memory."""
    return sum(p.numel() * p.element_size() for p in _unique_parameters(model))


def decode_read_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step must read: every weight except an untied input embedding table (a row lookup)."""
    head = _output_weight(model)
    skip = _input_embedding_ids(model) - ({id(head)} if head is not None else set())
    return sum(p.numel() * p.element_size() for p in _unique_parameters(model) if id(p) not in skip)
