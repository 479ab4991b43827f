"""Continuous batching: slots refilled as sequences finish give lm-eval `hf`'s greedy outputs and
the same seeded samples, whatever the slot count, prefill chunk, request order or memory budget."""

from __future__ import annotations

import collections

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from test_engine_support import TEST_DEVICE, make_model, make_tokenizer, mmlu_docs, one_torch_thread  # noqa: F401  (a fixture)
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from benchharness.engine import BenchEngineLM, attention, kv_slots
from benchharness.engine.autobatch import CPU_TOKEN_BUDGET

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_NEW = 16


def _requests(gen_kwargs: dict, n: int = 10, shots: str = "") -> list[Instance]:
    docs = mmlu_docs(n, seed=11)
    # lengths differ a lot, so joined rows need padding on either side
    prompts = [shots + d["question"] * (1 + i % 4) + "\nAnswer:" for i, d in enumerate(docs)]
    return [Instance("generate_until", {}, (p, dict(gen_kwargs)), i) for i, p in enumerate(prompts)]


def _ending_model(arch: str):
    """A tiny model whose EOS is a token it often emits (not first), so rows finish at different steps."""
    tokenizer = make_tokenizer(add_bos=arch.startswith("gemma"))
    model = make_model(arch, len(tokenizer))
    free = BenchEngineLM(model=model, tokenizer=tokenizer).generate_token_ids(
        _requests({"until": [], "do_sample": False, "max_gen_toks": MAX_NEW})
    )
    firsts = {ids[0] for ids in free}
    counts = collections.Counter(token for ids in free for token in set(ids[2:]) if token not in firsts)
    model.generation_config.eos_token_id = counts.most_common(1)[0][0]
    return model, tokenizer


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2-sliding"])
def test_refilled_slots_give_hflms_outputs_in_any_order_slot_count_and_chunk(arch):
    # gemma3 / qwen2-sliding: windows of a few tokens, far shorter than the prompts, so the joined
    # and trimmed sliding-window cache layers are exercised past their window.
    model, tokenizer = _ending_model(arch)
    requests = _requests({"until": ["\n\n"], "do_sample": False, "max_gen_toks": MAX_NEW})
    # lm-eval's hf one request at a time: no padding at all. (Batched, its left padding changes
    # qwen2-sliding's outputs here: 2 of 10 differ between its batch 1 and batch 3.)
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1).generate_until(requests)
    for slots, chunk in [(2, None), (3, 8), (64, None), (1, None)]:
        engine = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=slots, max_batch_tokens=chunk)
        assert engine.generate_until(requests) == reference, (slots, chunk)
        counts = engine.last_decode_counts
        assert counts.max_running <= slots
        if slots in (2, 3):
            assert counts.refills > 0  # prompts joined rows that were decoding
    reordered = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=3)
    assert reordered.generate_until(requests[::-1]) == reference[::-1]
    assert BenchEngineLM(model=model, tokenizer=tokenizer).generate_until(requests[::-1]) == reference[::-1]


@pytest.mark.skipif(TEST_DEVICE.type != "cpu", reason="decode steps skip padding with the CPU attention only")
@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_decode_steps_attend_in_row_groups_that_skip_padding_and_keep_hflms_outputs(arch, monkeypatch):
    """Tiny models' heads price an attention call at more slots than their prompts have, so their
    decode steps attend in one group; priced at nothing, every run of rows of one width is its own
    group. Both give hf's outputs, and the groups read fewer cache slots."""
    model, tokenizer = _ending_model(arch)
    requests = _requests({"until": ["\n\n"], "do_sample": False, "max_gen_toks": MAX_NEW})
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1).generate_until(requests)
    groups_made: list[int] = []
    row_groups = attention.row_groups

    def recording(first_visible: list[int], call_cost: int) -> list[tuple[int, int, int]]:
        groups = row_groups(first_visible, call_cost)
        groups_made.append(len(groups))
        return groups

    monkeypatch.setattr(attention, "row_groups", recording)
    reads = []
    for cost in (10**9, 0):
        monkeypatch.setattr(attention, "call_cost_slots", lambda kv_heads, head_dim, cost=cost: cost)
        groups_made.clear()
        engine = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=4)
        assert engine.generate_until(requests) == reference, cost
        assert engine.last_decode_counts.refills > 0
        assert (max(groups_made) > 1) == (cost == 0), cost
        reads.append(engine.stats.kv_slot_reads)
    assert reads[1] < reads[0]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("cascades", [True, False])
