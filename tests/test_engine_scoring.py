"""Loglikelihood scoring: packing units, parity with lm-eval's HFLM, batch invariance."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from test_engine_support import TEST_DEVICE, make_model, make_tokenizer, mmlu_docs, one_torch_thread  # noqa: F401  (a fixture)

from benchharness.engine import BenchEngineLM
from benchharness.engine.batching import (
    TokenRequest,
    concatenate_rows,
    distinct_prefix_depths,
    minimum_tokens,
    pack_rows,
    plan_batches,
    prefix_groups as _prefix_groups,
    strip_prefix,
    truncate_request,
)
from benchharness.engine.head import split_model
from benchharness.engine.scoring import _HEAD_ROWS, _VOCAB_BLOCK, ancestor_mask, score_nodes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

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


def test_distinct_prefix_depths_counts_each_shared_prefix_once_at_its_depth():
    # [1, 2] is shared: its nodes count once; 3 and 4 both sit at depth 3; [5] starts a new branch.
    assert distinct_prefix_depths([[1, 2, 3], [1, 2, 4], [5], [1, 2]]) == [1, 2, 3, 3, 1]
    assert distinct_prefix_depths([]) == []


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


def prefix_groups(rows, min_prefix, min_group_tokens):
    contexts = [row.tokens[: row.context_length] for row in rows]
    return _prefix_groups(contexts, [len(row) for row in rows], min_prefix, min_group_tokens)


def test_prefix_groups_share_long_common_prefixes_and_leave_the_rest_alone():
    shot_a = tuple(range(100, 130))  # two "few-shot" families of 30 shared tokens
    shot_b = tuple(range(200, 230))
    contexts = [shot_a + (1, i) for i in range(3)] + [shot_b + (2, i, i) for i in range(2)] + [(7, 8, 9)]
    rows = pack_rows([TokenRequest(i, ctx, (50,)) for i, ctx in enumerate(contexts)], max_length=100)
    groups, alone = prefix_groups(rows, min_prefix=16, min_group_tokens=0)
    by_prefix = {g.prefix: sorted(g.rows) for g in groups}
    assert by_prefix == {shot_a + (1,): [0, 1, 2], shot_b + (2,): [3, 4]}
    assert alone == [5]
    # Too short a prefix, or too few tokens in the group: no group.
    assert prefix_groups(rows, min_prefix=40, min_group_tokens=0)[0] == []
    assert prefix_groups(rows, min_prefix=16, min_group_tokens=10_000)[0] == []


def test_prefix_groups_keep_one_long_prefix_rather_than_a_short_one_for_all():
    # Families share 21 tokens among themselves and 17 across: two groups save more than one.
    common = tuple(range(17))
    contexts = [common + (300 + f,) * 3 + (f, i) for f in range(2) for i in range(4)]
    rows = pack_rows([TokenRequest(i, ctx, (50,)) for i, ctx in enumerate(contexts)], max_length=100)
    groups, _ = prefix_groups(rows, min_prefix=16, min_group_tokens=0)
    assert sorted(len(g.prefix) for g in groups) == [21, 21]
    # A context's last token is never part of the prefix: it scores the continuation.
    same = pack_rows([TokenRequest(i, common, (50 + i, 60, 70)) for i in range(3)], 100, max_row_tokens=18)
    assert len(same) == 3  # one context, repeated over three rows
    (group,), _ = prefix_groups(same, min_prefix=8, min_group_tokens=0)
    assert len(group.prefix) == len(common) - 1


def test_strip_prefix_keeps_positions_and_attaches_the_rest_to_the_prefix():
    (row,) = pack_rows([TokenRequest(0, (1, 2, 3, 4), (5, 6)), TokenRequest(1, (1, 2, 3, 4), (7,))], 100)
    suffix = strip_prefix(row, 2)
    assert suffix.tokens == [3, 4, 5]
    assert suffix.positions == [2, 3, 4]
    assert suffix.parents == [-1, 0, 1]
    assert {s.index: s.nodes for s in suffix.scored} == {0: [1, 2], 1: [1]}
    with pytest.raises(ValueError):
        strip_prefix(row, 4)


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
    # A prefix copied into every lane counts against the budget: lanes of 30 + 30 leave room for one.
    assert all(len(lanes) == 1 for lanes in plan_batches(rows, token_budget=60, max_lanes=None, lane_overhead=30))


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
def test_blocked_output_layer_gives_log_softmax_over_the_whole_vocabulary(arch):
    # A vocabulary of several blocks, more rows than one pass takes, several targets per row
    # (in different blocks, and each row's argmax), Gemma's softcapping included.
    vocab = 2 * _VOCAB_BLOCK + 123
    split = split_model(make_model(arch, vocab))
    rows = _HEAD_ROWS + 7
    hidden = torch.randn(rows, split.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(split.device)
    reference = split.log_probs(hidden)
    argmax = reference.argmax(dim=-1)
    slots = torch.arange(rows, device=split.device).repeat_interleave(3)
    targets = torch.stack([argmax, torch.full_like(argmax, 5), torch.full_like(argmax, vocab - 1)], dim=1).reshape(-1)
    logprob, greedy = score_nodes(split, hidden, slots, targets)
    assert torch.allclose(logprob, reference[slots, targets], rtol=0, atol=1e-5)
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


def _few_shot_requests(n_docs: int = 6) -> list[Instance]:
    """Few-shot prompts: every context begins with the same worked examples."""
    shots = "".join(
        d["question"] + "\nAnswer: " + d["choices"][d["answer"]] + "\n\n" for d in mmlu_docs(3, seed=7)
    )
    requests = []
    for i, doc in enumerate(mmlu_docs(n_docs, seed=2)):
        for cont in (" A", " B", " C", " D"):
            requests.append(Instance("loglikelihood", {}, (shots + doc["question"] + "\nAnswer:", cont), i))
        for choice in doc["choices"]:
            requests.append(Instance("loglikelihood", {}, (shots + "Q: " + doc["question"] + "\nA:", " " + choice), i))
    return requests


@pytest.mark.parametrize("arch,add_bos", ARCHS)
def test_shared_prefixes_run_once_with_the_same_scores_as_hflm(arch, add_bos):
    tokenizer = make_tokenizer(add_bos=add_bos)
    model = make_model(arch, len(tokenizer))
    requests = _few_shot_requests()
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4).loglikelihood(requests)
    engine = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size="auto", max_batch_tokens=256)
    ours = engine.loglikelihood(requests)
    assert engine.stats.score_prefixes >= 1
    # The prefix (longer than Gemma's sliding window of 6 here) was computed once, not per context.
    unshared = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size="auto", share_prefixes=False)
    plain = unshared.loglikelihood(requests)
    assert unshared.stats.score_prefixes == 0
    assert engine.stats.score_row_tokens < 0.6 * unshared.stats.score_row_tokens
    for other in (ours, plain):
        assert _max_diff(reference, other) < 1e-3
        assert [r[1] for r in reference] == [o[1] for o in other]
    assert _max_diff(plain, ours) < 1e-4
    single = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=1).loglikelihood(requests)
    assert _max_diff(single, ours) < 1e-4


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


@pytest.mark.skipif(TEST_DEVICE.type != "cpu", reason="the CPU token budget (a GPU takes the largest that fits)")
def test_batches_do_not_depend_on_machine_speed(monkeypatch):
    """Reference runs must not depend on load: the CPU budget is fixed, so however fast or slow the
    machine's clock says it is, the same requests share the same forwards and get the same scores."""
    import itertools
    import time

    from benchharness.engine import autobatch

    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer))
    requests = _few_shot_requests()
    runs = []
    for step in (1e-6, 3.0):  # a clock that says every forward is instant, or takes seconds
        ticks = itertools.count()
        monkeypatch.setattr(autobatch.time, "perf_counter", lambda: next(ticks) * step)
        monkeypatch.setattr(time, "perf_counter", lambda: next(ticks) * step)
        engine = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size="auto")
        runs.append((engine.loglikelihood(requests), engine.batch_info, engine.stats))
    (first, info_a, stats_a), (second, info_b, stats_b) = runs
    assert info_a["budget_method"] == info_b["budget_method"] == "cpu-fixed"
    assert info_a["token_budget"] == info_b["token_budget"] == autobatch.CPU_TOKEN_BUDGET
    assert stats_a == stats_b  # the same forwards, rows and padding
    assert first == second  # bit for bit


