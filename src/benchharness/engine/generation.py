"""How the engine picks each generated token, as `transformers.generate` does: the decode
settings, the logits processors it applies (in its order), seeded sampling per sequence.
The decoding loop that uses them is `continuous.py`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from benchharness.engine.reasoning import Markers


@dataclass(frozen=True)
class DecodeSettings:
    """How to pick tokens and when to stop; one setting for a whole batch."""

    max_new_tokens: int
    stop_strings: tuple[str, ...]
    eos_token_ids: frozenset[int]
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0  # EOS is banned until this many tokens are out
    no_repeat_ngram_size: int = 0  # no n-gram of the prompt + output may occur twice
    suppress_tokens: tuple[int, ...] = ()  # never generated
    begin_suppress_tokens: tuple[int, ...] = ()  # not generated first
    seed: int = 1234
    # Reasoning markers: stop strings then apply to the answer after a reasoning block (reasoning.py).
    reasoning: Markers | None = None

    @property
    def needs_histories(self) -> bool:
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0


def sequence_generator(settings: DecodeSettings, prompt: Sequence[int], device: torch.device) -> torch.Generator:
    """A generator seeded by the run seed and the prompt, so sampling does not depend on batching."""
    digest = hashlib.sha256(repr((settings.seed, tuple(prompt))).encode()).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


def _apply_repetition_penalty(
    logits: torch.Tensor, histories: list[list[int]], penalty: float
) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: divide positive, multiply negative scores of seen tokens."""
    if penalty == 1.0:
        return logits
    logits = logits.clone()
    for b, history in enumerate(histories):
        seen = torch.tensor(sorted(set(history)), dtype=torch.long, device=logits.device)
        score = logits[b, seen]
        logits[b, seen] = torch.where(score < 0, score * penalty, score / penalty)
    return logits


def _ban_repeated_ngrams(logits: torch.Tensor, histories: list[list[int]], size: int) -> torch.Tensor:
    """transformers' NoRepeatNGramLogitsProcessor: a token that would complete an n-gram already
    in the sequence (prompt + output) gets -inf."""
    for b, history in enumerate(histories):
        if len(history) + 1 < size:
            continue
        key = tuple(history[len(history) - size + 1 :])
        banned = {history[i + size - 1] for i in range(len(history) - size + 1) if tuple(history[i : i + size - 1]) == key}
        if banned:
            logits[b, sorted(banned)] = float("-inf")
    return logits


def process_logits(
    logits: torch.Tensor, settings: DecodeSettings, histories: list[list[int]], generated: list[int]
) -> torch.Tensor:
    """The logits processors transformers.generate runs before choosing (or sampling) a token,
    in its order: repetition penalty, no-repeat n-grams, minimum new tokens, suppressed tokens,
    tokens suppressed at the start."""
    if settings.repetition_penalty != 1.0:
        logits = _apply_repetition_penalty(logits, histories, settings.repetition_penalty)
    if settings.no_repeat_ngram_size > 0:
        logits = _ban_repeated_ngrams(logits, histories, settings.no_repeat_ngram_size)
    if settings.min_new_tokens > 0 and settings.eos_token_ids:
        rows = [b for b, count in enumerate(generated) if count < settings.min_new_tokens]
        if rows:
            logits[torch.tensor(rows)[:, None], torch.tensor(sorted(settings.eos_token_ids))[None, :]] = float("-inf")
    if settings.suppress_tokens:
        logits[:, list(settings.suppress_tokens)] = float("-inf")
    if settings.begin_suppress_tokens:
        first = [b for b, count in enumerate(generated) if count == 0]
        if first:
            logits[torch.tensor(first)[:, None], torch.tensor(list(settings.begin_suppress_tokens))[None, :]] = float("-inf")
    return logits


def sample_tokens(logits: torch.Tensor, settings: DecodeSettings, generators: list[torch.Generator]) -> torch.Tensor:
    """Temperature, top-k and top-p filtering as transformers applies them, then one draw per row."""
    scores = logits.float() / max(settings.temperature, 1e-6)
    if settings.top_k is not None and 0 < settings.top_k < scores.shape[-1]:
        kth = torch.topk(scores, settings.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if settings.top_p is not None and settings.top_p < 1.0:
        sorted_scores, sorted_index = torch.sort(scores, descending=False, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - settings.top_p)
        remove_sorted[:, -1] = False  # keep at least the most likely token
        remove = remove_sorted.scatter(1, sorted_index, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    probs = scores.softmax(dim=-1)
    draws = [torch.multinomial(probs[b], 1, generator=generators[b]) for b in range(probs.shape[0])]
    return torch.cat(draws)