def test_a_shared_few_shot_prefix_is_kept_across_refills(arch, cascades):
    # gemma3: the prefix is longer than its window of 6, so the rests prefill, and every row
    # decodes, through the engine's own masks (the padding between prefix and rest is no token).
    # cascades: the prefix is held once and every row's attention reads it (cascade.py); else
    # each row's cache holds a copy.
    model, tokenizer = _ending_model(arch)
    shots = "".join(d["question"] + "\nAnswer: " + d["choices"][0] + "\n\n" for d in mmlu_docs(3, seed=5))
    requests = _requests({"until": ["\n\n"], "do_sample": False, "max_gen_toks": MAX_NEW}, n=8, shots=shots)
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3).generate_until(requests)
    engine = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=2, cascade_prefixes=cascades)
    assert engine.generate_until(requests) == reference
    assert engine.stats.generate_prefixes == 1
    assert engine.last_decode_counts.refills > 0
    assert engine.stats.draft_steps > 0
    held = engine.batch_info["shared_prefix_attention"]
    assert held == ("cascade" if cascades else "copied per row: cascade_prefixes=false")
    other = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=2, cascade_prefixes=not cascades)
    assert other.generate_until(requests) == reference
    # Held once, the prefix is read once per step for both rows, not once per row.
    assert (engine.stats.kv_slot_reads < other.stats.kv_slot_reads) == cascades
    whole = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=2, share_prefixes=False)
    assert whole.generate_until(requests) == reference
    assert engine.stats.prefill_tokens < 0.6 * whole.stats.prefill_tokens


@pytest.mark.parametrize("arch", ["gemma3", "mistral", "gemma2"])
@pytest.mark.parametrize("chunk_tokens", [1024, 12])
def test_a_prefill_after_a_prefix_longer_than_the_window_gives_each_prompt_its_own_states(arch, chunk_tokens):
    """Rests of 3-25 tokens, left-padded after a 40-token prefix (windows of 6-8): each row's last
    hidden state is the one the model gives the prompt alone, whole or in chunks of a few columns
    (the sliding layers keep each row's last window - 1 tokens between chunks)."""
    from benchharness.engine.continuous import Prompt, _Prefill
    from benchharness.engine.head import split_model
    from benchharness.engine.scoring import run_prefix

    model = make_model(arch, 400)
    split = split_model(model)
    generator = torch.Generator().manual_seed(3)
    shared = torch.randint(3, 400, (40,), generator=generator).tolist()
    rests = [torch.randint(3, 400, (n,), generator=generator).tolist() for n in (25, 3, 10)]
    prefix = run_prefix(split, shared)
    prompts = [Prompt(i, tuple(shared + rest), prefix) for i, rest in enumerate(rests)]
    prefill = _Prefill(split, prompts, pad_token_id=0, chunk_tokens=chunk_tokens, windowed=True)
    while not prefill.done:
        prefill.step()
    assert prefill.hidden is not None
    with torch.inference_mode():
        for b, prompt in enumerate(prompts):
            alone = split.forward_body(input_ids=torch.tensor([prompt.tokens], device=TEST_DEVICE)).last_hidden_state[0, -1]
            torch.testing.assert_close(prefill.hidden[b], alone, atol=2e-4, rtol=2e-4)