@pytest.mark.skipif(TEST_DEVICE.type != "cpu", reason="the CPU token budget (a GPU takes the largest that fits)")
def test_the_timing_probe_runs_only_when_asked(monkeypatch):
    """`max_batch_tokens=probe` brings back the CPU timing probe (then batches follow the clock, and
    the manifest says so); without it the same clock leaves the fixed budget."""
    import itertools

    from benchharness.engine import autobatch

    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer))
    ticks = itertools.count()
    # Every timed forward takes one tick, whatever its size: all fixed cost, the largest budget.
    monkeypatch.setattr(autobatch.time, "perf_counter", lambda: float(next(ticks)))
    probed = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size="auto", max_batch_tokens="probe")
    assert probed.batch_info["budget_method"] == "not-yet-probed"
    assert probed.token_budget() == autobatch._CPU_MAX_BUDGET
    assert probed.batch_info["budget_method"] == "cpu-overhead-fit" and len(probed.batch_info["budget_probes"]) == 3
    fixed = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size="auto")
    assert fixed.token_budget() == autobatch.CPU_TOKEN_BUDGET
    assert fixed.batch_info["budget_method"] == "cpu-fixed"
    given = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size="auto", max_batch_tokens=300)
    assert given.token_budget() == 300 and given.batch_info["budget_method"] == "given"
