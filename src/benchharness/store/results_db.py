"""The results store: every finished run in one SQLite file, queryable across runs.

`<results>/runs.sqlite` holds the runs, their models, tasks (with data and prompt
fingerprints), scores (each with its protocol), throughput, per-sample results and the scores
the models' makers published (from the manifest, for "against published"). A run
is added when it completes (`benchharness run` does it) or with `benchharness index RUN...`;
adding it again replaces its rows in one transaction, so indexing is idempotent and a crash
mid-way leaves the store as it was. Only runs whose manifest says "complete" and whose files
match the manifest's hashes are added: a half-written run never enters the store.

SQLite because it is in Python's standard library (nothing to install), one file that is
copied or backed up as such, safe with several readers and writers, and read by pandas
(`pd.read_sql(sql, sqlite3.connect(path))`), DuckDB and any SQL tool.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from benchharness.errors import HarnessError
from benchharness.measure.probe import THROUGHPUT_COLUMNS
from benchharness.store.score_rows import SCORE_COLUMNS, set_protocol_columns

STORE_NAME = "runs.sqlite"
SCHEMA_VERSION = 3  # 2: runs.parity; 3: published

RUN_COLUMNS = ["run_id", "experiment", "config_hash", "config_file", "status", "parity", "started", "finished", "engine",
               "harness_version", "lm_eval_version", "torch_version", "host", "fingerprint_sha256", "folder",
               "report", "samples_indexed", "indexed_at"]
MODEL_COLUMNS = ["run_id", "model", "origin", "organisation", "family", "params", "build", "license", "dtype", "device",
                 "engine", "chat_template", "weights_sha256", "source"]
TASK_COLUMNS = ["run_id", "task", "suite", "num_fewshot", "n", "n_available", "limit", "data_fingerprint", "prompt_hash"]
STORE_SCORE_COLUMNS = ["run_id", *SCORE_COLUMNS]
STORE_THROUGHPUT_COLUMNS = ["run_id", *THROUGHPUT_COLUMNS]
# The scores each model's makers published (catalog `published:`, copied into the run's manifest).
PUBLISHED_COLUMNS = ["run_id", "model", "suite", "value", "metric", "shots", "chat_template", "prompt", "variant", "source", "source_table"]
SAMPLE_COLUMNS = ["run_id", "model", "task", "doc_id", "filter", "subject", "target", "pred", "correct", "prompt_hash",
                  "doc_hash", "prompt", "record"]
TABLES = {"runs": RUN_COLUMNS, "models": MODEL_COLUMNS, "tasks": TASK_COLUMNS, "scores": STORE_SCORE_COLUMNS,
          "throughput": STORE_THROUGHPUT_COLUMNS, "samples": SAMPLE_COLUMNS, "published": PUBLISHED_COLUMNS}


@dataclass(frozen=True)
class Indexed:
    run_id: str
    scores: int
    samples: int


def default_store(results_dir: Path) -> Path:
    return Path(results_dir) / STORE_NAME


def connect(path: Path, read_only: bool = False) -> sqlite3.Connection:
    """A connection to the store; read-only opens refuse to create or change it."""
    path = Path(path)
    if read_only:
        if not path.is_file():
            raise HarnessError(f"{path}: no results store there. Fix: run `benchharness index results/*/` (or finish a run) "
                               "to create it, or pass --store PATH.")
        return sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, timeout=30)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=60)
    try:
        _create(con, path)
    except BaseException:
        con.close()
        raise
    return con


def _create(con: sqlite3.Connection, path: Path) -> None:
    has_meta = con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
    version = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() if has_meta else None
    if version is not None and int(version[0]) != SCHEMA_VERSION:
        raise HarnessError(f"{path}: a results store of schema {version[0]}; this version writes schema {SCHEMA_VERSION}. "
                           f"Fix: move it aside and rebuild it from the run folders: `benchharness index results/*/ --store {path}`.")
    with con:
        for name, columns in TABLES.items():
            con.execute(f"CREATE TABLE IF NOT EXISTS {name} ({', '.join(_quote(c) for c in columns)})")
            if name != "runs":
                con.execute(f"CREATE INDEX IF NOT EXISTS {name}_run ON {name} (run_id)")
        con.execute("CREATE TABLE IF NOT EXISTS meta (key PRIMARY KEY, value)")
        con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def query(sql: str, store: Path) -> pd.DataFrame:
    """Answer `sql` from the store (read-only): the Python entry point behind `benchharness query`."""
    con = connect(store, read_only=True)
    try:
        return pd.read_sql_query(sql, con)
    except (sqlite3.Error, pd.errors.DatabaseError) as exc:
        raise HarnessError(f"query failed: {exc}. Tables: {', '.join(TABLES)} (columns: `benchharness query "
                           "\"SELECT * FROM pragma_table_info('scores')\"`).") from exc
    finally:
        con.close()


def check_indexable(folder: Path) -> tuple[dict[str, Any], list[str]]:
    """The run's manifest and the reasons it may not enter the store (none: it may)."""
    manifest_path = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return {}, [f"{manifest_path}: not readable as a run manifest ({exc})"]
    from benchharness.files import sha256_file

    problems = []
    if manifest.get("status") != "complete":
        problems.append(f"status is '{manifest.get('status')}', not 'complete' (finish it with `benchharness run CONFIG --resume {folder}`)")
    for rel in ("scores.csv", "throughput.csv"):
        if rel not in (manifest.get("files") or {}) or not (folder / rel).is_file():
            problems.append(f"{rel}: missing")
    for rel, expected in sorted((manifest.get("files") or {}).items()):
        path = folder / rel
        # Sample files may be left out of a copy (results/ in git keeps tables only); a file that
        # is there must be the one the run wrote.
        if path.is_file() and sha256_file(path) != expected:
            problems.append(f"{rel}: content differs from the manifest (`benchharness verify {folder}` says more)")
    return manifest, problems