def test_seeded_samples_do_not_depend_on_slots_or_order():
    model, tokenizer = _ending_model("qwen2")
    requests = _requests({"until": [], "do_sample": True, "temperature": 3.0, "max_gen_toks": MAX_NEW})
    first = BenchEngineLM(model=model, tokenizer=tokenizer, seed=5).generate_until(requests)
    for slots in (1, 3):
        assert BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=slots, seed=5).generate_until(requests) == first
    assert BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=3, seed=5).generate_until(requests[::-1]) == first[::-1]
    assert BenchEngineLM(model=model, tokenizer=tokenizer, seed=6).generate_until(requests) != first


def test_the_kv_budget_bounds_the_slots_and_is_recorded():
    model, tokenizer = _ending_model("llama")
    requests = _requests({"until": [], "do_sample": False, "max_gen_toks": MAX_NEW})
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3).generate_until(requests)
    roomy = BenchEngineLM(model=model, tokenizer=tokenizer)
    roomy.generate_until(requests)
    per_token = roomy.generation_plan.kv_bytes_per_token
    # layers x (keys + values) x kv heads x head dim x 4 bytes, from the model's config
    config = model.config
    assert per_token == config.num_hidden_layers * 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4
    longest = max(len(tokenizer(r.args[0])["input_ids"]) for r in requests)
    # room for two rows at their longest, with the slot buffers' spare slots
    budget = 2 * per_token * (longest + MAX_NEW + kv_slots.SlotLayer.spare_slots) + per_token
    tight = BenchEngineLM(model=model, tokenizer=tokenizer, kv_cache_bytes=budget)
    assert tight.generate_until(requests) == reference
    assert tight.generation_plan.slots == 2
    assert tight.last_decode_counts.max_running == 2
    info = tight.batch_info
    assert info["kv_budget_bytes"] == budget
    assert info["generation"]["slots"] == 2 and info["generation"]["refill"] is True


class _OtherLayer(DynamicLayer):
    """A layer kind the slot code does not know (as a linear-attention or indexer layer would be)."""


def test_unknown_cache_layers_are_refused_and_decode_in_static_batches(monkeypatch):
    cache = DynamicCache()
    cache.layers.append(_OtherLayer())
    with pytest.raises(kv_slots.UnsupportedCacheError, match="_OtherLayer"):
        kv_slots.check_layers(cache)

    model, tokenizer = _ending_model("llama")
    requests = _requests({"until": [], "do_sample": False, "max_gen_toks": MAX_NEW})
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3).generate_until(requests)

    def refuse(_cache: DynamicCache) -> None:
        raise kv_slots.UnsupportedCacheError("cache layer _OtherLayer cannot take rows of another batch")

    monkeypatch.setattr(kv_slots, "check_layers", refuse)
    engine = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=3, share_prefixes=False)
    assert engine.generate_until(requests) == reference
    assert engine.last_decode_counts.refills == 0
    assert engine.batch_info["generation"]["refill"] is False
    assert "_OtherLayer" in engine.batch_info["generation"]["reason"]


def _slot_cache(*layers: DynamicLayer) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = list(layers)
    return cache


def test_join_and_trim_keep_each_rows_keys_at_the_right_end():
    keys = torch.arange(2 * 1 * 3 * 1, dtype=torch.float32).reshape(2, 1, 3, 1)
    a, b = _slot_cache(kv_slots.SlotLayer()), _slot_cache(kv_slots.SlotLayer())
    a.update(keys, keys, 0)
    b.update(torch.ones(1, 1, 5, 1), torch.ones(1, 1, 5, 1), 0)
    assert kv_slots.join(a, 3, b, 5) == 5
    joined = a.layers[0].keys[:, 0, :, 0]
    assert joined.tolist() == [[0, 0, 0, 1, 2], [0, 0, 3, 4, 5], [1, 1, 1, 1, 1]]
    assert kv_slots.trim(a, 5, 2) == 3
    assert a.layers[0].keys[:, 0, :, 0].tolist() == [[0, 1, 2], [3, 4, 5], [1, 1, 1]]


