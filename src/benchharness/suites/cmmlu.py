"""CMMLU (Chinese knowledge, 67 subjects): test and dev CSVs from a local folder, or the hub dataset.

The data is CC BY-NC-SA 4.0 and never copied into the project: it is read from a folder the
user names (config `data_sources: {cmmlu: PATH}` or env BENCHHARNESS_CMMLU_DIR), or downloaded
from the hub dataset haonan-li/cmmlu into the data cache where the hub is reachable. Each subject
becomes its own lm-eval task (5-shot from its dev split, as in the benchmark's standard), so a
`limit` is a per-subject limit and the group score is the macro average over subjects.
"""

from __future__ import annotations

import csv
import os
import zipfile
from pathlib import Path

from benchharness.errors import DataError
from benchharness.suites.common import DataSource, Located, PreparedFiles, Records, hub_snapshot

ENV_VAR = "BENCHHARNESS_CMMLU_DIR"
HUB_DATASET = "haonan-li/cmmlu"
CONFIG_HINT = "data_sources: {cmmlu: /path/to/cmmlu} in the experiment config"

# Subject -> Chinese name, as in lm-eval's tasks/cmmlu/_generate_configs.py (used in the prompt).
SUBJECTS = {
    "agronomy": "农学",
    "anatomy": "解剖学",
    "ancient_chinese": "古汉语",
    "arts": "艺术学",
    "astronomy": "天文学",
    "business_ethics": "商业伦理",
    "chinese_civil_service_exam": "中国公务员考试",
    "chinese_driving_rule": "中国驾驶规则",
    "chinese_food_culture": "中国饮食文化",
    "chinese_foreign_policy": "中国外交政策",
    "chinese_history": "中国历史",
    "chinese_literature": "中国文学",
    "chinese_teacher_qualification": "中国教师资格",
    "clinical_knowledge": "临床知识",
    "college_actuarial_science": "大学精算学",
    "college_education": "大学教育学",
    "college_engineering_hydrology": "大学工程水文学",
    "college_law": "大学法律",
    "college_mathematics": "大学数学",
    "college_medical_statistics": "大学医学统计",
    "college_medicine": "大学医学",
    "computer_science": "计算机科学",
    "computer_security": "计算机安全",
    "conceptual_physics": "概念物理学",
    "construction_project_management": "建设工程管理",
    "economics": "经济学",
    "education": "教育学",
    "electrical_engineering": "电气工程",
    "elementary_chinese": "小学语文",
    "elementary_commonsense": "小学常识",
    "elementary_information_and_technology": "小学信息技术",
    "elementary_mathematics": "初等数学",
    "ethnology": "民族学",
    "food_science": "食品科学",
    "genetics": "遗传学",
    "global_facts": "全球事实",
    "high_school_biology": "高中生物",
    "high_school_chemistry": "高中化学",
    "high_school_geography": "高中地理",
    "high_school_mathematics": "高中数学",
    "high_school_physics": "高中物理学",
    "high_school_politics": "高中政治",
    "human_sexuality": "人类性行为",
    "international_law": "国际法学",
    "journalism": "新闻学",
    "jurisprudence": "法理学",
    "legal_and_moral_basis": "法律与道德基础",
    "logical": "逻辑学",
    "machine_learning": "机器学习",
    "management": "管理学",
    "marketing": "市场营销",
    "marxist_theory": "马克思主义理论",
    "modern_chinese": "现代汉语",
    "nutrition": "营养学",
    "philosophy": "哲学",
    "professional_accounting": "专业会计",
    "professional_law": "专业法学",
    "professional_medicine": "专业医学",
    "professional_psychology": "专业心理学",
    "public_relations": "公共关系",
    "security_study": "安全研究",
    "sociology": "社会学",
    "sports_science": "体育学",
    "traditional_chinese_medicine": "中医中药",
    "virology": "病毒学",
    "world_history": "世界历史",
    "world_religions": "世界宗教",
}

