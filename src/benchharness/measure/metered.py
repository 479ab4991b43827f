"""An lm-eval model wrapper that counts tokens and times inference, whatever the engine."""

from __future__ import annotations

import itertools
import time
from typing import Any, Protocol

import torch
from lm_eval.api.model import LM

from benchharness.engine.batching import distinct_prefix_tokens


class ProcessGroup(Protocol):
    """What the metered model needs of a data-parallel run's process group (`run.distributed.DistContext`
    is one): defined here so that measurement does not import the stage that runs it."""

    rank: int
    world_size: int
    device: str

    def all_gather_tensor(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def barrier(self) -> None: ...

    def gather(self, obj: Any) -> list[Any] | None: ...


class MeteredLM(LM):
    """Delegates every request to `inner` and records tokens and seconds per request type.

    Tokens are counted with the model's tokenizer, without special tokens:
    `prompt_tokens` is what the requests minimally need through the model: each distinct
    token prefix of their context + continuation once (so a context, or few-shot examples,
    shared by many requests count once, and engines that repeat them are not credited for
    the repeats), `scored_tokens` the continuation tokens alone, `generated_tokens` the
    tokens of every generated answer and `generate_prompt_tokens` the prompts they were
    generated from, each distinct prompt prefix once.

    With `dist` (a data-parallel run) it tells lm-eval this process's rank and the world size,
    and does lm-eval's collectives over torch.distributed: lm-eval then gives the inner
    engine only this rank's shard of each task and gathers the samples on rank 0.
    """

    def __init__(self, inner: LM, tokenizer: Any, dist: ProcessGroup | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.tokenizer = tokenizer
        self.dist = dist
        self.reset()

    def reset(self) -> None:
        self.score_seconds = 0.0
        self.generate_seconds = 0.0
        self.requests = 0
        self.prompt_tokens = 0
        self.scored_tokens = 0
        self.generated_tokens = 0
        self.generate_prompt_tokens = 0
        # From the engine's own counters, where the model has them (lm-eval's hf has not).
        self.decode_steps = 0
        self.decode_kv_slot_reads = 0
        self.decode_seconds = 0.0

    def counters(self) -> dict[str, float]:
        return {
            "score_seconds": self.score_seconds, "generate_seconds": self.generate_seconds, "requests": self.requests,
            "prompt_tokens": self.prompt_tokens, "scored_tokens": self.scored_tokens, "generated_tokens": self.generated_tokens,
            "generate_prompt_tokens": self.generate_prompt_tokens, "decode_steps": self.decode_steps,
            "decode_kv_slot_reads": self.decode_kv_slot_reads, "decode_seconds": self.decode_seconds,
        }

    # lm-eval reads these to shard and gather work across processes.
    @property
    def rank(self) -> int:
        return self.dist.rank if self.dist else self.inner.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size if self.dist else self.inner.world_size

    @property
    def device(self) -> Any:
        # lm-eval builds the tensor it all-gathers on this device (a CUDA one for nccl).
        return self.dist.device if self.dist else getattr(self.inner, "device", "cpu")

    def all_gather(self, tensor: Any) -> Any:
        return self.dist.all_gather_tensor(tensor) if self.dist else self.inner.all_gather(tensor)

    def barrier(self) -> None:
        if self.dist:
            self.dist.barrier()
        else:
            self.inner.barrier()

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """lm-eval's gather of per-rank samples and metrics, returned as ONE merged object in
        document order, so rank 0 sees exactly what a single process would have produced.

        lm-eval chains the gathered per-rank lists in rank order, but rank r holds documents
        r, r+W, r+2W, ... (`islice(docs, rank, limit, world_size)`): chained, the order and the
        float sums of non-binary metrics would differ from a single-process run.
        """
        if not self.dist:
            return self.inner.gather_object(obj, dst=dst)
        if dst != 0:
            raise ValueError("benchharness gathers on rank 0 only")
        parts = self.dist.gather(obj)
        return None if parts is None else [merge_in_doc_order(parts)]

    def set_cache_hook(self, cache_hook: Any) -> None:
        # The request cache must hear from the engine itself, which saves each answer as it goes.
        self.inner.set_cache_hook(cache_hook)

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.inner, "tokenizer_name", "")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.inner.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def _tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _count(self, text: str) -> int:
        return len(self._tokens(text))

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        started = time.perf_counter()
        out = self.inner.loglikelihood(requests, disable_tqdm=disable_tqdm)
        self.score_seconds += time.perf_counter() - started
        self.requests += len(requests)
        sequences: list[list[int]] = []
        for req in requests:
            context, continuation = req.args
            continuation_tokens = self._tokens(continuation)
            self.scored_tokens += len(continuation_tokens)
            sequences.append(self._tokens(context) + continuation_tokens)
        self.prompt_tokens += distinct_prefix_tokens(sequences)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        started = time.perf_counter()
        out = self.inner.loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        self.score_seconds += time.perf_counter() - started
        self.requests += len(requests)
        for req in requests:
            n = self._count(req.args[0])
            self.prompt_tokens += n
            self.scored_tokens += n
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        stats = getattr(self.inner, "stats", None)
        before = (stats.decode_steps, stats.kv_slot_reads, stats.decode_seconds) if hasattr(stats, "kv_slot_reads") else None
        started = time.perf_counter()
        out = self.inner.generate_until(requests, disable_tqdm=disable_tqdm)
        self.generate_seconds += time.perf_counter() - started
        if before is not None:
            self.decode_steps += stats.decode_steps - before[0]
            self.decode_kv_slot_reads += stats.kv_slot_reads - before[1]
            self.decode_seconds += stats.decode_seconds - before[2]
        self.requests += len(requests)
        self.generate_prompt_tokens += distinct_prefix_tokens(self._tokens(req.args[0]) for req in requests)
        for text in out:
            self.generated_tokens += self._count(text)
        return out


def _interleave(lists: list[list[Any]]) -> list[Any]:
    """Rank lists back into document order: item i of rank r is document i * W + r."""
    n, world = sum(len(part) for part in lists), len(lists)
    if any(len(part) != len(range(r, n, world)) for r, part in enumerate(lists)):
        return list(itertools.chain.from_iterable(lists))  # not a plain doc-sharded list; keep lm-eval's order
    return [lists[i % world][i // world] for i in range(n)]


def _merge_samples(lists: list[list[Any]]) -> list[Any]:
    """Logged samples come per filter, then per document; restore (filter, doc_id) order."""
    chained = list(itertools.chain.from_iterable(lists))
    if not all(isinstance(s, dict) and "doc_id" in s for s in chained):
        return _interleave(lists)
    filters = list(dict.fromkeys(s.get("filter") for part in lists for s in part))
    return sorted(chained, key=lambda s: (filters.index(s.get("filter")), s["doc_id"]))


def merge_in_doc_order(parts: list[Any]) -> Any:
    """Merge what lm-eval gathers from each rank: {task: [samples]} or {task: {(metric, filter): [values]}}."""
    first = parts[0]
    if not isinstance(first, dict):
        return list(itertools.chain.from_iterable(parts))
    merged: dict[Any, Any] = {}
    for task in first:
        values = [part.get(task, [] if isinstance(first[task], list) else {}) for part in parts]
        if isinstance(first[task], list):
            merged[task] = _merge_samples(values)
        else:
            keys = list(dict.fromkeys(k for v in values for k in v))
            merged[task] = {k: _interleave([list(v.get(k, [])) for v in values]) for k in keys}
    return merged