def test_a_join_places_rows_in_the_order_given_and_refuses_an_order_that_is_not_one():
    a, b = _slot_cache(kv_slots.SlotLayer()), _slot_cache(kv_slots.SlotLayer())
    a.update(torch.arange(2.0).reshape(2, 1, 1, 1), torch.zeros(2, 1, 1, 1), 0)
    b.update(torch.full((1, 1, 2, 1), 7.0), torch.zeros(1, 1, 2, 1), 0)
    with pytest.raises(ValueError, match="each of the 3 rows once"):
        kv_slots.join(a, 1, b, 2, order=[0, 0, 1])
    assert kv_slots.join(a, 1, b, 2, order=[2, 0, 1]) == 2
    assert a.layers[0].keys[:, 0, :, 0].tolist() == [[7, 7], [0, 0], [0, 1]]


def test_fill_order_keeps_rows_in_place_and_fills_gaps_from_the_end():
    assert kv_slots.fill_order(6, [0, 2, 3, 5]) == [0, 5, 2, 3]  # rows 1 and 4 leave
    assert kv_slots.fill_order(5, [2, 3, 4]) == [4, 3, 2]  # rows 0 and 1 leave
    assert kv_slots.fill_order(4, [0, 1, 2]) == [0, 1, 2]  # the last row leaves
    assert kv_slots.fill_order(3, []) == []  # every row leaves


def test_a_sliding_layer_holding_window_tokens_keeps_each_rows_last_window_minus_one_tokens():
    # Window 4: each row needs its last 3 tokens. Row 0's sit in the last 3 slots; row 1's last 3
    # span 5 slots (two masked slots between them, as rejected drafts leave); row 2 has 2 tokens.
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 0, 1], [0, 0, 0, 0, 1, 1]])
    assert kv_slots.window_token_slots(mask, 4) == 5
    assert kv_slots.window_token_slots(mask[[0, 2]], 4) == 3
    assert kv_slots.window_token_slots(mask[[1]], 8) == 6  # fewer tokens than the window: all of them
    assert kv_slots.window_token_slots(mask[[2]], 8) == 2
    cache = _slot_cache(kv_slots.SlidingSlotLayer(sliding_window=4))
    kv_slots.hold_window_tokens(cache)
    cache.update(torch.arange(18.0).reshape(3, 1, 6, 1), torch.zeros(3, 1, 6, 1), 0)
    assert kv_slots.sliding_slots(cache) == 6  # kept whole until trimmed (transformers' layer keeps 3)
    kv_slots.keep_window_tokens(cache, mask)
    assert cache.layers[0].keys[1, 0, :, 0].tolist() == [7, 8, 9, 10, 11]
    # A join and a trim keep what the layer holds beyond window - 1.
    incoming = _slot_cache(kv_slots.SlidingSlotLayer(sliding_window=4))
    incoming.update(torch.ones(1, 1, 2, 1), torch.ones(1, 1, 2, 1), 0)
    assert kv_slots.join(cache, 6, incoming, 2) == 6
    assert kv_slots.sliding_slots(cache) == 5
    assert cache.layers[0].keys[3, 0, :, 0].tolist() == [0, 0, 0, 1, 1]
    kv_slots.trim(cache, 6, 2)
    assert kv_slots.sliding_slots(cache) == 4


def _stock_join(layer: DynamicLayer, incoming: DynamicLayer, joined: int) -> None:
    """What `kv_slots.join` did with transformers' own layers: left-pad both sides, concatenate."""
    width = min(joined, layer.sliding_window - 1) if isinstance(layer, DynamicSlidingWindowLayer) else joined

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, 0, width - t.shape[-2], 0))

    layer.keys = torch.cat([pad(layer.keys), pad(incoming.keys)])
    layer.values = torch.cat([pad(layer.values), pad(incoming.values)])
    if isinstance(layer, DynamicSlidingWindowLayer):
        layer.cumulative_length = joined


