"""Batched decoding with a KV cache: greedy or seeded sampling, left padding,
per-sequence stop strings and token limits; finished sequences leave the batch.
Prompts that begin alike (few-shot examples) can start from their shared prefix's cache.

The body is called with the same inputs `transformers.generate` builds (2D padding
mask, positions from the mask's cumulative sum, a DynamicCache), so greedy outputs
match lm-eval's `hf` model; the output layer runs on the last position only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from benchharness.engine.head import SplitModel
from benchharness.engine.scoring import PrefixState


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

    @property
    def needs_histories(self) -> bool:
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0


@dataclass
class DecodeCounts:
    """What one batch cost."""

    prefill_tokens: int  # rows x padded prompt length
    decode_steps: int
    generated_tokens: int


def _sequence_generator(settings: DecodeSettings, prompt: Sequence[int], device: torch.device) -> torch.Generator:
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
    logits: torch.Tensor, settings: DecodeSettings, histories: list[list[int]], generated: list[int], step: int
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
    if settings.begin_suppress_tokens and step == 0:
        logits[:, list(settings.begin_suppress_tokens)] = float("-inf")
    return logits


def _sample(logits: torch.Tensor, settings: DecodeSettings, generators: list[torch.Generator]) -> torch.Tensor:
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


@torch.inference_mode()
def generate_batch(
    split: SplitModel,
    prompts: Sequence[Sequence[int]],
    settings: DecodeSettings,
    pad_token_id: int,
    decode: Callable[[list[int]], str],
    prefix: PrefixState | None = None,
) -> tuple[list[list[int]], DecodeCounts]:
    """Generate for a batch of tokenized prompts; return the new tokens per prompt (a final EOS included).

    With `prefix` (the keys and values of the first `prefix.length` tokens, which every
    prompt begins with), only what follows it is run: the batch's cache starts from the
    prefix, then each row's left-padded rest (padding hidden by the attention mask).
    A sequence stops at an EOS id, when its decoded text contains a stop string,
    or after `max_new_tokens`; it then leaves the batch (its cache rows are dropped).
    """
    device = split.device
    batch = len(prompts)
    shared = prefix.length if prefix is not None else 0
    rests = [list(p)[shared:] for p in prompts]
    if any(not rest for rest in rests):
        raise ValueError("a shared prefix must leave at least one token of every prompt")
    width = max(len(rest) for rest in rests)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for b, rest in enumerate(rests):
        input_ids[b, width - len(rest) :] = torch.tensor(rest, dtype=torch.long)
        attention_mask[b, width - len(rest) :] = 1
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device)
    # As transformers.generate: positions count real tokens; padding gets position 0... then 1 (masked anyway).
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0) + shared
    if prefix is not None:
        cache = prefix.cache_for(batch)
        attention_mask = torch.cat([attention_mask.new_ones((batch, shared)), attention_mask], dim=1)
    else:
        cache = DynamicCache(config=split.config)

    generators = [_sequence_generator(settings, p, device) for p in prompts] if settings.do_sample else []
    histories = [list(p) for p in prompts] if settings.needs_histories else []
    outputs: list[list[int]] = [[] for _ in prompts]
    active = list(range(batch))  # original indices of the rows still in the batch
    steps = 0

    hidden = split.forward_body(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state[:, -1]
    last_position = position_ids[:, -1]

    while True:
        logits = process_logits(
            split.logits(hidden).float(), settings, [histories[i] for i in active] if histories else [],
            [len(outputs[i]) for i in active], steps,
        )
        if settings.do_sample:
            next_tokens = _sample(logits, settings, [generators[i] for i in active])
        else:
            next_tokens = logits.argmax(dim=-1)
        steps += 1

        keep: list[int] = []
        for row, token in enumerate(next_tokens.tolist()):
            original = active[row]
            outputs[original].append(token)
            if token in settings.eos_token_ids:
                # Finished. The EOS token stays in the output, as in transformers.generate: decoding
                # with skip_special_tokens drops it when it is a special token, as lm-eval's hf does.
                continue
            if histories:
                histories[original].append(token)
            if len(outputs[original]) >= settings.max_new_tokens:
                continue
            if settings.stop_strings:
                text = decode(outputs[original])
                if any(stop in text for stop in settings.stop_strings):
                    continue
            keep.append(row)
        if not keep:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep, dtype=torch.long, device=device)
            cache.batch_select_indices(index)
            attention_mask = attention_mask.index_select(0, index)
            last_position = last_position.index_select(0, index)
            next_tokens = next_tokens.index_select(0, index)
            active = [active[row] for row in keep]

        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=1)
        last_position = last_position + 1
        hidden = split.forward_body(
            input_ids=next_tokens[:, None],
            attention_mask=attention_mask,
            position_ids=last_position[:, None],
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state[:, -1]

    counts = DecodeCounts(
        prefill_tokens=batch * width,  # the shared prefix is counted where it is run
        decode_steps=steps,
        generated_tokens=sum(len(o) for o in outputs),
    )
    return outputs, counts
