"""Packing of loglikelihood requests into rows, and of rows into batches.

A row holds one context and the continuations scored against it, as a token tree:
the context is the trunk and every continuation is a branch, so a context is run
through the model once however many continuations share it, and continuations
that share leading tokens share those too. Each tree node is one input token; it
attends to its ancestors only (the attention mask is built in `scoring.py`).

Rows are sorted by length (longest first, so an out-of-memory shows up at once)
and packed into lanes of equal length (several short trees may share a lane, each
seeing only itself), batches of lanes whose padded size stays within a token budget.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    parents: list[int] = field(default_factory=list)  # -1 for the root
    scored: list[ScoredRequest] = field(default_factory=list)

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
    return PackedRow(tokens=list(context), positions=list(range(n)), parents=list(range(-1, n - 1)))


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


def plan_batches(rows: Sequence[PackedRow], token_budget: int | None, max_lanes: int | None) -> list[list[list[int]]]:
    """Rows per lane per batch: each batch is lanes of one length, lanes x length within the budget.

    The lane length is the longest row left (rows go longest first, so an out-of-memory
    shows up at once); shorter rows are packed first-fit into lanes one after another,
    so padding is only what no remaining row fits into. A row longer than the budget
    forms a batch of its own.
    """
    remaining = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), rows[i].tokens))
    batches: list[list[list[int]]] = []
    while remaining:
        lane_length = len(rows[remaining[0]])
        lane_cap = max(1, token_budget // lane_length) if token_budget is not None else len(remaining)
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


def minimum_tokens(requests: Sequence[TokenRequest], max_length: int) -> int:
    """The fewest input tokens the requests need: each distinct context once, plus the
    distinct continuation prefixes scored against it (the token-tree size per context)."""
    return sum(len(row) for row in pack_rows(requests, max_length, max_row_tokens=None))