def _stock_trim(layer: DynamicLayer, kept: int) -> None:
    width = min(kept, layer.sliding_window - 1) if isinstance(layer, DynamicSlidingWindowLayer) else kept
    layer.keys = layer.keys[:, :, layer.keys.shape[-2] - width :]
    layer.values = layer.values[:, :, layer.values.shape[-2] - width :]
    if isinstance(layer, DynamicSlidingWindowLayer):
        layer.cumulative_length = kept


def test_slot_buffers_hold_what_transformers_layers_hold_through_steps_leaves_trims_and_joins():
    """A random run of the engine's cache operations on a full and a sliding layer (window 6):
    the buffered layers return and hold exactly what transformers' concatenating layers do,
    and a decode step writes into the buffer it already has (no copy of the cache)."""
    generator = torch.Generator().manual_seed(3)

    def states(rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        # values of another head size than keys, as in DeepSeek's latent attention
        return torch.randn(rows, 2, length, 3, generator=generator), torch.randn(rows, 2, length, 2, generator=generator)

    def fresh(prefill: int, rows: int) -> tuple[DynamicCache, list[DynamicLayer], int]:
        cache = _slot_cache(kv_slots.SlotLayer(), kv_slots.SlidingSlotLayer(sliding_window=6))
        stock = [DynamicLayer(), DynamicSlidingWindowLayer(sliding_window=6)]
        for chunk in (prefill // 2, prefill - prefill // 2):  # a prefill in two chunks
            for index in range(2):
                keys, values = states(rows, chunk)
                got = cache.layers[index].update(keys, values)
                want = stock[index].update(keys, values)
                assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        return cache, stock, prefill

    cache, stock, slots = fresh(prefill=5, rows=3)
    steps_without_copy = 0
    for step in range(60):
        buffers = [layer._buffers[0].data_ptr() for layer in cache.layers]
        for index in range(2):
            keys, values = states(len(cache.layers[0].keys), 1)
            got = cache.layers[index].update(keys, values)
            want = stock[index].update(keys, values)
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), (step, index)
        slots += 1
        steps_without_copy += buffers == [layer._buffers[0].data_ptr() for layer in cache.layers]
        rows = len(cache.layers[0].keys)
        if step % 7 == 3 and rows > 1:  # rows leave, then the slots every row masks are dropped
            leaving = sorted({step % rows, (3 * step) % rows})[: rows - 1]
            if step % 2:  # the engine's order: rows from the end fill the gaps, only they move
                keep = torch.tensor(kv_slots.fill_order(rows, [b for b in range(rows) if b not in leaving]))
            else:  # any other order: the kept rows are gathered
                keep = torch.tensor([b for b in range(rows) if b not in leaving][::-1])
            cache.batch_select_indices(keep)
            for layer in stock:
                layer.batch_select_indices(keep)
            drop = step % 3
            slots = kv_slots.trim(cache, slots, drop)
            if drop:
                for layer in stock:
                    _stock_trim(layer, slots)
        if step % 11 == 5:  # newcomers join, shorter or longer than the running rows
            other, other_stock, other_slots = fresh(prefill=[2, 9, 40][step % 3], rows=2)
            total = len(cache.layers[0].keys) + 2
            # the engine's widest-first order, here any permutation; or none: the rows one after the other
            order = torch.randperm(total, generator=generator).tolist() if step % 2 else None
            joined = kv_slots.join(cache, slots, other, other_slots, order=order)
            for layer, incoming in zip(stock, other_stock, strict=True):
                _stock_join(layer, incoming, joined)
                if order is not None:
                    layer.batch_select_indices(torch.tensor(order))
            slots = joined
        for mine, theirs in zip(cache.layers, stock, strict=True):
            assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values), step
            assert mine.get_seq_length() == theirs.get_seq_length(), step
            assert mine.get_mask_sizes(1) == theirs.get_mask_sizes(1), step
    assert steps_without_copy >= 45  # steps that wrote into the buffers they had


