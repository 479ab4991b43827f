"""Packing of loglikelihood requests into rows, and of rows into batches.

A row holds one context and the continuations scored against it, as a token tree:
the context is the trunk and every continuation is a branch, so a context is run
through the model once however many continuations share it, and continuations
that share leading tokens share those too. Each tree node is one input token; it
attends to its ancestors only (the attention mask is built in `scoring.py`).

Different contexts that begin alike (few-shot examples, a shared instruction) form a
prefix group: the shared prefix is run once and its keys and values are reused by
every row of the group, which then holds only what follows the prefix.

Rows are sorted by length (longest first, so an out-of-memory shows up at once)
and packed into lanes of equal length (several short trees may share a lane, each
seeing only itself), batches of lanes whose padded size stays within a token budget.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenRequest:
    """One (context, continuation) pair, already tokenized the way lm-eval's HFLM does."""

    index: int
    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass
class ScoredRequest:
    """Where one request is scored inside its row: the node predicting each continuation token."""

    index: int
    nodes: list[int]
    targets: list[int]


@dataclass
class PackedRow:
    """A token tree flattened into one model input row."""

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # -1 for the root (or: attached to the group's prefix)
    scored: list[ScoredRequest] = field(default_factory=list)
    context_length: int = 0  # the leading tokens that are the shared context (the trunk)

    def __len__(self) -> int:
        return len(self.tokens)


def truncate_request(request: TokenRequest, max_length: int) -> TokenRequest:
    """Left-truncate context+continuation to `max_length + 1` tokens, as HFLM does.

    HFLM feeds `(context + continuation)[-(max_length + 1):][:-1]`; keeping the
    continuation whole, the context is what remains in front of it.
    """
    total = len(request.context) + len(request.continuation)
    if total <= max_length + 1:
        return request
    if len(request.continuation) > max_length:
        raise ValueError(
            f"request {request.index}: continuation of {len(request.continuation)} tokens "
            f"exceeds the model's maximum length {max_length}"
        )
    whole = (request.context + request.continuation)[-(max_length + 1) :]
    return TokenRequest(
        index=request.index,
        context=whole[: len(whole) - len(request.continuation)],
        continuation=request.continuation,
    )


def pack_rows(
    requests: Sequence[TokenRequest], max_length: int, max_row_tokens: int | None = None
) -> list[PackedRow]:
    """Group requests by context and pack each group into one or more token-tree rows.

    `max_row_tokens` splits a group whose tree would exceed it into several rows
    (each repeating the context); a row never exceeds `max_length + branch depth`
    in tokens, while its positions never exceed `max_length - 1`.
    """
    groups: dict[tuple[int, ...], list[TokenRequest]] = {}
    for request in requests:
        if not request.context or not request.continuation:
            raise ValueError(f"request {request.index}: context and continuation must be non-empty token lists")
        truncated = truncate_request(request, max_length)
        groups.setdefault(truncated.context, []).append(truncated)

    rows: list[PackedRow] = []
    for context, members in groups.items():
        row = _new_row(context)
        children: dict[tuple[int, int], int] = {}
        for request in members:
            branch_tokens = len(request.continuation) - 1
            if max_row_tokens is not None and row.scored and len(row) + branch_tokens > max_row_tokens:
                rows.append(row)
                row = _new_row(context)
                children = {}
            _add_branch(row, children, request)
        rows.append(row)
    return rows


def _new_row(context: tuple[int, ...]) -> PackedRow:
    n = len(context)
    return PackedRow(
        tokens=list(context), positions=list(range(n)), parents=list(range(-1, n - 1)), context_length=n
    )


def _add_branch(row: PackedRow, children: dict[tuple[int, int], int], request: TokenRequest) -> None:
    """Add one continuation as a branch: input tokens are continuation[:-1]; each node predicts the next."""
    node = len(request.context) - 1  # the last context token predicts the first continuation token
    nodes = [node]
    for token in request.continuation[:-1]:
        child = children.get((node, token))
        if child is None:
            child = len(row.tokens)
            row.tokens.append(token)
            row.positions.append(row.positions[node] + 1)
            row.parents.append(node)
            children[(node, token)] = child
        node = child
        nodes.append(node)
    row.scored.append(ScoredRequest(index=request.index, nodes=nodes, targets=list(request.continuation)))


