"""Loglikelihood scoring: packing units, parity with lm-eval's HFLM, batch invariance."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from test_engine_support import make_model, make_tokenizer, mmlu_docs

from benchharness.engine import BenchEngineLM
from benchharness.engine.batching import (
    TokenRequest,
    concatenate_rows,
    minimum_tokens,
    pack_rows,
    plan_batches,
    truncate_request,
)
from benchharness.engine.head import split_model
from benchharness.engine.scoring import _HEAD_ROWS, _VOCAB_BLOCK, ancestor_mask, score_nodes

ARCHS = [("llama", False), ("qwen2", False), ("gemma3", True)]


# ---------------------------------------------------------------- packing units
def test_pack_rows_runs_a_shared_context_once_and_shares_continuation_prefixes():
    ctx = (5, 6, 7)
    requests = [
        TokenRequest(0, ctx, (10,)),
        TokenRequest(1, ctx, (11,)),
        TokenRequest(2, ctx, (12, 13, 14)),
        TokenRequest(3, ctx, (12, 13, 15)),  # shares its first two tokens with request 2
        TokenRequest(4, (9, 9), (10,)),
    ]
    rows = pack_rows(requests, max_length=100)
    assert len(rows) == 2
    row = next(r for r in rows if r.tokens[:3] == list(ctx))
    # context once + branch inputs 12, 13 once (continuations' last tokens are never inputs)
    assert row.tokens == [5, 6, 7, 12, 13]
    assert row.positions == [0, 1, 2, 3, 4]
    assert row.parents == [-1, 0, 1, 2, 3]
    by_index = {s.index: s for s in row.scored}
    assert by_index[0].nodes == [2] and by_index[0].targets == [10]
    assert by_index[2].nodes == [2, 3, 4] and by_index[2].targets == [12, 13, 14]
    assert by_index[3].nodes == [2, 3, 4] and by_index[3].targets == [12, 13, 15]
    assert minimum_tokens(requests, 100) == 5 + 2


def test_pack_rows_branches_get_positions_from_their_depth():
    rows = pack_rows([TokenRequest(0, (1, 2), (3, 4, 5)), TokenRequest(1, (1, 2), (6, 7, 8))], max_length=100)
    (row,) = rows
    assert row.tokens == [1, 2, 3, 4, 6, 7]
    assert row.positions == [0, 1, 2, 3, 2, 3]
    assert row.parents == [-1, 0, 1, 2, 1, 4]


def test_pack_rows_splits_a_group_over_the_row_budget_repeating_the_context():
    ctx = tuple(range(10))
    requests = [TokenRequest(i, ctx, (100 + i, 200 + i, 300 + i)) for i in range(4)]
    rows = pack_rows(requests, max_length=100, max_row_tokens=14)
    assert [len(r) for r in rows] == [14, 14]
    assert all(r.tokens[:10] == list(ctx) for r in rows)
    assert sorted(s.index for r in rows for s in r.scored) == [0, 1, 2, 3]


def test_truncate_request_keeps_the_window_hflm_feeds():
    request = TokenRequest(0, tuple(range(10)), (20, 21, 22))
    truncated = truncate_request(request, max_length=8)
    # HFLM input: (ctx + cont)[-(8 + 1):][:-1] -> the context is what precedes the continuation
    assert truncated.context + truncated.continuation == tuple((list(range(10)) + [20, 21, 22])[-9:])
    assert truncated.continuation == (20, 21, 22)
    assert truncate_request(request, max_length=20) is request


def test_plan_batches_sorts_longest_first_packs_lanes_and_keeps_padded_size_within_budget():
    lengths = [5, 30, 12, 8, 29, 3, 17]
    rows = pack_rows([TokenRequest(i, tuple(range(n)), (99,)) for i, n in enumerate(lengths)], 100)
    batches = plan_batches(rows, token_budget=60, max_lanes=None)
    assert len(rows[batches[0][0][0]]) == 30  # the longest row comes first
    for lanes in batches:
        lane_length = max(sum(len(rows[i]) for i in lane) for lane in lanes)
        assert len(lanes) == 1 or len(lanes) * lane_length <= 60
        assert lane_length == len(rows[lanes[0][0]])  # no lane longer than its batch's first row
    assert sorted(i for lanes in batches for lane in lanes for i in lane) == list(range(len(rows)))
    # 104 tokens in lanes of 30 and 29: shorter rows fill the gaps, padding stays small
    padded = sum(len(lanes) * len(rows[lanes[0][0]]) for lanes in batches)
    assert padded <= 120
    assert all(len(lanes) <= 2 for lanes in plan_batches(rows, token_budget=None, max_lanes=2))


def test_concatenated_rows_keep_their_positions_and_see_only_themselves():
    rows = pack_rows([TokenRequest(0, (1, 2), (3, 4)), TokenRequest(1, (7, 8, 9), (5,))], 100)
    lane = concatenate_rows(rows)
    assert lane.tokens == [1, 2, 3, 7, 8, 9]
    assert lane.positions == [0, 1, 2, 0, 1, 2]
    assert lane.parents == [-1, 0, 1, -1, 3, 4]
    assert {s.index: s.nodes for s in lane.scored} == {0: [1, 2], 1: [5]}
    mask = ancestor_mask(lane.parents)
    assert not mask[3:, :3].any() and not mask[:3, 3:].any()


def test_ancestor_mask_of_a_tree():
    mask = ancestor_mask([-1, 0, 1, 1])  # 0 <- 1 <- {2, 3}
    expected = torch.tensor(
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 1]],
        dtype=torch.bool,
    )
    assert torch.equal(torch.from_numpy(mask), expected)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_blocked_output_layer_equals_log_softmax_over_the_whole_vocabulary(arch):
    # A vocabulary of several blocks, more rows than one pass takes, several targets per row
    # (in different blocks, and each row's argmax), Gemma's softcapping included.
    vocab = 2 * _VOCAB_BLOCK + 123
    split = split_model(make_model(arch, vocab))
    rows = _HEAD_ROWS + 7
    hidden = torch.randn(rows, split.config.hidden_size, generator=torch.Generator().manual_seed(0))
    reference = split.log_probs(hidden)
    argmax = reference.argmax(dim=-1)
    slots = torch.arange(rows).repeat_interleave(3)
    targets = torch.stack([argmax, torch.full_like(argmax, 5), torch.full_like(argmax, vocab - 1)], dim=1).reshape(-1)
    logprob, greedy = score_nodes(split, hidden, slots, targets)
    assert torch.allclose(logprob, reference[slots, targets], atol=1e-4)
    assert torch.equal(greedy, argmax[slots] == targets)
    assert greedy[0::3].all() and not greedy[1::3].all()


# ---------------------------------------------------------------- against lm-eval's hf model
def _requests(n_docs: int = 5) -> list[Instance]:
    """MMLU-style letters, multi-token answer texts, a shared-prefix pair, and an empty context."""
    requests = []
    for i, doc in enumerate(mmlu_docs(n_docs, seed=1)):
        letters = doc["question"] + "\nA. " + doc["choices"][0] + "\nB. " + doc["choices"][1] + "\nAnswer:"
        for cont in (" A", " B", " C", " D"):
            requests.append(Instance("loglikelihood", {}, (letters, cont), i))
        text = "Question: " + doc["question"] + "\nAnswer: "  # trailing space moves to the continuation
        for choice in doc["choices"]:
            requests.append(Instance("loglikelihood", {}, (text, choice), i))
        requests.append(Instance("loglikelihood", {}, (text, doc["choices"][0] + " and more"), i))
    requests.append(Instance("loglikelihood", {}, ("", "the cat sells eggs"), 0))
    return requests


def _max_diff(a: list[tuple[float, bool]], b: list[tuple[float, bool]]) -> float:
    return max(abs(x[0] - y[0]) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("arch,add_bos", ARCHS)
def test_loglikelihood_matches_hflm(arch, add_bos):
    tokenizer = make_tokenizer(add_bos=add_bos)
    model = make_model(arch, len(tokenizer))
    requests = _requests()
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4).loglikelihood(requests)
    engine = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size="auto")
    ours = engine.loglikelihood(requests)
    assert _max_diff(reference, ours) < 1e-3
    assert [r[1] for r in reference] == [o[1] for o in ours]
    # The engine really shared work: fewer body tokens than one row per request would need.
    pairs = [engine._encode_pair(*r.args) for r in requests if r.args[0]]
    one_row_per_request = sum(len(ctx) + len(cont) - 1 for ctx, cont in pairs)
    assert engine.stats.score_row_tokens < 0.5 * one_row_per_request
    if add_bos:
        assert engine.tok_encode("the cat")[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("arch,add_bos", [("llama", False), ("gemma3", True)])
def test_loglikelihood_matches_hflm_when_truncating_to_max_length(arch, add_bos):
    tokenizer = make_tokenizer(add_bos=add_bos)
    model = make_model(arch, len(tokenizer))
    requests = _requests(3)
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3, max_length=20).loglikelihood(requests)
    ours = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=2, max_length=20).loglikelihood(requests)
    assert _max_diff(reference, ours) < 1e-3
    assert [r[1] for r in reference] == [o[1] for o in ours]


@pytest.mark.parametrize("arch,add_bos", ARCHS)
def test_scores_do_not_depend_on_batching(arch, add_bos):
    tokenizer = make_tokenizer(add_bos=add_bos)
    model = make_model(arch, len(tokenizer))
    requests = _requests()
    single = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=1).loglikelihood(requests)
    tuned_engine = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size="auto")
    tuned = tuned_engine.loglikelihood(requests)
    # A tiny budget splits context groups over several rows: still the same scores.
    split_engine = BenchEngineLM(
        model=model, tokenizer=tokenizer, batch_size="auto", max_batch_tokens=24, max_row_tokens=24
    )
    split = split_engine.loglikelihood(requests)
    assert split_engine.stats.score_row_tokens > split_engine.stats.score_min_tokens  # contexts were repeated
    assert tuned_engine.stats.score_forwards < len({r.args[0] for r in requests})  # rows were batched
    for other in (tuned, split):
        assert _max_diff(single, other) < 1e-4
        assert [s[1] for s in single] == [o[1] for o in other]
    # identical chosen answers per document (argmax over its letter requests)
    for results in (tuned, split):
        for start in range(0, len(requests) - 1, 9):
            letters = slice(start, start + 4)
            assert max(range(4), key=lambda k: single[letters][k][0]) == max(
                range(4), key=lambda k: results[letters][k][0]
            )


@pytest.mark.parametrize("arch,add_bos", [("qwen2", False), ("gemma3", True)])
def test_loglikelihood_rolling_matches_hflm(arch, add_bos):
    tokenizer = make_tokenizer(add_bos=add_bos)
    model = make_model(arch, len(tokenizer))
    texts = [" ".join(d["question"] for d in mmlu_docs(3, seed=s)) for s in range(3)] + ["short one"]
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    # max_length 16 forces several windows per text
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2, max_length=16).loglikelihood_rolling(
        requests
    )
    ours = BenchEngineLM(model=model, tokenizer=tokenizer, max_length=16).loglikelihood_rolling(requests)
    assert max(abs(a - b) for a, b in zip(reference, ours, strict=True)) < 1e-3
    assert all(r < 0 for r in ours)