def test_continuous_batching_can_be_turned_off_as_a_reference():
    model, tokenizer = _ending_model("llama")
    requests = _requests({"until": ["\n\n"], "do_sample": False, "max_gen_toks": MAX_NEW})
    refilled = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=3)
    static = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=3, continuous_batching="false")
    assert static.generate_until(requests) == refilled.generate_until(requests)
    assert refilled.last_decode_counts.refills > 0 and static.last_decode_counts.refills == 0
    assert static.batch_info["generation"]["refill"] is False
    assert static.batch_info["generation"]["reason"] == "continuous_batching=false"


def test_an_admission_takes_neighbours_of_the_same_prefix_within_the_token_budget():
    from benchharness.engine.continuous import Prompt, _admission
    from benchharness.engine.scoring import PrefixState

    queue = [Prompt(i, tuple(range(n))) for i, n in enumerate([50, 40, 30, 30, 10, 10])]
    assert [p.index for p in _admission(queue, free=8, chunk_tokens=100)] == [0, 1]  # 3 x 50 > 100
    assert [p.index for p in _admission(queue[2:], free=8, chunk_tokens=100)] == [2, 3, 4]  # 4 x 30 > 100
    assert [p.index for p in _admission(queue[2:], free=2, chunk_tokens=100)] == [2, 3]  # two free slots
    assert [p.index for p in _admission(queue, free=8, chunk_tokens=10)] == [0]  # wider than the budget: alone
    # the budget counts the rest after a shared prefix, and a new prefix starts a new admission
    prefix = PrefixState(length=20, layers=[])
    shared = [Prompt(i, tuple(range(24)), prefix) for i in range(3)] + [Prompt(3, tuple(range(24)))]
    assert [p.index for p in _admission(shared, free=8, chunk_tokens=12)] == [0, 1, 2]


# ---------------------------------------------------------------- prompt-lookup drafts

def _brute_force_draft(tokens: list[int], length: int) -> list[int]:
    """The tokens after the latest earlier occurrence of the longest suffix (3 down to 1) that occurred before."""
    for n in (3, 2, 1):
        for start in range(len(tokens) - n - 1, -1, -1):  # empty unless n tokens came before the suffix
            if tokens[start : start + n] == tokens[len(tokens) - n :]:
                return tokens[start + n : start + n + length]
    return []


def test_the_ngram_index_drafts_what_follows_the_latest_earlier_occurrence():
    from benchharness.engine.prompt_lookup import NgramIndex

    generator = torch.Generator().manual_seed(3)
    for trial in range(30):
        tokens = torch.randint(0, 3 + trial % 6, (40,), generator=generator).tolist()
        index = NgramIndex(tokens[:5])
        for end in range(5, 41):
            for length in (1, 4):
                assert index.draft(length) == _brute_force_draft(tokens[:end], length), (trial, end)
            if end < 40:
                index.extend(tokens[end : end + 1])
    assert NgramIndex([1, 2, 3]).draft(4) == []  # nothing occurred twice
    assert NgramIndex([7, 8, 9, 7, 8]).draft(4) == [9, 7, 8]  # 7 8 came before, then 9 7 8