def index_runs(folders: Iterable[Path], store: Path) -> tuple[list[Indexed], list[str]]:
    """Add each run folder to the store; (what was indexed, one line per run refused)."""
    done, refused = [], []
    con = connect(store)
    try:
        for folder in folders:
            folder = Path(folder)
            manifest, problems = check_indexable(folder)
            if problems:
                refused.append(f"{folder}: not indexed: " + "; ".join(problems))
                continue
            done.append(_index_one(con, folder, manifest, store))
    finally:
        con.close()
    return done, refused


def _index_one(con: sqlite3.Connection, folder: Path, manifest: dict[str, Any], store: Path) -> Indexed:
    run_id = str(manifest["run_id"])
    scores = _read_csv(folder / "scores.csv", SCORE_COLUMNS)
    scores.insert(0, "run_id", run_id)
    # From the manifest, as the run wrote them: runs made before scores.csv carried the cards get them too.
    set_protocol_columns(manifest, scores)
    throughput = _read_csv(folder / "throughput.csv", THROUGHPUT_COLUMNS)
    throughput.insert(0, "run_id", run_id)
    samples = _samples(folder, run_id, manifest)
    volatile = manifest.get("volatile") or {}
    versions = manifest.get("versions") or {}
    config = manifest.get("config") or {}
    report = folder / "report" / "report.html" if (folder / "report" / "report.html").is_file() else folder / "report.md"
    runs = pd.DataFrame([{
        "run_id": run_id, "experiment": manifest.get("experiment"), "config_hash": manifest.get("config_hash"),
        "config_file": manifest.get("config_file"), "status": manifest.get("status"),
        "parity": (manifest.get("parity") or {}).get("status"), "started": volatile.get("started"),
        "finished": volatile.get("finished"), "engine": config.get("engine"),
        "harness_version": versions.get("benchharness"), "lm_eval_version": versions.get("lm_eval"),
        "torch_version": versions.get("torch"), "host": volatile.get("host"),
        "fingerprint_sha256": manifest.get("fingerprint_sha256"), "folder": _relative(folder, store.parent),
        "report": _relative(report, store.parent) if report.is_file() else None, "samples_indexed": len(samples),
        "indexed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }], columns=RUN_COLUMNS)
    models = pd.DataFrame([{
        "run_id": run_id, "model": name, **{c: info.get(c) for c in MODEL_COLUMNS[2:] if c != "source"},
        "source": json.dumps(info.get("source"), sort_keys=True, default=str),
    } for name, info in (manifest.get("models") or {}).items()], columns=MODEL_COLUMNS)
    tasks = pd.DataFrame([{"run_id": run_id, "task": task, **{c: info.get(c) for c in TASK_COLUMNS[2:]}}
                          for task, info in (manifest.get("tasks") or {}).items()], columns=TASK_COLUMNS)
    published = pd.DataFrame([{"run_id": run_id, "model": name, **{c: p.get(c) for c in PUBLISHED_COLUMNS[2:] if c != "source_table"},
                               "source_table": p.get("table")}
                              for name, info in (manifest.get("models") or {}).items() for p in info.get("published") or []],
                             columns=PUBLISHED_COLUMNS)
    frames = {"runs": runs, "models": models, "tasks": tasks, "scores": scores, "throughput": throughput, "samples": samples,
              "published": published}
    with con:  # one transaction: the run's old rows go and its new rows come together, or neither
        for name, frame in frames.items():
            con.execute(f"DELETE FROM {name} WHERE run_id = ?", (run_id,))
            columns = TABLES[name]
            rows = [tuple(_plain(v) for v in row) for row in frame[columns].itertuples(index=False, name=None)]
            con.executemany(f"INSERT INTO {name} ({', '.join(_quote(c) for c in columns)}) VALUES ({', '.join('?' * len(columns))})", rows)
    return Indexed(run_id, len(scores), len(samples))


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    # Older runs lack columns added since (e.g. ttft_p90_s): they are stored empty.
    return pd.read_csv(path).reindex(columns=columns)


def _samples(folder: Path, run_id: str, manifest: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for rel in sorted(manifest.get("files") or {}):
        path = folder / rel
        parts = Path(rel).parts
        if len(parts) != 3 or parts[0] != "samples" or not path.is_file():
            continue
        model, task = parts[1], Path(parts[2]).stem
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            rows.append({
                "run_id": run_id, "model": model, "task": task, "doc_id": record.get("doc_id"),
                "filter": record.get("filter"), "subject": record.get("subject"),
                "target": _text(record.get("target")), "pred": _text(record.get("pred")), "correct": record.get("correct"),
                "prompt_hash": record.get("prompt_hash"), "doc_hash": record.get("doc_hash"), "prompt": record.get("prompt"),
                "record": json.dumps(record, ensure_ascii=False, sort_keys=True),
            })
    return pd.DataFrame(rows, columns=SAMPLE_COLUMNS)


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _plain(value: Any) -> Any:
    """A value SQLite stores: NaN and pandas' NA as NULL, numpy scalars as Python numbers."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, float) and value != value:
        return None
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, default=str)
    return value


def _relative(path: Path, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(base).resolve()))
    except ValueError:
        return str(Path(path).resolve())
