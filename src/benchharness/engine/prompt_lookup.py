"""Prompt-lookup drafts for greedy decoding (n-gram speculation, as transformers'
`prompt_lookup_num_tokens` and vLLM's `ngram` method).

A decode step reads every weight once whatever the rows; with few rows running (the end of
a generate_until task, small tasks) the step costs about the same for one token per row as
for five. So a row whose last tokens occurred earlier in its prompt or output proposes the
tokens that followed them there (the draft), the step runs the row's next token and its
draft together, and the draft tokens the model would have chosen itself are kept: greedy
outputs are those of one token per step (the model checks every draft token against its own
argmax), the step just yields more of them when the text repeats (code that restates its
signature, a sum that quotes the question's numbers).

`NgramIndex` finds the draft in constant time per token; `plan_lookup` says whether drafts
apply to a task (greedy, no history-dependent logits processors, sliding-window layers only
where the engine builds their masks: masks.token_masks) and, if not, why.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from benchharness.engine.generation import DecodeSettings

MAX_NGRAM = 3  # the longest suffix looked up; shorter ones are tried when it never occurred before


@dataclass(frozen=True)
class LookupPlan:
    """Draft tokens per row and step (0: off), and the most tokens a step may run (rows x (1 + draft))."""

    draft_tokens: int
    step_tokens: int
    reason: str = ""  # why drafts are off, if they are

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def draft_length(self, rows: int) -> int:
        """Draft tokens per row for a step of `rows` rows: as many as fit the step's token cap."""
        return max(0, min(self.draft_tokens, self.step_tokens // max(1, rows) - 1))


def plan_lookup(settings: DecodeSettings, draft_tokens: int, step_tokens: int, windows_unmasked: str = "") -> LookupPlan:
    """Whether prompt-lookup drafts apply to a task decoded with `settings`. `windows_unmasked`: why
    the engine cannot build the model's sliding-window masks itself ('' if it can, or no layer slides):
    a rejected draft leaves a masked slot, and transformers' own masks count the window in slots."""
    reason = ""
    if draft_tokens <= 0:
        reason = "prompt_lookup_tokens=0"
    elif settings.do_sample:
        reason = "sampling (drafts would change which random draws a row takes)"
    elif settings.needs_histories:
        reason = "repetition_penalty / no_repeat_ngram_size (their logits depend on every earlier token)"
    elif windows_unmasked:
        reason = f"sliding-window layers ({windows_unmasked})"
    if reason:
        return LookupPlan(draft_tokens=0, step_tokens=step_tokens, reason=reason)
    return LookupPlan(draft_tokens=draft_tokens, step_tokens=step_tokens)


class NgramIndex:
    """One row's tokens (prompt, then output) and, for its last 1..MAX_NGRAM tokens, where they
    occurred last before; updated as tokens are appended."""

    def __init__(self, tokens: Iterable[int]) -> None:
        self.tokens: list[int] = []
        self._last: dict[tuple[int, ...], int] = {}  # n-gram -> start of its latest occurrence
        self._earlier: list[int | None] = [None] * (MAX_NGRAM + 1)  # per n: the suffix's previous start
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens)
            for n in range(1, MAX_NGRAM + 1):
                if end < n:
                    self._earlier[n] = None
                    continue
                key = tuple(self.tokens[end - n :])
                self._earlier[n] = self._last.get(key)
                self._last[key] = end - n

    def draft(self, length: int) -> list[int]:
        """Up to `length` tokens that followed the latest earlier occurrence of the longest suffix
        (MAX_NGRAM tokens down to 1) that occurred before; [] if none did."""
        if length <= 0:
            return []
        for n in range(MAX_NGRAM, 0, -1):
            start = self._earlier[n]
            if start is not None:
                follow = self.tokens[start + n : start + n + length]
                if follow:
                    return follow
        return []