def _oracle_index(references: dict[tuple[int, ...], list[int]], vocab: int, used: list[int]):
    """An NgramIndex whose drafts are the row's own reference output (what a row decoding alone
    generates), every fifth or so token changed: drafts the model mostly agrees with, rejected
    at varied places, running past EOS, stop strings and the token limit."""
    from benchharness.engine.prompt_lookup import NgramIndex

    class Oracle(NgramIndex):
        def __init__(self, tokens):
            super().__init__(tokens)
            self.prompt_length = len(self.tokens)
            self.reference = references[tuple(self.tokens)]

        def draft(self, length):
            done = len(self.tokens) - self.prompt_length
            draft = (self.reference[done : done + length] + [5] * length)[:length]
            used.append(len(draft))
            return [(t + 1) % vocab if (done * 7 + j * 3) % 5 == 0 else t for j, t in enumerate(draft)]

    return Oracle


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "qwen2-sliding", "mistral", "gemma2"])
def test_prompt_lookup_drafts_keep_hflms_greedy_outputs(arch, monkeypatch):
    # gemma3 / qwen2-sliding / mistral / gemma2: windows of 6-8 tokens, far shorter than the prompts,
    # so rejected drafts leave masked slots inside the windows, which the engine's own masks must
    # not count (mistral: every layer slides, one mask; gemma2: eager attention, additive masks).
    from benchharness.engine import continuous

    model, tokenizer = _ending_model(arch)
    requests = _requests({"until": ["\n\n"], "do_sample": False, "max_gen_toks": MAX_NEW})
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1).generate_until(requests)
    plain = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=3, prompt_lookup_tokens=0)
    assert plain.generate_until(requests) == reference
    assert plain.stats.draft_steps == 0 and plain.batch_info["prompt_lookup"]["reason"] == "prompt_lookup_tokens=0"
    # The real index: drafts wherever the text repeats (a tiny random model seldom repeats itself).
    looked_up = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=3, lookup_step_tokens=1000)
    assert looked_up.generate_until(requests) == reference
    assert looked_up.stats.draft_tokens > 0
    # Drafts the model mostly agrees with: most tokens come from drafts, at every slot count.
    own = plain.generate_token_ids(requests)
    references = {tuple(tokenizer(r.args[0])["input_ids"]): ids for r, ids in zip(requests, own)}
    used: list[int] = []
    monkeypatch.setattr(continuous, "NgramIndex", _oracle_index(references, len(tokenizer), used))
    for slots, draft_tokens in [(1, 4), (3, 2), (64, 4)]:
        used.clear()
        engine = BenchEngineLM(
            model=model, tokenizer=tokenizer, batch_size=slots, prompt_lookup_tokens=draft_tokens, lookup_step_tokens=1000
        )
        assert engine.generate_until(requests) == reference, slots
        stats = engine.stats
        assert stats.accepted_drafts > 0.3 * stats.generated_tokens, (slots, stats)
        assert stats.draft_tokens > stats.accepted_drafts  # some were rejected, leaving masked slots
        assert max(used) == draft_tokens
        assert engine.generate_token_ids(requests) == own, slots  # EOS where the row decoding alone puts it
    # The step's token cap: rows x (1 + draft) <= 12, so 3 rows draft 3 tokens each, 2 rows the
    # 4 asked for, 6 rows 1, and from 7 rows on none; drafts start as rows finish.
    # The CPU's fixed token budget on any device: admissions, and so the rows running at each step,
    # as on a CPU (a GPU's budget admits all ten prompts at once, and they run side by side to the end).
    capped = BenchEngineLM(model=model, tokenizer=tokenizer, lookup_step_tokens=12, max_batch_tokens=CPU_TOKEN_BUDGET)
    assert capped.generate_until(requests) == reference
    assert [capped.lookup_plan.draft_length(rows) for rows in (1, 2, 3, 6, 7, 13)] == [4, 4, 3, 1, 0, 0]
    assert 0 < capped.stats.draft_steps < capped.stats.decode_steps


