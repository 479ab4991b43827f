"""Continuous batching for generate_until: a pool of decoding slots that is refilled as
sequences finish.

The loop: while slots are free and prompts wait, the next prompts are prefilled (their
own left-padded batch of similar lengths within the token budget; a single prompt longer
than the budget in chunks; one forward between two decode steps of the running rows) and
join the running batch's cache
(`kv_slots.join`); every step picks one token for each running row, rows that finish
(EOS, a stop string, the token limit) leave, and cache slots no row uses any more are
dropped. Prompts that share a prefix (few-shot examples) are prefilled from the prefix's
keys and values, run once. While few rows run, a greedy step may also carry each row's
prompt-lookup draft (`prompt_lookup.py`), checked token by token against the model's argmax;
the draft tokens it rejects stay in the cache as masked slots, as does the padding between a
shared prefix and a prompt's rest, so a model with sliding-window layers decodes (and
prefills after a prefix) through the engine's own masks, which count a window in tokens
(`masks.token_masks`).

What a row computes depends only on its own tokens: the attention mask hides every
other row and every padding slot, positions count the row's own tokens, and sampling
draws from a generator seeded by the run seed and the prompt. So which rows share a
step, and when a prompt is admitted, do not change its output (up to the float noise of
the matmul shapes, as for lm-eval's own batches); the tests check outputs across slot
counts and orders, and against lm-eval's `hf` model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from transformers import DynamicCache

from benchharness.engine import cascade, kv_slots
from benchharness.engine.attention import first_visible, slots_read
from benchharness.engine.generation import DecodeSettings, process_logits, sample_tokens, sequence_generator
from benchharness.engine.head import SplitModel
from benchharness.engine.masks import token_masks, windows_unmasked
from benchharness.engine.prompt_lookup import LookupPlan, NgramIndex
from benchharness.engine.reasoning import stops_answer
from benchharness.engine.scoring import PrefixState


@dataclass(frozen=True)
class Prompt:
    """One request to decode: its index in the caller's list, its tokens, and the shared prefix
    it starts with (None: run whole). Prompts with the same prefix object share its cache."""

    index: int
    tokens: tuple[int, ...]
    prefix: PrefixState | None = None
    max_new_tokens: int | None = None  # this prompt's own limit (None: the settings')
    starts_open: bool = False  # the prompt leaves a reasoning block open (reasoning.opens_block)


@dataclass
class SlotPlan:
    """How many rows decode at once, and what bounds it."""

    slots: int
    kv_budget_bytes: int | None  # None: no memory bound applied
    kv_bytes_per_token: int
    refill: bool  # False: the cache's layer kinds cannot take rows of another batch (static batches)
    reason: str = ""  # why refill is off, if it is

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class DecodeCounts:
    """What one `generate` call cost, and per-request timings."""

    prefill_tokens: int = 0  # rows x padded rest length, over every admission
    admissions: int = 0  # prefill batches
    refills: int = 0  # admissions that joined rows already decoding
    decode_steps: int = 0  # forwards of one token per running row
    generated_tokens: int = 0
    decode_rows: int = 0  # running rows summed over decode steps (mean batch = decode_rows / decode_steps)
    kv_slot_reads: int = 0  # cache slots each row's attention reads, summed over rows and decode steps
    decode_seconds: float = 0.0  # wall time of the decode steps (output layer, token choice, body), prefills excluded
    draft_steps: int = 0  # decode steps that ran prompt-lookup drafts (prompt_lookup.py)
    draft_tokens: int = 0  # draft tokens run
    accepted_drafts: int = 0  # draft tokens the model chose itself (kept as output)
    max_running: int = 0
    first_token_s: dict[int, float] = field(default_factory=dict)  # per request: seconds from start to first token
    finish_s: dict[int, float] = field(default_factory=dict)  # per request: seconds from start to its last token


@dataclass
class _Row:
    prompt: Prompt
    outputs: list[int]
    generator: torch.Generator | None
    history: list[int] | None
    lookup: NgramIndex | None  # prompt + output, for drafts (None: drafts off)


@dataclass
class _Running:
    """The rows decoding now: their cache, attention mask [rows, slots], last positions, and
    the hidden state of each row's last token (the next logits come from it). `logits`: those
    next logits (processed), where a step with drafts computed them already."""

    rows: list[_Row]
    cache: DynamicCache
    mask: torch.Tensor
    positions: torch.Tensor
    hidden: torch.Tensor
    logits: torch.Tensor | None = None

    @property
    def slots(self) -> int:
        return int(self.mask.shape[1])


class _Prefill:
    """Newcomers' prompts, left-padded into one batch and run chunk by chunk."""

    def __init__(
        self, split: SplitModel, prompts: list[Prompt], pad_token_id: int, chunk_tokens: int, windowed: bool = False, cascades: bool = False
    ) -> None:
        self.split = split
        self.prompts = prompts
        prefix = prompts[0].prefix
        shared = prefix.length if prefix is not None else 0
        rests = [list(p.tokens[shared:]) for p in prompts]
        if any(not rest for rest in rests):
            raise ValueError("a shared prefix must leave at least one token of every prompt")
        width = max(len(rest) for rest in rests)
        n = len(prompts)
        ids = torch.full((n, width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for b, rest in enumerate(rests):
            ids[b, width - len(rest) :] = torch.tensor(rest, dtype=torch.long)
            mask[b, width - len(rest) :] = 1
        device = split.device
        self.ids = ids.to(device)
        # As transformers.generate: positions count real tokens; padding gets position 0 (masked anyway).
        self.positions = ((mask.cumsum(-1) - 1).masked_fill(mask == 0, 0) + shared).to(device)
        mask = mask.to(device)
        # With `cascades`, the cache holds the rests only and the attention reads the prefix once
        # for all rows (cascade.py); else each row's cache starts with a copy of it.
        self.cascades = cascades and prefix is not None
        if prefix is not None and not cascades:
            self.cache = kv_slots.cache_from_prefix(split.config, prefix.layers, n)
            mask = torch.cat([mask.new_ones((n, shared)), mask], dim=1)
        else:
            self.cache = kv_slots.new_cache(split.config)
        self.mask = mask
        self.before = int(mask.shape[1]) - width  # mask columns before the rests (a copied prefix)
        # The padding between a copied prefix and a row's rest would shift a window counted in slots.
        self.windowed = windowed and self.before > 0
        self.width = width
        self.done_columns = 0
        self.chunk = prefill_chunk(n, width, chunk_tokens)
        self.hidden: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return len(self.prompts) * self.width

    @property
    def done(self) -> bool:
        return self.hidden is not None

    def step(self) -> None:
        start = self.done_columns
        stop = min(self.width, start + self.chunk)
        mask = self.mask[:, : self.before + stop]
        attention_mask: torch.Tensor | dict[str, torch.Tensor] = mask
        if self.windowed:
            kv_slots.hold_window_tokens(self.cache)
            attention_mask = token_masks(self.split, mask, stop - start, kv_slots.sliding_slots(self.cache) + stop - start)
        positions = self.positions[:, start:stop]
        out = self.split.forward_body(
            shared_prefixes=cascade.group_rows([p.prefix for p in self.prompts], positions) if self.cascades else None,
            input_ids=self.ids[:, start:stop],
            attention_mask=attention_mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        ).last_hidden_state
        if self.windowed:
            kv_slots.keep_window_tokens(self.cache, mask)
        self.done_columns = stop
        if stop == self.width:
            self.hidden = out[:, -1]


def prefill_chunk(rows: int, width: int, chunk_tokens: int) -> int:
    """Columns per prefill forward of `rows` left-padded rests `width` wide: the whole batch when it
    fits `chunk_tokens`, else equal slices."""
    return max(1, chunk_tokens // rows) if rows * width > chunk_tokens else width


def admission_threshold(slots: int) -> int:
    """Free slots to wait for before admitting (`generate`'s `admit_at_least`): an eighth of them,
    so that prefills are not single short rows."""
    return max(1, slots // 8)


def _rest_length(prompt: Prompt) -> int:
    return len(prompt.tokens) - (prompt.prefix.length if prompt.prefix is not None else 0)


def _admission(pending: list[Prompt], free: int, chunk_tokens: int) -> list[Prompt]:
    """The next prompts to prefill together: consecutive ones with the same prefix, at most `free`,
    and only while the left-padded batch (rows x longest rest) fits in `chunk_tokens`. A batch
    wider than the budget would be run a few columns at a time, and a batch of mixed lengths
    computes its padding: both cost more than several batches of similar length (the queue is
    sorted longest first, so neighbours are similar)."""
    take = [pending[0]]
    width = _rest_length(pending[0])
    for candidate in pending[1:free]:
        wider = max(width, _rest_length(candidate))
        if candidate.prefix is not take[0].prefix or (len(take) + 1) * wider > chunk_tokens:
            break
        take.append(candidate)
        width = wider
    return take


def _widest_first(mask: torch.Tensor) -> list[int]:
    """Rows in the order of their first unmasked slot (widest first; ties keep their order), so that
    rows of similar width are neighbours and the attention reads each run of them from its own
    first slot on (attention.row_groups), not from the widest row's."""
    first = first_visible(mask)
    return sorted(range(len(first)), key=first.__getitem__)


def _join(running: _Running | None, prefill: _Prefill, rows: list[_Row]) -> _Running:
    assert prefill.hidden is not None
    if running is None:
        return _Running(rows, prefill.cache, prefill.mask, prefill.positions[:, -1], prefill.hidden)
    slots = max(running.slots, int(prefill.mask.shape[1]))
    mask = torch.cat([torch.nn.functional.pad(m, (slots - m.shape[1], 0)) for m in (running.mask, prefill.mask)], dim=0)
    # The cache is written anew here anyway, so the rows take their widest-first places for free
    # (a row's place in the batch does not change its output).
    order = _widest_first(mask)
    kv_slots.join(running.cache, running.slots, prefill.cache, prefill.mask.shape[1], order=order)
    index = torch.tensor(order, dtype=torch.long, device=mask.device)
    every = running.rows + rows
    return _Running(
        [every[b] for b in order],
        running.cache,
        mask.index_select(0, index),
        torch.cat([running.positions, prefill.positions[:, -1]]).index_select(0, index),
        torch.cat([running.hidden, prefill.hidden]).index_select(0, index),
    )


def _leave(running: _Running, rows: int, keep: list[int]) -> torch.Tensor:
    """Drop the rows not in `keep` from `running` (of `rows` rows); return the index of the kept
    rows in their new order, for the caller's own per-row tensors."""
    # Rows from the end fill the gaps, so the cache copies only the rows that move (a
    # row's place in the batch does not change its output, as rows leaving never did).
    order = kv_slots.fill_order(rows, keep)
    index = torch.tensor(order, dtype=torch.long, device=running.mask.device)
    running.cache.batch_select_indices(index)
    running.rows = [running.rows[b] for b in order]
    running.mask = running.mask.index_select(0, index)
    running.positions = running.positions.index_select(0, index)
    running.hidden = running.hidden.index_select(0, index)
    if running.logits is not None:
        running.logits = running.logits.index_select(0, index)
    unused = int((running.mask.sum(dim=0) == 0).long().cumprod(dim=0).sum())  # leading slots no row uses
    if unused:
        kv_slots.trim(running.cache, running.slots, unused)
        running.mask = running.mask[:, unused:]
    return index


@torch.inference_mode()
def generate(
    split: SplitModel,
    prompts: Sequence[Prompt],
    settings: DecodeSettings,
    plan: SlotPlan,
    pad_token_id: int,
    decode: Callable[[list[int]], str],
    chunk_tokens: int = 1024,
    admit_at_least: int = 1,
    on_finish: Callable[[int, list[int]], None] | None = None,
    lookup: LookupPlan | None = None,
    cascades: bool = False,
) -> tuple[dict[int, list[int]], DecodeCounts]:
    """Decode every prompt; return its new tokens (a final EOS included) by `Prompt.index`.

    Prompts are admitted in the order given; consecutive prompts with the same prefix are
    prefilled together. `plan.slots` rows decode at once; with `plan.refill` off, a new
    batch is admitted only when the running one has finished (static batches).
    `admit_at_least`: wait until this many slots are free (or no more prompts wait) before
    admitting, so that prefills are not single short rows; it changes timing, never outputs.
    `on_finish(index, tokens)` is called as each request finishes.
    `lookup`: prompt-lookup drafts (prompt_lookup.py; None or 0 draft tokens: one token per
    row and step). Greedy outputs are the same either way.
    `cascades`: rows keep only their own tokens in the cache and attend to their shared prefix's
    keys and values held once (cascade.py; `cascade.cascade_reason` says where it can run).
    """
    device = split.device
    started = time.perf_counter()
    counts = DecodeCounts()
    pending = list(prompts)
    results: dict[int, list[int]] = {}
    running: _Running | None = None
    prefill: _Prefill | None = None
    prefill_rows: list[_Row] = []
    drafting = lookup is not None and lookup.draft_tokens > 0  # rows keep an n-gram index
    # Rejected drafts and shared prefixes leave masked slots between a row's tokens: sliding
    # windows then attend through the engine's own masks, which count a window in tokens.
    windowed = split.sliding_window is not None and not windows_unmasked(split)

    def finish(row: _Row) -> None:
        results[row.prompt.index] = row.outputs
        counts.finish_s[row.prompt.index] = time.perf_counter() - started
        if on_finish is not None:
            on_finish(row.prompt.index, row.outputs)

    def take(row: _Row, token: int) -> bool:
        """Append `token` to the row's output; True (and the row finished) if it ends there."""
        row.outputs.append(token)
        counts.generated_tokens += 1
        if token in settings.eos_token_ids:
            # The EOS token stays in the output, as in transformers.generate: decoding with
            # skip_special_tokens drops it when it is a special token, as lm-eval's hf does.
            finish(row)
            return True
        if row.history is not None:
            row.history.append(token)
        if row.lookup is not None:
            row.lookup.extend((token,))
        if len(row.outputs) >= _token_limit(row, settings):
            finish(row)
            return True
        if settings.stop_strings and stops_answer(decode(row.outputs), row.prompt.starts_open, settings.reasoning, settings.stop_strings):
            finish(row)
            return True
        return False

    while pending or prefill is not None or running is not None:
        busy = (len(running.rows) if running is not None else 0)
        free = plan.slots - busy
        if prefill is None and pending and free > 0 and (plan.refill or running is None):
            if free >= min(admit_at_least, len(pending)) or running is None:
                take_prompts = _admission(pending, free, chunk_tokens)
                del pending[: len(take_prompts)]
                prefill = _Prefill(split, take_prompts, pad_token_id, chunk_tokens, windowed, cascades)
                prefill_rows = [
                    _Row(
                        p,
                        [],
                        sequence_generator(settings, p.tokens, device) if settings.do_sample else None,
                        list(p.tokens) if settings.needs_histories else None,
                        NgramIndex(p.tokens) if drafting else None,
                    )
                    for p in take_prompts
                ]
                counts.admissions += 1
                counts.prefill_tokens += prefill.tokens
        if prefill is not None:
            prefill.step()
            if prefill.done:
                counts.refills += running is not None
                running = _join(running, prefill, prefill_rows)
                counts.max_running = max(counts.max_running, len(running.rows))
                prefill, prefill_rows = None, []
            elif running is None:
                continue  # nothing decodes while the first prompts prefill
        if running is None:
            continue

        step_started = time.perf_counter()
        rows = running.rows
        if running.logits is not None:
            logits, running.logits = running.logits, None  # the last step's pass over the output layer made them
        else:
            logits = process_logits(
                split.logits(running.hidden).float(),
                settings,
                [row.history for row in rows] if settings.needs_histories else [],  # type: ignore[misc]
                [len(row.outputs) for row in rows],
            )
        if settings.do_sample:
            next_tokens = sample_tokens(logits, settings, [row.generator for row in rows])  # type: ignore[misc]
        else:
            next_tokens = logits.argmax(dim=-1)

        now = time.perf_counter() - started
        keep: list[int] = []
        for b, token in enumerate(next_tokens.tolist()):
            row = rows[b]
            if not row.outputs:
                counts.first_token_s[row.prompt.index] = now
            if not take(row, token):
                keep.append(b)
        if not keep:
            running = None  # every row finished; its cache is dropped
            counts.decode_seconds += time.perf_counter() - step_started
            continue
        if len(keep) < len(rows):
            next_tokens = next_tokens.index_select(0, _leave(running, len(rows), keep))

        drafts = _drafts(running, plan, settings, lookup)
        _step(split, settings, running, next_tokens, drafts, pad_token_id, counts, take, windowed, cascades)
        if not running.rows:
            running = None  # every row finished within its draft
        counts.decode_seconds += time.perf_counter() - step_started
    return results, counts


def _token_limit(row: _Row, settings: DecodeSettings) -> int:
    return row.prompt.max_new_tokens or settings.max_new_tokens


def _drafts(running: _Running, plan: SlotPlan, settings: DecodeSettings, lookup: LookupPlan | None) -> list[list[int]]:
    """Each running row's draft for this step (prompt_lookup.py), no longer than the tokens it may
    still generate; all empty when the step runs without drafts (drafts off, too many rows for the
    step's token cap, or a cache that would outgrow the KV budget: rejected drafts leave masked
    slots behind)."""
    rows = running.rows
    none: list[list[int]] = [[] for _ in rows]
    length = lookup.draft_length(len(rows)) if lookup is not None else 0
    if length <= 0:
        return none
    if plan.kv_budget_bytes is not None:
        widest = running.slots + length + 1 + kv_slots.SlotLayer.spare_slots
        if len(rows) * widest * plan.kv_bytes_per_token > plan.kv_budget_bytes:
            return none
    drafts = []
    for row in rows:
        assert row.lookup is not None
        drafts.append(row.lookup.draft(min(length, _token_limit(row, settings) - len(row.outputs))))
    return drafts


def _step(
    split: SplitModel,
    settings: DecodeSettings,
    running: _Running,
    next_tokens: torch.Tensor,
    drafts: list[list[int]],
    pad_token_id: int,
    counts: DecodeCounts,
    take: Callable[[_Row, int], bool],
    windowed: bool = False,
    cascades: bool = False,
) -> None:
    """One decode step of every row's next token, followed by its draft (if any). The model's argmax
    after each token checks the draft token there; a row keeps its draft up to the first it
    disagrees with (outputs are those of one token per step), and the step's later slots of that
    row are masked out of the cache. Rows that finish within their draft leave.
    `windowed`: sliding-window layers attend through the engine's masks, which count the window in
    tokens, and keep the slots of each row's last window - 1 tokens (kv_slots.keep_window_tokens).
    `cascades`: rows attend to their shared prefixes held once (cascade.py)."""
    n = len(running.rows)
    device = running.mask.device
    lengths = [len(d) for d in drafts]
    width = 1 + max(lengths)
    ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    real = torch.zeros((n, width), dtype=running.mask.dtype)
    for b, draft in enumerate(drafts):
        if draft:
            ids[b, 1 : 1 + len(draft)] = torch.tensor(draft, dtype=torch.long)
        real[b, : 1 + len(draft)] = 1
    ids = ids.to(device)
    ids[:, 0] = next_tokens
    running.mask = torch.cat([running.mask, real.to(device)], dim=1)
    positions = running.positions[:, None] + 1 + torch.arange(width, device=device)
    counts.decode_steps += 1
    counts.draft_steps += width > 1
    counts.decode_rows += n
    counts.draft_tokens += sum(lengths)
    attention_mask: torch.Tensor | dict[str, torch.Tensor] = running.mask
    if windowed:
        kv_slots.hold_window_tokens(running.cache)
        attention_mask = token_masks(split, running.mask, width, kv_slots.sliding_slots(running.cache) + width)
    prefixes = cascade.group_rows([row.prompt.prefix for row in running.rows], positions) if cascades else None
    # Rows are kept widest first (_join), so each run of similar widths reads its own slots only.
    hidden = split.forward_body(
        skip_padding=True,
        input_ids=ids,
        attention_mask=attention_mask,
        position_ids=positions,
        past_key_values=running.cache,
        use_cache=True,
        shared_prefixes=prefixes,
    ).last_hidden_state
    if split.skips_padding:
        counts.kv_slot_reads += slots_read(first_visible(running.mask), running.slots, *kv_slots.key_value_heads(split.text_config))
    else:
        counts.kv_slot_reads += n * running.slots
    if prefixes is not None:
        counts.kv_slot_reads += sum(group.length for group in prefixes.groups)  # each read once for its rows
    # With drafts: the model's choice after each token of the step, as a one-token step makes it
    # (after a draft token's predecessor it checks that draft token), all in one pass over the
    # output layer, whose weight (Gemma 3's 672 MB) a step of few rows mostly reads; the logits
    # after each row's last kept token are then the next step's (no second pass).
    run = [(b, j) for b in range(n) for j in range(lengths[b] + 1)] if width > 1 else []
    starts = [0] * n  # per row: where its columns' choices start in `run`
    for b in range(1, n):
        starts[b] = starts[b - 1] + lengths[b - 1] + 1
    choices: list[int] = []
    step_logits: torch.Tensor | None = None
    if run:
        at_rows = torch.tensor([b for b, _ in run], device=device)
        at_cols = torch.tensor([j for _, j in run], device=device)
        generated = [len(running.rows[b].outputs) + j for b, j in run]
        step_logits = process_logits(split.logits(hidden[at_rows, at_cols]).float(), settings, [], generated)
        choices = step_logits.argmax(dim=-1).tolist()
    keep: list[int] = []
    last: list[int] = []  # per row: the column of its last token kept
    for b, row in enumerate(running.rows):
        draft, mine = drafts[b], choices[starts[b] : starts[b] + lengths[b]]
        kept, finished = 0, False
        while kept < len(draft) and mine[kept] == draft[kept]:
            kept += 1
            if take(row, draft[kept - 1]):
                finished = True
                break
        counts.accepted_drafts += kept
        last.append(kept)
        if not finished:
            keep.append(b)
    columns = torch.arange(width, device=device)
    last_column = torch.tensor(last, device=device)
    running.mask[:, -width:] = (columns[None, :] <= last_column[:, None]).to(running.mask.dtype)
    if windowed:
        kv_slots.keep_window_tokens(running.cache, running.mask)
    every = torch.arange(n, device=device)
    running.positions = positions[every, last_column]
    running.hidden = hidden[every, last_column]
    if step_logits is not None:
        running.logits = step_logits[torch.tensor([starts[b] + last[b] for b in range(n)], device=step_logits.device)]
    if not keep:
        running.rows = []
    elif len(keep) < n:
        _leave(running, n, keep)


def plan_slots(split: SplitModel, max_rows: int, longest: int, max_new: int, budget_bytes: int | None) -> SlotPlan:
    """Rows that decode at once: `max_rows`, lowered so that every row's keys and values at its
    longest (`longest` prompt tokens + `max_new`, and the slot buffers' spare slots) fit in
    `budget_bytes`."""
    per_token = kv_slots.bytes_per_token(split.text_config, split.dtype)
    slots = max_rows
    if budget_bytes is not None:
        per_row = per_token * (longest + max_new + kv_slots.SlotLayer.spare_slots)
        slots = max(1, min(slots, budget_bytes // max(1, per_row)))
    refill, reason = True, ""
    try:
        kv_slots.check_layers(kv_slots.new_cache(split.config))
    except kv_slots.UnsupportedCacheError as error:
        refill, reason = False, str(error)
    return SlotPlan(slots=slots, kv_budget_bytes=budget_bytes, kv_bytes_per_token=per_token, refill=refill, reason=reason)
