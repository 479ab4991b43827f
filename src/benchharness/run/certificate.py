"""The parity certificate of a run: a deterministic sample of each task's requests, re-answered by
lm-eval's own `hf` model (HFLM) on the same loaded model in the same process, compared with the
answers the benchharness engine gave and the scores were computed from.

Takes: the task's logged samples (lm-eval's `arguments` and `resps`), its output type, the model
and tokenizer. Gives: one JSON-able record per task (requests compared, max |Δ loglikelihood|,
greedy-flag, argmax and generation agreement (in half precision, a generation that parts from
hf's at a near-tie agrees), seconds, passed), and the run-level summary the
manifest, the report and the exit status use. Tolerances: `benchharness.engine.parity.TOLERANCE`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

from benchharness.engine.parity import GENERATION_TIE, TOLERANCE, near_tie, text_choice_gap

def request_type(output_type: str) -> str:
    return "loglikelihood" if output_type == "multiple_choice" else output_type


def _order(task: str, doc_id: Any, seed: int) -> str:
    return hashlib.sha256(f"{seed}/{task}/{doc_id}".encode()).hexdigest()


def sample_documents(samples: Sequence[Mapping[str, Any]], task: str, requests: int, seed: int) -> list[Mapping[str, Any]]:
    """Documents in a seeded order that does not depend on how the run was split or resumed,
    taken whole (all choices of a multiple-choice item) until `requests` requests are covered."""
    chosen: list[Mapping[str, Any]] = []
    covered = 0
    seen: set[Any] = set()
    for sample in sorted(samples, key=lambda s: _order(task, s["doc_id"], seed)):
        if covered >= requests:
            break
        if sample["doc_id"] in seen:
            continue  # a task with several filters logs each document once per filter, with the same requests
        seen.add(sample["doc_id"])
        chosen.append(sample)
        covered += len(sample["arguments"])
    return chosen


def certify_task(
    reference: Any, task: str, output_type: str, samples: Sequence[Mapping[str, Any]], requests: int, seed: int, dtype: str,
) -> dict[str, Any]:
    """Re-answer the sampled requests with `reference` (an HFLM) and compare."""
    from lm_eval.api.instance import Instance

    kind = request_type(output_type)
    chosen = sample_documents(samples, task, requests, seed)
    tolerance = TOLERANCE.get(dtype, TOLERANCE["float32"])
    record: dict[str, Any] = {"type": kind, "documents": len(chosen), "requests": 0}
    started = time.perf_counter()
    instances, ours, owners = [], [], []
    for sample in chosen:
        for index, (args, resps) in enumerate(zip(sample["arguments"], sample["resps"], strict=True)):
            instances.append(Instance(kind, {}, tuple(args), index))
            ours.append(resps[0])
            owners.append(sample["doc_id"])
    record["requests"] = len(instances)
    if kind == "generate_until":
        greedy = [i for i, inst in enumerate(instances) if not inst.args[1].get("do_sample") and not float(inst.args[1].get("temperature", 0) or 0)]
        theirs = reference.generate_until([instances[i] for i in greedy], disable_tqdm=True) if greedy else []
        identical = sum(ours[i] == text for i, text in zip(greedy, theirs, strict=True))
        differing = [i for i, text in zip(greedy, theirs, strict=True) if ours[i] != text]
        # fp32: identical strings. bf16/fp16: an output may part from hf's at a near-tie (engine/parity.py).
        near_ties = [] if GENERATION_TIE.get(dtype, 0.0) == 0.0 else [
            (i, gap) for i in differing if (gap := _half_precision_gap(reference, instances[i], ours[i], dtype)) is not None]
        agreeing = {i for i, gap in near_ties if gap["near_tie"]}
        record.update(compared=len(greedy), identical=identical, sampled_skipped=len(instances) - len(greedy),
                      passed=identical + len(agreeing) == len(greedy))
        if near_ties:
            record["near_ties"] = len(agreeing)
            record["first_differences"] = [{"doc_id": owners[i], **gap} for i, gap in near_ties][:10]
        record["differing"] = [owners[i] for i in differing if i not in agreeing][:10]
    elif kind == "loglikelihood_rolling":
        theirs = reference.loglikelihood_rolling(instances, disable_tqdm=True)
        diffs = [abs(float(a) - float(b)) for a, b in zip(ours, theirs, strict=True)]
        record.update(compared=len(diffs), max_abs_diff=max(diffs, default=0.0),
                      passed=all(d <= tolerance.bound(float(b)) for d, b in zip(diffs, theirs, strict=True)))
    else:
        theirs = reference.loglikelihood(instances, disable_tqdm=True)
        diffs = [abs(float(a[0]) - float(b[0])) for a, b in zip(ours, theirs, strict=True)]
        within = all(d <= tolerance.bound(float(b[0])) for d, b in zip(diffs, theirs, strict=True))
        greedy_agree = sum(bool(a[1]) == bool(b[1]) for a, b in zip(ours, theirs, strict=True))
        argmax_agree, argmax_docs, close_calls = _argmax_agreement(ours, theirs, owners, tolerance)
        record.update(compared=len(diffs), max_abs_diff=max(diffs, default=0.0), greedy_agree=greedy_agree,
                      argmax_documents=argmax_docs, argmax_agree=argmax_agree, argmax_close_calls=close_calls,
                      passed=within and argmax_agree == argmax_docs and (greedy_agree == len(diffs) or dtype != "float32"))
    record["seconds"] = round(time.perf_counter() - started, 3)
    return record


def _half_precision_gap(reference: Any, instance: Any, ours: str, dtype: str) -> dict[str, Any] | None:
    """A greedy generation that differs from hf's batched one, in half precision: hf again on this
    request alone (the rule's own batch of one), its tokens recorded. The same text as ours agrees;
    otherwise where our text leaves hf's tokens, hf's choice and ours must be a near-tie. None where
    hf gives no tokens to compare (it left no record)."""
    from benchharness.engine.reference import recorded_generations, stop_token_ids  # lm-eval's hf: only here

    tokenizer = reference.tokenizer
    eos = stop_token_ids(reference.model, tokenizer)
    with recorded_generations(reference, eos) as recorded:
        (alone,) = reference.generate_until([instance], disable_tqdm=True)
    if alone == ours:
        return {"near_tie": True, "how": "hf's own output at batch 1"}
    if not recorded:
        return None
    ((prompt, theirs),) = recorded.items()
    until = instance.args[1].get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    gap = text_choice_gap(reference.model, lambda ids: tokenizer.decode(ids, skip_special_tokens=False), list(prompt), theirs,
                          ours, until, eos)
    if gap is None:
        return {"near_tie": False, "how": "our text does not leave hf's tokens"}
    index, difference, scale = gap
    if difference == float("inf"):
        return {"near_tie": False, "token": index, "how": "no likely token continues our text there"}
    return {"near_tie": near_tie(difference, scale, dtype), "token": index,
            "logit_gap": difference, "logit": scale}


def _argmax_agreement(ours: list[Any], theirs: list[Any], owners: list[Any], tolerance: Any) -> tuple[int, int, int]:
    """Per document with several choices: does the engine pick hf's answer? A document whose two
    best hf scores are within the tolerance is a close call: it counts as agreeing either way."""
    by_doc: dict[Any, list[int]] = {}
    for i, owner in enumerate(owners):
        by_doc.setdefault(owner, []).append(i)
    agree = docs = close = 0
    for indices in by_doc.values():
        if len(indices) < 2:
            continue
        docs += 1
        ref = [float(theirs[i][0]) for i in indices]
        got = [float(ours[i][0]) for i in indices]
        best = max(range(len(ref)), key=ref.__getitem__)
        top, second = sorted(ref, reverse=True)[:2]
        if max(range(len(got)), key=got.__getitem__) == best:
            agree += 1
        elif top - second <= 2 * tolerance.bound(top):
            agree += 1
            close += 1
    return agree, docs, close


def summary(per_model: Mapping[str, Mapping[str, Mapping[str, Any]]], dtype: str, requests: int) -> dict[str, Any]:
    """The run's certificate from the per-task records of every model."""
    records = [r for tasks in per_model.values() for r in tasks.values()]
    failed = sorted(f"{model}/{task}" for model, tasks in per_model.items() for task, r in tasks.items() if not r.get("passed"))
    tolerance = TOLERANCE.get(dtype, TOLERANCE["float32"])
    diffs = [r["max_abs_diff"] for r in records if "max_abs_diff" in r]
    return {
        "status": "failed" if failed else ("passed" if records else "nothing compared"),
        "requests_per_type": requests,
        "tolerance": {"dtype": dtype, "max_abs_loglik": tolerance.max_abs_loglik, "relative": tolerance.relative},
        "tasks": len(records),
        "requests": sum(r.get("requests", 0) for r in records),
        "max_abs_diff": max(diffs, default=None),
        "generations_compared": sum(r.get("compared", 0) for r in records if r["type"] == "generate_until"),
        "generations_identical": sum(r.get("identical", 0) for r in records if r["type"] == "generate_until"),
        "generations_near_ties": sum(r.get("near_ties", 0) for r in records if r["type"] == "generate_until"),
        "seconds": round(sum(r.get("seconds", 0.0) for r in records), 3),
        "failed": failed,
    }