HOW_TO = (
    f"point the harness at a folder holding test/<subject>.csv and dev/<subject>.csv: "
    f"{CONFIG_HINT}, or the environment variable {ENV_VAR}=/path/to/cmmlu; "
    f"or, where the Hugging Face hub is reachable, leave both unset to download the hub dataset {HUB_DATASET}"
)


def locate(source_dir: Path | None) -> Located:
    """The CMMLU folder: the one named in config, else $BENCHHARNESS_CMMLU_DIR; not found otherwise."""
    if source_dir is None and os.environ.get(ENV_VAR):
        source_dir = Path(os.environ[ENV_VAR]).expanduser()
        origin = f"${ENV_VAR}"
    else:
        origin = "data_sources.cmmlu"
    if source_dir is None:
        return Located(None, (), f"no local CMMLU folder named; {HOW_TO}")
    problem = check_folder(source_dir)
    if problem:
        return Located(None, (), f"{origin}: {problem}")
    files = tuple(sorted(source_dir / split / f"{s}.csv" for split in ("test", "dev") for s in SUBJECTS))
    return Located(source_dir, files, str(source_dir))


def check_folder(folder: Path) -> str | None:
    if not folder.is_dir():
        return f"folder {folder} not found. Fix: {HOW_TO}"
    missing = [f"{split}/{s}.csv" for split in ("test", "dev") for s in SUBJECTS if not (folder / split / f"{s}.csv").is_file()]
    if missing:
        return f"{folder} lacks {len(missing)} CMMLU file(s), e.g. {', '.join(missing[:3])}. Fix: {HOW_TO}"
    return None


def read_subject(path: Path, subject: str) -> Records:
    records: Records = []
    with path.open(encoding="utf-8", newline="") as fh:
        for line_no, row in enumerate(csv.DictReader(fh), start=2):
            answer = (row.get("Answer") or "").strip()
            if answer not in {"A", "B", "C", "D"}:
                raise DataError(f"{path}: line {line_no}: field Answer is {answer!r}, expected A-D. Fix: use the original CMMLU CSVs.")
            records.append(
                {
                    "question": row["Question"].strip(),
                    "choices": [row["A"], row["B"], row["C"], row["D"]],
                    "answer": "ABCD".index(answer),
                    "subject": subject,
                    "subject_name": SUBJECTS[subject],
                }
            )
    return records


def build(root: Path) -> PreparedFiles:
    files: PreparedFiles = {}
    for subject in SUBJECTS:
        for split in ("test", "dev"):
            records = read_subject(root / split / f"{subject}.csv", subject)
            for i, record in enumerate(records):
                record["id"] = i
            files[f"{split}/{subject}.jsonl"] = records
    return files


def fetch(cache_dir: Path) -> Path:
    """Download the hub dataset's CSVs into cache_dir/raw/cmmlu (once); returns the folder with test/ and dev/."""
    target = cache_dir / "raw" / "cmmlu"
    found = _find_csv_root(target)
    if found is not None:
        return found
    snapshot = hub_snapshot("cmmlu", HUB_DATASET, ["*.zip", "*.csv"], HOW_TO)
    target.mkdir(parents=True, exist_ok=True)
    for archive in sorted(snapshot.rglob("*.zip")):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(target)
    found = _find_csv_root(target) or _find_csv_root(snapshot)
    if found is None:
        raise DataError(f"suite 'cmmlu': the hub dataset {HUB_DATASET} did not contain test/ and dev/ CSVs as expected. Fix: {HOW_TO}.")
    return found


def _find_csv_root(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    for candidate in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
        if check_folder(candidate) is None:
            return candidate
    return None


DATA = DataSource(
    name="cmmlu",
    items=11582,
    source=f"local folder (config data_sources.cmmlu or ${ENV_VAR}); hub dataset {HUB_DATASET} where reachable",
    license="CC BY-NC-SA 4.0",
    install=HOW_TO,
    locate=locate,
    build=build,
    fetch=fetch,
)
