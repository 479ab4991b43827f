"""European school exams (EXAMS dataset) from the `evals` package, one file per language.

The package stores each item as a chat prompt: a system message asking for "[X]" and a user
message "question\nA. ...\nB. ...\nAnswer:". We parse the question and options back out so the
harness can present them in its own multiple-choice format (letter or cloze), the same for every
language and the same as MMLU's. Items have 3 to 5 options.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from benchharness.errors import DataError
from benchharness.models.sources import package_dir
from benchharness.suites.common import DataSource, Located, PreparedFiles, Records

INSTALL = "make install  (pip install --no-deps evals==3.0.1.post1)"

# Language code -> (folder name in evals/registry/data, English name). EU official languages present in the package.
LANGUAGES: dict[str, tuple[str, str]] = {
    "bg": ("bulgarian-exams-qa", "Bulgarian"),
    "de": ("german-exams-qa", "German"),
    "es": ("spanish-exams-qa", "Spanish"),
    "fr": ("french-exams-qa", "French"),
    "hr": ("croatian-exams-qa", "Croatian"),
    "hu": ("hungarian-exams-qa", "Hungarian"),
    "it": ("italian-exams-qa", "Italian"),
    "lt": ("lithuanian-exams-qa", "Lithuanian"),
    "pl": ("polish-exams-qa", "Polish"),
    "pt": ("portuguese-exams-qa", "Portuguese"),
}
ITEMS = {"bg": 2344, "de": 575, "es": 235, "fr": 318, "hr": 2341, "hu": 1731, "it": 1010, "lt": 593, "pl": 1577, "pt": 740}

LETTERS = "ABCDE"
_OPTION = re.compile(r"\n([A-E])\. ")
_IDEAL = re.compile(r"^\[([A-E])\]$")


def locate(source_dir: Path | None) -> Located:
    """The evals registry data folder (or a user folder with the same <language>-exams-qa/samples.jsonl layout)."""
    base = source_dir
    if base is None:
        pkg = package_dir("evals")
        if pkg is None:
            return Located(None, (), f"package 'evals' not installed; install: {INSTALL}")
        base = pkg / "registry" / "data"
    files = tuple(base / folder / "samples.jsonl" for folder, _ in LANGUAGES.values())
    missing = [f for f in files if not f.is_file()]
    if missing:
        return Located(None, (), f"{missing[0]} not found; install: {INSTALL}")
    return Located(base, files, str(base))


def parse_prompt(text: str) -> tuple[str, list[str]]:
    """Split the packaged user message into (question, options).

    The options are the last block of lines "A. ", "B. ", ... in letter order before "Answer:";
    a question may itself contain lines like "A. ...", so the last "A. " that starts a complete,
    in-order block wins.
    """
    body = text.rstrip()
    if not body.endswith("Answer:"):
        raise ValueError("prompt does not end with 'Answer:'")
    body = "\n" + body[: -len("Answer:")].rstrip("\n")
    starts = [m.start() for m in re.finditer(r"\nA\. ", body)]
    for start in reversed(starts):
        block = body[start:]
        marks = list(_OPTION.finditer(block))
        letters = "".join(m.group(1) for m in marks)
        if len(marks) >= 2 and LETTERS.startswith(letters):
            options = [block[m.end() : (marks[i + 1].start() if i + 1 < len(marks) else len(block))].strip() for i, m in enumerate(marks)]
            question = body[:start].strip()
            if question and all(options):
                return question, options
    raise ValueError("no complete 'A. ', 'B. ', ... option block found")


def read_language(path: Path, code: str) -> Records:
    records: Records = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            row = json.loads(line)
            user = next((m["content"] for m in row["input"] if m.get("role") == "user"), None)
            ideal = _IDEAL.match(str(row.get("ideal", "")).strip())
            try:
                if user is None or ideal is None:
                    raise ValueError("no user message or no '[X]' ideal answer")
                question, options = parse_prompt(user)
                answer = LETTERS.index(ideal.group(1))
                if answer >= len(options):
                    raise ValueError(f"answer {ideal.group(1)} but only {len(options)} options")
            except ValueError as exc:
                raise DataError(f"{path}: line {line_no}: {exc}. Fix: reinstall the evals package ({INSTALL}).") from exc
            records.append(
                {
                    "id": len(records),
                    "question": question,
                    "choices": options,
                    "letters": list(LETTERS[: len(options)]),
                    "answer": answer,
                    "language": code,
                    "subject": code,  # the stratum for per-language scores
                    "language_name": LANGUAGES[code][1],
                }
            )
    return records


# The packaged files are sorted by school subject (physics first...) and carry no subject field,
# so a plain `limit` would take one subject only; a fixed-seed shuffle per language makes any
# prefix a representative sample, and the same on every machine.
SHUFFLE_SEED = "benchharness-eu_exams-v1"


def build(root: Path) -> PreparedFiles:
    files: PreparedFiles = {}
    for code, (folder, _) in LANGUAGES.items():
        records = read_language(root / folder / "samples.jsonl", code)
        random.Random(f"{SHUFFLE_SEED}-{code}").shuffle(records)
        for i, record in enumerate(records):
            record["source_line"] = record["id"] + 1
            record["id"] = i
        files[f"test/{code}.jsonl"] = records
    return files


DATA = DataSource(
    name="eu_exams",
    items=sum(ITEMS.values()),
    source="evals 3.0.1.post1 (evals/registry/data/<language>-exams-qa), EXAMS high-school exams",
    license="CC BY-SA 4.0 (EXAMS)",
    install=INSTALL,
    locate=locate,
    build=build,
)
