"""`engine: llamacpp`: a GGUF file evaluated as it is, quantized, through llama.cpp's Python bindings.

The harness's own engine and `hf` dequantize a GGUF build to fp32; this one runs the file's
quantized kernels, so its scores are what llama.cpp gives for that file. It is an lm-eval model:
- loglikelihood: lm-eval's own context/continuation split (`TemplateLM._encode_pair`) over the
  GGUF's tokenizer; requests that share a context are scored after one evaluation of it (its
  keys and values kept, each continuation evaluated after it, so no request's result depends on
  another's), log-softmax in float64 over llama.cpp's logits;
- loglikelihood_rolling: lm-eval's rolling windows of the context length;
- generate_until: greedy decoding (the only setting it takes; others are refused), stopping at
  the end-of-sequence token, a stop string (the output is cut before it) or `max_gen_toks`.
Chat templates come from the transformers tokenizer of the same build.

`llama-cpp-python` is optional (`make install-llamacpp`); it is imported only when this engine is chosen.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from benchharness.errors import SourceError
from benchharness.engine.reasoning import Markers, opens_block, stops_answer, strip_reasoning

log = logging.getLogger(__name__)

INSTALL_HINT = "Fix: `make install-llamacpp` (builds llama-cpp-python from its registry source, a few minutes), or choose engine: benchharness."
DEFAULT_MAX_GEN_TOKS = 256
# Generation settings that keep decoding greedy; anything else would need a sampler.
GREEDY_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k"}


def import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise SourceError(f"engine: llamacpp needs the llama-cpp-python package, which is not installed here ({exc}). {INSTALL_HINT}") from None
    return llama_cpp


@dataclass(frozen=True)
class LlamaCppSettings:
    """How llama.cpp runs: context length, threads, and tokens per decode call."""

    n_ctx: int = 2048
    n_threads: int | None = None  # None: every core this process may use
    n_batch: int = 512
    seed: int = 1234
    enable_thinking: bool | None = None  # the chat template's thinking switch (None: its default)
    reasoning: Markers | None = None  # reasoning markers: stop strings end the answer, not the thinking


class LlamaCppLM(TemplateLM):
    """lm-eval's model interface over one GGUF file in llama.cpp."""

    def __init__(self, gguf: Path, hf_tokenizer: Any, settings: LlamaCppSettings = LlamaCppSettings()) -> None:
        super().__init__()
        llama_cpp = import_llama_cpp()
        self._llama_cpp = llama_cpp
        self.settings = settings
        self.threads = settings.n_threads or len(os.sched_getaffinity(0))
        # logits_all: every position's logits, for scoring continuations; the scores buffer is
        # n_ctx x vocabulary floats, so n_ctx is kept to what the tasks need.
        self.llm = llama_cpp.Llama(
            model_path=str(gguf), n_ctx=settings.n_ctx, n_batch=settings.n_batch, n_threads=self.threads,
            n_threads_batch=self.threads, logits_all=True, seed=settings.seed, verbose=False,
        )
        self.gguf = Path(gguf)
        self.tokenizer = hf_tokenizer  # chat templates, and the metered model's token counts
        self.add_bos = bool(self.llm._model.add_bos_token())
        self._bos_text = self.llm.detokenize([self.prefix_token_id]).decode("utf-8", errors="ignore")
        self.requests_scored = 0
        self.contexts_evaluated = 0
        self.reasoning_unfinished = 0

    # ----------------------------------------------------------------- lm-eval's interface

    @property
    def eot_token_id(self) -> int:
        return int(self.llm.token_eos())

    @property
    def prefix_token_id(self) -> int:
        bos = int(self.llm.token_bos())
        return bos if bos >= 0 else self.eot_token_id

    @property
    def max_length(self) -> int:
        return int(self.llm.n_ctx())

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", self.gguf.name)).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        switch = {} if self.settings.enable_thinking is None else {"enable_thinking": self.settings.enable_thinking}
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt, **switch)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """The GGUF's own tokenizer; BOS as the GGUF says (or as asked), special tokens parsed in the text."""
        add_bos = self.add_bos if add_special_tokens is None else bool(add_special_tokens)
        if add_special_tokens is None and add_bos and self._bos_text and string.startswith(self._bos_text):
            add_bos = False  # the text already starts with BOS (a chat template put it there)
        return list(self.llm.tokenize(string.encode("utf-8"), add_bos=add_bos, special=True))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.llm.detokenize(list(tokens)).decode("utf-8", errors="ignore")

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        # Requests with the same context tokens are scored after one evaluation of that context.
        order = sorted(range(len(requests)), key=lambda i: (requests[i][1], requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        current: list[int] | None = None
        for i in tqdm(order, disable=disable_tqdm, desc="llama.cpp loglikelihood"):
            _, context, continuation = requests[i]
            context, continuation = self._fit(list(context), list(continuation))
            if context != current:
                self.llm.reset()
                self.llm.eval(context)
                current = context
                self.contexts_evaluated += 1
            results[i] = self._score_after(len(context), continuation)
            self.requests_scored += 1
        return [r for r in results if r is not None]

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Left-truncate the context so context + continuation fit the context length (as HFLM does)."""
        room = self.max_length - len(continuation)
        if room < 1:
            raise SourceError(f"engine: llamacpp: a continuation of {len(continuation)} tokens does not fit n_ctx {self.max_length}. "
                              "Fix: raise llamacpp.n_ctx in the experiment.")
        return context[-room:], continuation

    def _score_after(self, n_context: int, continuation: list[int]) -> tuple[float, bool]:
        """Evaluate `continuation` after the kept context; its log-probability and whether it is greedy."""
        self.llm.n_tokens = n_context  # eval() drops the cached keys and values past this point
        self.llm.eval(continuation)
        rows = np.asarray(self.llm.scores[n_context - 1 : n_context - 1 + len(continuation)], dtype=np.float64)
        logprobs = rows - np.logaddexp.reduce(rows, axis=-1, keepdims=True)
        picked = logprobs[np.arange(len(continuation)), continuation]
        greedy = bool(np.all(rows.argmax(axis=-1) == np.asarray(continuation)))
        return float(picked.sum()), greedy

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        out = []
        for request in tqdm(requests, disable=disable_tqdm, desc="llama.cpp rolling loglikelihood"):
            (text,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = 0.0
            for context, continuation in windows:
                self.llm.reset()
                self.llm.eval(list(context))
                total += self._score_after(len(context), list(continuation))[0]
            out.append(total)
        return out

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in tqdm(requests, disable=disable_tqdm, desc="llama.cpp generate_until"):
            context, gen_kwargs = request.args
            out.append(self._generate(context, dict(gen_kwargs)))
        return out

    def _generate(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        unknown = set(gen_kwargs) - GREEDY_KEYS
        sampling = gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0.0) or 0.0) > 0.0
        if unknown or sampling:
            raise SourceError(f"engine: llamacpp decodes greedily only; this task asks for {sorted(unknown) or 'sampling'} "
                              f"({gen_kwargs}). Fix: use engine: benchharness for this task.")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        prompt = self.tok_encode(context)[-(self.max_length - max_new):]
        self.llm.reset()
        self.llm.eval(prompt)
        generated: list[int] = []
        text = ""
        markers = self.settings.reasoning
        starts_open = markers is not None and opens_block(context, markers)
        for _ in range(max_new):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            if token == self.eot_token_id or self._llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token):
                break
            generated.append(token)
            text = self.tok_decode(generated)
            if stops_answer(text, starts_open, markers, tuple(until)):
                break
            if self.llm.n_tokens >= self.max_length:
                break
            self.llm.eval([token])
        if markers is not None:
            text, unfinished = strip_reasoning(text, starts_open, markers)
            self.reasoning_unfinished += int(unfinished)
        for stop in until:
            text = text.split(stop)[0]
        return text

    # ----------------------------------------------------------------- provenance

    def describe(self) -> dict[str, Any]:
        """The manifest's record: llama.cpp's version and build, threads, context length."""
        return {
            "engine": "llamacpp", "llama_cpp_python": self._llama_cpp.__version__,
            "system_info": self._llama_cpp.llama_print_system_info().decode().strip(),
            "threads": self.threads, "n_ctx": self.max_length, "n_batch": self.settings.n_batch,
            "gguf": self.gguf.name, "add_bos": self.add_bos,
            "requests_scored": self.requests_scored, "contexts_evaluated": self.contexts_evaluated,
        }

    def close(self) -> None:
        self.llm.close()


def tokenization_check(lm: LlamaCppLM, hf_tokenizer: Any, texts: Sequence[str], limit: int = 200) -> dict[str, Any]:
    """Tokenize up to `limit` texts with the GGUF's tokenizer and the transformers one (both without
    BOS): how many differ, and the first that does, so a difference in tokenization is reported."""
    checked, differ, example = 0, 0, None
    for text in list(texts)[:limit]:
        ours = lm.tok_encode(text, add_special_tokens=False)
        theirs = hf_tokenizer.encode(text, add_special_tokens=False)
        checked += 1
        if list(ours) != list(theirs):
            differ += 1
            if example is None:
                example = {"text": text[:200], "gguf": list(ours)[:40], "transformers": list(theirs)[:40]}
    return {"texts": checked, "differ": differ, "first_difference": example}
