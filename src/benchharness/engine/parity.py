"""How close the engine's results must be to lm-eval's `hf` model's, by dtype (tests and the
runtime parity certificate use the same numbers).

fp32: both compute the same sums; only the order of float operations differs (batch shapes,
fused kernels): 1e-3 absolute, where measured differences are below 1e-4.
bf16 / fp16 (the CUDA defaults): lm-eval's `hf` model log-softmaxes and sums the continuation's
log-probabilities in the model dtype, the engine in fp32, and the two run different batch shapes,
which round the hidden states and logits differently: a logit near 20 is off by up to 0.375 in
bf16 between a batch of one and a padded batch of four (Gemma-3-270m). So even a likely token's
log-probability moves by tenths in bf16, and longer continuations add more. Bounds: about twice
the largest difference measured on the real SmolLM2-135M and Gemma-3-270m (CPU; 56 requests each:
3-shot letter answers and multi-token answer texts, engine vs HFLM at batch 4):
- bf16: worst 0.545 at -20.5 and 0.26 at -7.4 (SmolLM2), 0.17 at -3.6 (Gemma); the bound
  0.3 + 4% of |loglik| is reached at most halfway (0.49). Chosen answers and greedy flags all
  agreed. (The earlier bound, 0.05 + 1.2%, set from tiny test models, which differ far less,
  failed 13 of SmolLM2's 56 requests.)
- fp16: worst 0.040 at -14.2 (SmolLM2); 0.02 + 0.4% reached at most halfway (0.52). Gemma 3
  overflows fp16 (NaN): the construction check refuses it, naming the dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Tolerance:
    """|engine - hf| of a loglikelihood may be at most `max_abs_loglik + relative * |hf's value|`."""

    max_abs_loglik: float
    relative: float = 0.0

    def bound(self, reference: float) -> float:
        return self.max_abs_loglik + self.relative * abs(reference)


TOLERANCE = {
    "float32": Tolerance(1e-3),
    "float64": Tolerance(1e-6),
    "bfloat16": Tolerance(0.3, 0.04),
    "float16": Tolerance(0.02, 0.004),
}


# Greedy generation. fp32: identical outputs. bf16 / fp16: identical up to the first token where the
# two choose differently, and that choice must be a near-tie: in the model's own forward (batch of one,
# its dtype) on the prompt and the tokens both generated before it, the two chosen tokens' logits
# differ by at most GENERATION_TIE[dtype] times the larger of their magnitudes (and 1). After a
# near-tie the two continue from different texts and are not compared further.
# The bound is 8 x the dtype's machine epsilon, relative (8-16 units in the last place). On
# SmolLM2-135M (CPU) the logits of a prompt in a left-padded batch of 4 differed from its batch-of-one
# logits by up to 4 units (bf16: 0.25 at 12.6; fp16: 2 units), and either side's batches may be off
# by that much; where the engine's and hf's greedy outputs parted (3 of 12 prompts in bf16, 1 of 12
# in fp16), the two choices were 1-2 units apart (bf16) or an exact tie (fp16).
GENERATION_TIE = {"float32": 0.0, "float64": 0.0, "bfloat16": 8 * 2.0**-7, "float16": 8 * 2.0**-10}


def first_difference(ours: Sequence[int], theirs: Sequence[int]) -> int | None:
    """Index of the first token where two outputs differ; None if one begins the other (or they are equal)."""
    for index, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return index
    return None


def choice_gap(model: Any, prompt_ids: Sequence[int], ours: Sequence[int], theirs: Sequence[int]) -> tuple[int, float, float] | None:
    """At the first difference of two greedy outputs of `prompt_ids`: (its index, |logit difference| of
    the two chosen tokens, the larger |logit| of the two), from the model's plain forward on the prompt
    and the tokens both generated before it. None where the outputs do not differ."""
    import torch

    index = first_difference(ours, theirs)
    if index is None:
        return None
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids) + list(ours[:index])], device=device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, -1].float()
    a, b = float(logits[ours[index]]), float(logits[theirs[index]])
    return index, abs(a - b), max(abs(a), abs(b))


def generations_agree(model: Any, prompt_ids: Sequence[int], ours: Sequence[int], theirs: Sequence[int], dtype: str) -> bool:
    """The rule above: equal token ids, or a first difference at a near-tie for `dtype`."""
    gap = choice_gap(model, prompt_ids, ours, theirs)
    if gap is None:
        return True
    _, difference, scale = gap
    return near_tie(difference, scale, dtype)


def near_tie(difference: float, scale: float, dtype: str) -> bool:
    """Two chosen tokens' logits `difference` apart, the larger `scale` in magnitude: a near-tie for `dtype`."""
    return difference <= GENERATION_TIE.get(dtype, 0.0) * max(scale, 1.0)


def _cut_at_stop(text: str, until: Sequence[str]) -> str:
    """The text before the first stop string in it, as lm-eval cuts a generation."""
    ends = [text.find(stop) for stop in until if stop and stop in text]
    return text[: min(ends)] if ends else text


def text_choice_gap(
    model: Any,
    decode: Any,
    prompt_ids: Sequence[int],
    theirs: Sequence[int],
    ours_text: str,
    until: Sequence[str],
    eos_ids: set[int],
    top: int = 50,
) -> tuple[int, float, float] | None:
    """The rule above for an output known only as text (the engine's logged answer), against hf's
    tokens `theirs` for the same prompt. At the first token `k` of `theirs` whose text leaves
    `ours_text`, the engine's choice is taken to be the most likely token, in the model's plain
    forward on the prompt and `theirs[:k]`, that continues `ours_text` there (or ends it: an EOS
    token, or a stop string of `until`). Returns (k, |logit difference| of that token and hf's,
    the larger |logit|), with an infinite difference when none of the `top` most likely tokens
    continues it; None when `ours_text` does not leave hf's tokens (nothing to compare).
    `decode`: token ids to text, special tokens kept."""
    import torch

    def starts(text: str) -> bool:  # a token may end inside a character: its text ends in U+FFFD
        return ours_text.startswith(text.rstrip("\ufffd"))

    k = 0
    while k < len(theirs) and starts(decode(list(theirs[: k + 1]))):
        k += 1
    if k == len(theirs):
        return None
    prefix = decode(list(theirs[:k]))

    def continues(token: int) -> bool:
        if token in eos_ids:
            return ours_text == prefix.rstrip("\ufffd")
        text = decode(list(theirs[:k]) + [token])
        cut = _cut_at_stop(text, until)
        if cut != text:
            return cut == ours_text
        return len(text.rstrip("\ufffd")) > len(prefix.rstrip("\ufffd")) and starts(text)

    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([list(prompt_ids) + list(theirs[:k])], device=device)).logits[0, -1].float()
    hf_logit = float(logits[theirs[k]])
    for token in logits.topk(min(top, logits.shape[0])).indices.tolist():
        if token != theirs[k] and continues(token):
            ours_logit = float(logits[token])
            return k, abs(hf_logit - ours_logit), max(abs(hf_logit), abs(ours_logit))
    return k, float("inf"), abs(hf_logit)
