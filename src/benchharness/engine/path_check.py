"""The construction check of the engine's own path: before a model is used, a probe of tree-packed
rows after a shared prefix, longer than the sliding window where the model has one, is scored
the engine's way (custom 4D masks, explicit positions, a prefix cache, lanes holding two trees)
and compared with the model's plain forward on each whole sequence.

It guards what the tests cannot reach: a model whose code (remote code, a new architecture, a
composite config) ignores custom masks, positions or caches, or applies a window the engine does
not know, gives other numbers on this probe and is refused with the reason, before any score.
"""

from __future__ import annotations

import logging
import math

import torch

from benchharness.engine.batching import TokenRequest, concatenate_rows, pack_rows, strip_prefix
from benchharness.engine.head import SplitModel, UnsupportedModelError
from benchharness.engine.parity import Tolerance
from benchharness.engine.scoring import HeadQueue, run_body, run_prefix

logger = logging.getLogger(__name__)

# Past the window (where there is one) by this much; at least this long without one. Models
# that run remote code get the whole window, however long; others at most _MAX_PREFIX tokens
# (their masks are transformers' own code, which the engine's tests cover).
_PAST_WINDOW = 8
_MIN_PREFIX = 24
_MAX_PREFIX = 640  # past Gemma 3's window of 512
# Largest |engine - plain forward| per request (a sum over 3 tokens), by dtype. In bf16/fp16 it grows
# with |loglikelihood|, as the rounding does: the probe's random tokens score -35 to -62 on
# SmolLM2-135M and Gemma-3-270m, and in bf16 the engine's path differed from the plain forward by up
# to 0.57 (short probes as much as long ones: rounding, not the window), 44% of this bound. A decoder
# that drops the engine's positions differs by 0.85 on a tiny model's probe scoring -22, beyond it.
# (Tighter than the parity tolerance, which also covers hf's own log_softmax in the model dtype.)
_BOUND = {"float32": Tolerance(2e-3), "float64": Tolerance(2e-6), "bfloat16": Tolerance(0.1, 0.02),
          "float16": Tolerance(0.02, 0.004)}


def prefix_length(split: SplitModel, max_length: int, remote_code: bool) -> int:
    window = split.sliding_window
    wanted = _MIN_PREFIX if window is None else max(_MIN_PREFIX, window + _PAST_WINDOW)
    if not remote_code:
        wanted = min(wanted, _MAX_PREFIX)
    return max(4, min(wanted, max_length - 8))


def probe_requests(vocab: int, length: int, seed: int = 0) -> list[TokenRequest]:
    """Two contexts sharing `length` tokens, each with two continuations that share a first token."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (length + 12,), generator=generator).tolist()
    shared, tail = tuple(tokens[:length]), tokens[length:]
    contexts = (shared + (tail[0], tail[1]), shared + (tail[2],))
    requests = []
    for context in contexts:
        for last in (tail[6], tail[7]):
            requests.append(TokenRequest(len(requests), context, (tail[5], last, tail[8])))
    return requests


@torch.inference_mode()
def reference_scores(split: SplitModel, requests: list[TokenRequest]) -> list[float]:
    """Each request's loglikelihood from the model's own forward on the whole sequence."""
    scores = []
    for request in requests:
        ids = torch.tensor([list(request.context + request.continuation)], device=split.device)
        keep = len(request.continuation) + 1
        try:  # logits of the last positions only, where the model supports it (the output layer is costly)
            logits = split.model(input_ids=ids, logits_to_keep=keep).logits[0, -keep:]
        except TypeError:
            logits = split.model(input_ids=ids).logits[0, -keep:]
        log_probs = torch.log_softmax(logits.float(), dim=-1)[:-1]
        targets = torch.tensor(request.continuation, device=split.device)
        scores.append(float(log_probs.gather(1, targets[:, None]).sum()))
    return scores


@torch.inference_mode()
def engine_scores(split: SplitModel, requests: list[TokenRequest], shared: int, pad_token_id: int) -> tuple[list[float], list[float]]:
    """The requests scored the engine's ways: after the shared prefix's cache, and without a
    prefix with both trees in one lane (tree masks, explicit positions)."""
    rows = pack_rows(requests, max_length=1 << 30)
    results: dict[int, tuple[float, bool]] = {}
    queue = HeadQueue(split)
    prefix = run_prefix(split, requests[0].context[:shared])
    queue.add(run_body(split, [strip_prefix(row, shared) for row in rows], pad_token_id, prefix))
    queue.flush(results)
    after_prefix = [results[r.index][0] for r in requests]
    results = {}
    queue.add(run_body(split, [concatenate_rows(rows)], pad_token_id))
    queue.flush(results)
    in_one_lane = [results[r.index][0] for r in requests]
    return after_prefix, in_one_lane


def check_engine_path(split: SplitModel, max_length: int, pad_token_id: int, remote_code: bool) -> dict[str, float | int]:
    """Refuse (UnsupportedModelError) a model whose scores on the engine's path differ from its
    plain forward; return what was compared (for the manifest)."""
    shared = prefix_length(split, max_length, remote_code)
    vocab = int(split.output_layer.weight.shape[0])
    requests = probe_requests(vocab, shared)
    what = (f"the engine's path (tree-packed rows after a shared prefix of {shared} tokens"
            f"{'' if split.sliding_window is None else f', window {split.sliding_window}'})")
    reference = reference_scores(split, requests)
    try:
        after_prefix, in_one_lane = engine_scores(split, requests, shared, pad_token_id)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as error:  # e.g. a cache or mask of other shapes
        raise UnsupportedModelError(
            f"{type(split.model).__name__}: {what} fails on this model's code ({type(error).__name__}: {error}). "
            "Use `engine: hf` for this model."
        ) from error
    dtype = str(split.dtype).removeprefix("torch.")
    scores = {"the model's own forward": reference, "the engine's path": after_prefix + in_one_lane}
    broken = [name for name, values in scores.items() if not all(math.isfinite(v) for v in values)]
    if broken:  # e.g. Gemma in float16, whose activations overflow it
        raise UnsupportedModelError(
            f"{type(split.model).__name__}: {' and '.join(broken)} gave non-finite loglikelihoods in {dtype} "
            f"({what}): the model overflows this dtype. Run it in bfloat16 or float32."
        )
    tolerance = _BOUND.get(dtype, _BOUND["bfloat16"])
    # (|difference|, its bound) per request and way of scoring; the worst by share of its bound.
    compared = [(abs(ours - ref), tolerance.bound(ref))
                for scores in (after_prefix, in_one_lane) for ours, ref in zip(scores, reference, strict=True)]
    difference, bound = max(compared, key=lambda pair: pair[0] / pair[1])
    if not difference <= bound:
        raise UnsupportedModelError(
            f"{type(split.model).__name__}: {what} differs from the "
            f"model's own forward by {difference:.3g} in loglikelihood (bound {bound:.3g} for {dtype}): its "
            "code does not take the engine's masks, positions or cache as transformers' models do. "
            "Use `engine: hf` for this model."
        )
    worst = max(pair[0] for pair in compared)
    logger.debug("engine path check: max |diff| %.2e over %d requests, prefix %d", worst, len(requests), shared)
    return {"prefix_tokens": shared, "requests": len(requests), "max_abs_diff": worst,
            "max_share_of_bound": difference / bound}
