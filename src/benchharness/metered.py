"""An lm-eval model wrapper that counts tokens and times inference, whatever the engine."""

from __future__ import annotations

import time
from typing import Any

from lm_eval.api.model import LM


class MeteredLM(LM):
    """Delegates every request to `inner` and records tokens and seconds per request type.

    Tokens are counted with the model's tokenizer, without special tokens:
    `prompt_tokens` is context plus continuation of every loglikelihood request (what a
    plain engine runs through the model), `scored_tokens` the continuation tokens alone,
    `generated_tokens` the tokens of every generated answer.
    """

    def __init__(self, inner: LM, tokenizer: Any) -> None:
        super().__init__()
        self.inner = inner
        self.tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        self.score_seconds = 0.0
        self.generate_seconds = 0.0
        self.requests = 0
        self.prompt_tokens = 0
        self.scored_tokens = 0
        self.generated_tokens = 0

    # lm-eval reads these to shard and gather work across processes.
    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def world_size(self) -> int:
        return self.inner.world_size

    def set_cache_hook(self, cache_hook: Any) -> None:
        # The request cache must hear from the engine itself, which saves each answer as it goes.
        self.inner.set_cache_hook(cache_hook)

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.inner, "tokenizer_name", "")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.inner.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def _count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        started = time.perf_counter()
        out = self.inner.loglikelihood(requests, disable_tqdm=disable_tqdm)
        self.score_seconds += time.perf_counter() - started
        self.requests += len(requests)
        for req in requests:
            context, continuation = req.args
            scored = self._count(continuation)
            self.scored_tokens += scored
            self.prompt_tokens += self._count(context) + scored
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
        started = time.perf_counter()
        out = self.inner.generate_until(requests, disable_tqdm=disable_tqdm)
        self.generate_seconds += time.perf_counter() - started
        self.requests += len(requests)
        for req, text in zip(requests, out):
            self.prompt_tokens += self._count(req.args[0])
            self.generated_tokens += self._count(text)
        return out
