"""lm-eval's own `hf` model (HFLM) as the harness uses it: the reference engine (`engine: hf`) and
the parity certificate's second opinion, both built on an already loaded model.

Takes: a loaded model and tokenizer, a batch size (a number or "auto"), a device. Gives: an HFLM
whose scores and generations are lm-eval's own; only how `auto` picks a batch differs on a CPU.

Why: lm-eval's `auto` runs the model at its first guess (64 rows of the longest request, or of the
model's whole context for generation) and halves on an out-of-memory error. A GPU raises that
error; a CPU under Linux's memory overcommit does not: HFLM computes logits for every position of
every row, and 64 MMLU rows of Qwen2.5 (543 tokens x 151,936 vocabulary x 4 bytes) are a 19.7 GiB
tensor that the kernel grants untouched, then fills, then the OOM killer ends the process without
a word (a 24 GiB machine; then 19.7 GiB more for the log-softmax). So on a CPU `auto` is sized
from the memory available instead, for the longest row lm-eval is about to batch, and every
choice is kept (`batch_choices`) for the manifest.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lm_eval.models.huggingface import HFLM

from benchharness.engine.reasoning import LM_EVAL_ARGUMENTS

# Share of the memory available (when the batch is chosen) that one batch may take.
MEMORY_SHARE = 0.5
# fp32 logits of every position, alive together: the model's output, its log-softmax, and a
# softcap's or slice's temporary (Gemma's final softcapping makes one).
_LOGIT_COPIES = 3
_BYTES = 4


def row_bytes(model: Any, tokens: int) -> int:
    """Memory one row of `tokens` tokens needs in HFLM's forward: the logits of every position, plus
    the body's widest activations and one layer's attention scores (eager or math SDPA on a CPU)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    vocab = int(model.get_output_embeddings().weight.shape[0])
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    intermediate = int(getattr(config, "intermediate_size", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    per_token = _LOGIT_COPIES * vocab + 8 * hidden + 3 * intermediate + heads * tokens
    return tokens * per_token * _BYTES


def memory_bounded_batch(model: Any, tokens: int, available: int, most: int) -> dict[str, Any]:
    """Rows of `tokens` tokens that fit in MEMORY_SHARE of `available` bytes (at least 1, at most `most`)."""
    need = row_bytes(model, tokens)
    rows = max(1, min(most, int(available * MEMORY_SHARE) // max(need, 1)))
    return {"tokens": tokens, "batch_size": rows, "row_gib": round(need / 2**30, 3), "available_gib": round(available / 2**30, 1)}


class ReferenceLM(HFLM):
    """HFLM with a memory-bounded `auto` batch on a CPU (lm-eval's own probe elsewhere)."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int | str, device: str, reasoning: dict[str, Any] | None = None) -> None:
        """`reasoning`: lm-eval's own `enable_thinking` and `think_end_token` arguments (runner.reasoning_args)."""
        self.memory_bounded = batch_size == "auto" and not str(device).startswith(("cuda", "mps"))
        self.batch_choices: list[dict[str, Any]] = []
        self._generation_tokens: int | None = None
        hf_reasoning = {k: v for k, v in (reasoning or {}).items() if k in LM_EVAL_ARGUMENTS}
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, **hf_reasoning)

    def batch_info(self) -> dict[str, Any]:
        """How the batch was chosen, for the manifest (`models.<name>.batch`)."""
        if not self.memory_bounded:
            if self.batch_size == "auto":
                return {"engine": "hf", "batch_size": "auto", "budget_method": "lm-eval-auto", "detected": sorted(set(self.batch_sizes.values()))}
            return {"engine": "hf", "batch_size": self.batch_size, "budget_method": "configured"}
        return {"engine": "hf", "batch_size": "auto", "budget_method": "memory-bounded", "memory_share": MEMORY_SHARE,
                "choices": list(self.batch_choices)}

    def _detect_batch_size(self, requests: Any = None, pos: int = 0) -> int:
        if not self.memory_bounded:
            return super()._detect_batch_size(requests, pos)
        import psutil

        if requests:
            # The row lm-eval batches next (its requests are sorted longest first), truncated as it will be.
            _, context_enc, continuation_enc = requests[pos]
            tokens = len((context_enc + continuation_enc)[-(self.max_length + 1):][:-1])
        else:
            # Generation: the longest prompt plus the tokens to generate; rolling windows: the whole context.
            tokens = self._generation_tokens or self.max_length
        choice = memory_bounded_batch(self.model, tokens, psutil.virtual_memory().available, self.max_batch_size)
        self.batch_choices.append(choice)
        return int(choice["batch_size"])

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        if self.memory_bounded and requests:
            from lm_eval.models.utils import normalize_gen_kwargs

            longest = 0
            for request in requests:
                context, gen_kwargs = request.args
                new = int(normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)["max_gen_toks"])
                longest = max(longest, min(len(self.tok_encode(context)), self.max_length - new) + new)
            self._generation_tokens = longest
        try:
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        finally:
            self._generation_tokens = None


def stop_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Token ids at which an lm-eval hf generation ends: the generation config's EOS ids (where
    transformers.generate stops) and the tokenizer's EOS (whose text lm-eval adds to the stop
    strings). What a recorded hf output is cut after (`recorded_generations`)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured]) | {tokenizer.eos_token_id}
    ids.discard(None)
    return frozenset(ids)


@contextmanager
def recorded_generations(hflm: HFLM, stop_ids: frozenset[int] | set[int]) -> Iterator[dict[tuple[int, ...], list[int]]]:
    """While the block runs, lm-eval hf's new tokens for each prompt it generates from, as its own
    batches produce them: keyed by the prompt's tokens (padding removed), each cut after its first
    id in `stop_ids` (hf pads finished rows until its batch ends). The dict stays after the block."""
    recorded: dict[tuple[int, ...], list[int]] = {}
    generate = hflm._model_generate

    def recording(context: Any, max_length: int, stop: Any, **kwargs: Any) -> Any:
        out = generate(context, max_length, stop, **kwargs)
        for row, row_mask, tokens in zip(context.tolist(), kwargs["attention_mask"].tolist(), out.tolist(), strict=True):
            new = tokens[len(row):]
            ends = [k for k, token in enumerate(new) if token in stop_ids]
            recorded[tuple(t for t, m in zip(row, row_mask, strict=True) if m)] = new[: ends[0] + 1] if ends else new
        return out

    hflm._model_generate = recording  # an instance attribute shadows the class's method
    try:
        yield recorded
    finally:
        del hflm._model_generate
