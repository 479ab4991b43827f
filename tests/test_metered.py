"""Token accounting of the evaluation: each distinct token prefix counts once (shared contexts and
few-shot examples once), continuations always."""

from __future__ import annotations

from pathlib import Path

from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from transformers import AutoTokenizer

from benchharness.measure.metered import MeteredLM


class _Echo(LM):
    def loglikelihood(self, requests, disable_tqdm=False):
        return [(-1.0, False) for _ in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        return [-1.0 for _ in requests]

    def generate_until(self, requests, disable_tqdm=False):
        return [" forty two" for _ in requests]


def _req(kind: str, args: tuple) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_shared_contexts_count_once(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    n = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    metered = MeteredLM(_Echo(), tok)
    question = "Which of the following is true?\\nAnswer:"
    other = "Find the degree of the field extension.\\nAnswer:"
    requests = [_req("loglikelihood", (question, f" {c}")) for c in "ABCD"] + [_req("loglikelihood", (other, " A"))]
    metered.loglikelihood(requests)
    assert metered.requests == 5
    assert metered.scored_tokens == sum(n(f" {c}") for c in "ABCD") + n(" A")
    assert metered.prompt_tokens == n(question) + n(other) + metered.scored_tokens
    metered.generate_until([_req("generate_until", (question, {"until": ["\\n"]}))])
    assert metered.generated_tokens == n(" forty two")
    assert metered.generate_prompt_tokens == n(question)
    assert metered.prompt_tokens == n(question) + n(other) + metered.scored_tokens  # scoring counts stay apart
    assert metered.score_seconds >= 0 and metered.generate_seconds >= 0


def test_few_shot_examples_shared_by_contexts_and_prompts_count_once(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    shots = "Question: two plus two?\nAnswer: four\n\nQuestion: three plus one?\nAnswer: four\n\n"
    first, second = shots + "Question: one plus one?\nAnswer:", shots + "Question: five minus two?\nAnswer:"
    shared = next(k for k, (a, b) in enumerate(zip(ids(first), ids(second))) if a != b)
    assert shared >= len(ids(shots)) - 1  # the examples really are a shared token prefix
    metered = MeteredLM(_Echo(), tok)
    metered.loglikelihood([_req("loglikelihood", (first, " two")), _req("loglikelihood", (second, " three"))])
    assert metered.prompt_tokens == len(ids(first)) + len(ids(" two")) + len(ids(second)) + len(ids(" three")) - shared
    metered.generate_until([_req("generate_until", (p, {"until": ["\n"]})) for p in (first, second)])
    assert metered.generate_prompt_tokens == len(ids(first)) + len(ids(second)) - shared
