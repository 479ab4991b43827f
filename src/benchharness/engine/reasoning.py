"""Reasoning blocks (`<think>...</think>`) in generated text: where the answer starts, and the
answer a scorer should see.

A reasoning model writes its thoughts between two markers, then the answer. The chat template
may open the block itself (DeepSeek-R1-Distill's ends the prompt with "<think>\\n"), so whether a
generation starts inside a block is read from the prompt. Two rules follow:

- a task's stop strings ("\\ndef", "Question:") end the *answer*: inside an open block they are
  part of the thinking and do not stop the generation;
- the scorer sees the text after the last closing marker. A block that never closes (the token
  limit came first) leaves no answer: the empty string, never the unfinished thoughts, which
  could otherwise be scored as an answer by chance.

A generation without markers, from a prompt that opens none, is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass


# The reasoning arguments lm-eval's own hf and vLLM models take (the harness's engines take these
# and `think_start_token`).
LM_EVAL_ARGUMENTS = ("enable_thinking", "think_end_token")


@dataclass(frozen=True)
class Markers:
    start: str = "<think>"
    end: str = "</think>"


def opens_block(prompt: str, markers: Markers) -> bool:
    """Whether the prompt leaves a reasoning block open (its last start marker after its last end marker)."""
    start = prompt.rfind(markers.start)
    return start >= 0 and start > prompt.rfind(markers.end)


def answer_part(text: str, starts_open: bool, markers: Markers) -> str | None:
    """The answer so far in a generation: after the last end marker; all of it when no block was
    opened; None while a block is still open (the generation is thinking)."""
    end = text.rfind(markers.end)
    if end >= 0:
        return text[end + len(markers.end):]
    if starts_open or markers.start in text:
        return None
    return text


def strip_reasoning(text: str, starts_open: bool, markers: Markers) -> tuple[str, bool]:
    """(the answer the scorer sees, whether the generation had a block that never closed)."""
    answer = answer_part(text, starts_open, markers)
    if answer is None:
        return "", True
    return (answer.lstrip() if answer is not text else answer), False


def stops_answer(text: str, starts_open: bool, markers: Markers | None, stop_strings: tuple[str, ...]) -> bool:
    """Whether a stop string has appeared in the answer part of `text` (in all of it without markers)."""
    if not stop_strings:
        return False
    answer = text if markers is None else answer_part(text, starts_open, markers)
    return answer is not None and any(stop in answer for stop in stop_strings)