def plan_batches(
    rows: Sequence[PackedRow], token_budget: int | None, max_lanes: int | None, lane_overhead: int = 0
) -> list[list[list[int]]]:
    """Rows per lane per batch: each batch is lanes of one length, lanes x (length +
    `lane_overhead`, e.g. a prefix copied into every lane's cache) within the budget.

    The lane length is the longest row left (rows go longest first, so an out-of-memory
    shows up at once); shorter rows are packed first-fit into lanes one after another,
    so padding is only what no remaining row fits into. A row longer than the budget
    forms a batch of its own.
    """
    remaining = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), rows[i].tokens))
    batches: list[list[list[int]]] = []
    while remaining:
        lane_length = len(rows[remaining[0]])
        lane_cap = max(1, token_budget // (lane_length + lane_overhead)) if token_budget is not None else len(remaining)
        if max_lanes is not None:
            lane_cap = min(lane_cap, max_lanes)
        lanes: list[list[int]] = []
        room: list[int] = []
        left: list[int] = []
        for index in remaining:
            size = len(rows[index])
            lane = next((k for k, free in enumerate(room) if free >= size), None)
            if lane is None and len(lanes) < lane_cap:
                lanes.append([])
                room.append(lane_length)
                lane = len(lanes) - 1
            if lane is None:
                left.append(index)
                continue
            lanes[lane].append(index)
            room[lane] -= size
        batches.append(lanes)
        remaining = left
    return batches


def concatenate_rows(rows: Sequence[PackedRow]) -> PackedRow:
    """Several trees one after another in one lane: each keeps its positions and sees only itself."""
    lane = PackedRow()
    for row in rows:
        offset = len(lane)
        lane.tokens.extend(row.tokens)
        lane.positions.extend(row.positions)
        lane.parents.extend(p + offset if p >= 0 else -1 for p in row.parents)
        lane.scored.extend(
            ScoredRequest(index=s.index, nodes=[n + offset for n in s.nodes], targets=list(s.targets))
            for s in row.scored
        )
    return lane


@dataclass(frozen=True)
class PrefixGroup:
    """Rows whose contexts all begin with `prefix`: it is computed once for all of them."""

    prefix: tuple[int, ...]
    rows: list[int]


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    limit = min(len(a), len(b))
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def prefix_groups(
    contexts: Sequence[Sequence[int]], sizes: Sequence[int], min_prefix: int, min_group_tokens: int
) -> tuple[list[PrefixGroup], list[int]]:
    """Choose shared prefixes for rows (or prompts) with these contexts and token counts:
    (groups, indices left on their own).

    Contexts are sorted so that those sharing a prefix are neighbours; a run of
    neighbours is split where they share least, recursively, keeping at each level
    whichever saves more tokens: one prefix for the whole run, or the best split of it.
    A prefix leaves at least one context token in each row (the last one scores the
    first continuation token, or starts generation). A group needs a prefix of `min_prefix` tokens and rows
    of `min_group_tokens` in all, so that its batches are not mostly empty.
    """
    contexts = [tuple(context) for context in contexts]
    order = sorted(range(len(contexts)), key=lambda i: contexts[i])
    shared = [
        min(_common_length(contexts[a], contexts[b]), len(contexts[a]) - 1, len(contexts[b]) - 1)
        for a, b in zip(order, order[1:], strict=False)
    ]

    def best(lo: int, hi: int, depth: int) -> tuple[int, list[tuple[int, int, int]]]:
        """(tokens saved, [(lo, hi, prefix length)]) for sorted rows order[lo:hi]."""
        if hi - lo < 2:
            return 0, []
        length = min(shared[lo : hi - 1])
        whole = 0
        if length >= min_prefix and sum(sizes[order[k]] for k in range(lo, hi)) >= min_group_tokens:
            whole = (hi - lo - 1) * length
        if depth > 64:  # pathological nesting: stop refining
            return (whole, [(lo, hi, length)]) if whole else (0, [])
        saved, parts, start = 0, [], lo
        for k in range(lo, hi):
            if k == hi - 1 or shared[k] == length:
                part_saved, part_groups = best(start, k + 1, depth + 1)
                saved += part_saved
                parts += part_groups
                start = k + 1
        if whole > saved:
            return whole, [(lo, hi, length)]
        return saved, parts

    _, chosen = best(0, len(contexts), 0)
    groups = [
        PrefixGroup(prefix=contexts[order[lo]][:length], rows=[order[k] for k in range(lo, hi)])
        for lo, hi, length in chosen
    ]
    grouped = {i for group in groups for i in group.rows}
    return groups, [i for i in range(len(contexts)) if i not in grouped]


def strip_prefix(row: PackedRow, length: int) -> PackedRow:
    """The row without its first `length` tokens: what follows a group's prefix.

    Positions stay absolute; the first remaining token's parent becomes -1, which in
    a prefixed batch means "attached to the prefix" (every remaining token sees it all).
    """
    if not 0 < length < row.context_length:
        raise ValueError(f"a prefix of {length} tokens does not leave a context token in a row of {row.context_length}")
    return PackedRow(
        tokens=row.tokens[length:],
        positions=row.positions[length:],
        parents=[p - length if p >= length else -1 for p in row.parents[length:]],
        scored=[
            ScoredRequest(index=s.index, nodes=[n - length for n in s.nodes], targets=list(s.targets))
            for s in row.scored
        ],
        context_length=row.context_length - length,
    )


def distinct_prefix_tokens(sequences: Iterable[Sequence[int]]) -> int:
    """Tokens in a trie over the sequences: each distinct token prefix counted once."""
    return sum(1 for _ in _new_trie_node_depths(sequences))


def distinct_prefix_depths(sequences: Iterable[Sequence[int]]) -> list[int]:
    """For each node of a trie over the sequences (each distinct token prefix once), its depth:
    how many tokens that prefix holds, i.e. the keys its last token attends to in a causal model."""
    return list(_new_trie_node_depths(sequences))


def _new_trie_node_depths(sequences: Iterable[Sequence[int]]) -> Iterator[int]:
    """Builds a trie over the sequences, yielding the depth of each node as it is added."""
    root: dict[int, dict] = {}
    for sequence in sequences:
        node = root
        for depth, token in enumerate(sequence, start=1):
            child = node.get(token)
            if child is None:
                child = node[token] = {}
                yield depth
            node = child


def minimum_tokens(requests: Sequence[TokenRequest], max_length: int) -> int:
    """The fewest input tokens the requests need: each distinct token sequence prefix once,
    that is the nodes of a trie over every (context + continuation[:-1])."""
    truncated = (truncate_request(request, max_length) for request in requests)
    return distinct_prefix_tokens(r.context + r.continuation[:-1] for r in truncated)