def test_prompt_lookup_is_off_where_drafts_could_change_outputs():
    from benchharness.engine.generation import DecodeSettings
    from benchharness.engine.head import split_model
    from benchharness.engine.masks import takes_custom_masks
    from benchharness.engine.prompt_lookup import plan_lookup

    # Sliding windows take drafts only where the engine can build their masks itself.
    model, tokenizer = _ending_model("gemma3")
    split = split_model(model)
    assert takes_custom_masks(split) == ""
    model.config._attn_implementation = "flex_attention"
    assert "flex_attention" in takes_custom_masks(split)
    model.config._attn_implementation = "sdpa"
    greedy = DecodeSettings(max_new_tokens=MAX_NEW, stop_strings=(), eos_token_ids=frozenset({1}))
    assert plan_lookup(greedy, 4, 24).draft_tokens == 4
    off = plan_lookup(greedy, 4, 24, takes_custom_masks(split) or "no custom masks")
    assert off.draft_tokens == 0 and off.reason == "sliding-window layers (no custom masks)"
    model, tokenizer = _ending_model("llama")
    sampled = BenchEngineLM(model=model, tokenizer=tokenizer)
    sampled.generate_until(_requests({"until": [], "do_sample": True, "temperature": 3.0, "max_gen_toks": MAX_NEW}, n=3))
    assert sampled.stats.draft_steps == 0 and sampled.lookup_plan.reason.startswith("sampling")
    penalized = BenchEngineLM(model=model, tokenizer=tokenizer)
    penalized.generate_until(_requests({"until": [], "do_sample": False, "repetition_penalty": 1.3, "max_gen_toks": MAX_NEW}, n=3))
    assert penalized.stats.draft_steps == 0 and penalized.lookup_plan.reason.startswith("repetition_penalty")
    with pytest.raises(ValueError, match="prompt_lookup_tokens must be a whole number"):
        BenchEngineLM(model=model, tokenizer=tokenizer, prompt_lookup_tokens="four")


def test_the_schedule_replay_counts_the_engines_own_steps(monkeypatch):
    """benchmarks/schedule_replay.py prices other schedules by replaying the continuous loop on a
    run's outputs; replaying the engine's own schedule must give the engine's own decode steps and
    prefill tokens: with drafts the model mostly accepts, rows leaving within their drafts, at
    several slot counts, and with prompts prefilled a few columns at a time."""
    from pathlib import Path

    from benchharness.engine import continuous
    from benchharness.engine.prompt_lookup import LookupPlan

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import schedule_replay

    model, tokenizer = _ending_model("qwen2")
    # More prompts than 16 slots: admissions wait for 16 // 8 free slots, as the replay must.
    requests = _requests({"until": ["\n\n"], "do_sample": False, "max_gen_toks": MAX_NEW}, n=24)
    own = BenchEngineLM(model=model, tokenizer=tokenizer, prompt_lookup_tokens=0).generate_token_ids(requests)
    references = {tuple(tokenizer(r.args[0])["input_ids"]): ids for r, ids in zip(requests, own)}
    oracle = _oracle_index(references, len(tokenizer), [])
    monkeypatch.setattr(continuous, "NgramIndex", oracle)
    monkeypatch.setattr(schedule_replay, "NgramIndex", oracle)
    roof = schedule_replay.Roofline(body_params=10, head_params=3, body_bytes=40, head_bytes=12, peak=1.0, bandwidth=1.0)
    seen = set()
    for slots, chunk in [(1, None), (3, None), (3, 8), (16, None), (64, None)]:
        engine = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=slots, max_batch_tokens=chunk, lookup_step_tokens=1000)
        run = schedule_replay.record(engine, requests)
        assert sorted(tuple(o) for _, o in run["prompts"]) == sorted(map(tuple, own))  # the run's outputs, each once
        assert engine.stats.accepted_drafts > 0 and run["slots"] == slots
        prompts = [(p, o) for p, o in run["prompts"]]
        replayed = schedule_replay.replay(
            prompts, list(range(len(prompts))), run["slots"], LookupPlan(*run["lookup"]), run["max_new"], run["chunk_tokens"], roof
        )
        assert (replayed.steps, replayed.prefill_tokens) == (run["steps"], run["prefill_tokens"]), (slots, chunk)
        assert replayed.seconds > 0
        seen.add(run["steps"])
    assert len(seen) > 1  # the slot counts gave different schedules
