"""Command line: benchharness run | report | speed | verify | index | query | leaderboard | models | suites | prepare | fetch | lm-eval."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from pathlib import Path
from typing import get_args

from benchharness import __version__
from benchharness.config.experiment import Engine
from benchharness.run.distributed import RankZeroFailed
from benchharness.errors import HarnessError

log = logging.getLogger("benchharness")

DEFAULT_CATALOG = Path("configs/models.yaml")
DEFAULT_STORE = Path("results/runs.sqlite")
# Exit status of a run that finished but whose parity certificate failed (2: bad input, 130: Ctrl-C).
PARITY_FAILED = 3


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _batch(value: str) -> int | str:
    return value if value == "auto" else int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchharness", description="Reproducible benchmarks of open-weight language models (CN, US, EU).")
    parser.add_argument("--version", action="version", version=f"benchharness {__version__}")
    parser.add_argument("--cache", type=Path, default=None, help="cache folder for converted models and prepared data (default: $BENCHHARNESS_CACHE or ~/.cache/benchharness)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run an experiment config: scores, throughput, report")
    run.add_argument("config", type=Path)
    run.add_argument("--limit", type=int, help="items per task for every suite (a stratified subset)")
    run.add_argument("--models", type=_csv, help="comma-separated catalog names, replacing the config's list")
    run.add_argument("--suites", type=_csv, help="comma-separated suite names, replacing the config's list")
    run.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    run.add_argument("--output", type=Path, help="folder for run folders (default: the config's output_dir)")
    run.add_argument("--engine", choices=list(get_args(Engine)), help="inference engine")
    run.add_argument("--batch-size", type=_batch, help="batch size or 'auto'")
    run.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="set any key of the experiment file, e.g. --set inference.max_batch_tokens=2048 --set suites.0.limit=5 (value read as YAML; repeatable)")
    run.add_argument("--resume", nargs="?", const="latest", metavar="RUN_DIR", help="finish an interrupted run: the newest unfinished run of this config, or RUN_DIR")
    run.add_argument(
        "--processes", type=int, metavar="N",
        help="run in N processes on this machine (one per GPU, or sharing the CPU) under torch's launcher; same as `torchrun --nproc_per_node N -m benchharness run ...`",
    )

    speed = sub.add_parser("speed", help="run only the fixed-shape speed probe for a config's models")
    speed.add_argument("config", type=Path)
    speed.add_argument("--models", type=_csv, help="comma-separated catalog names, replacing the config's list")
    speed.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    speed.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="set any key of the experiment file (as for run)")

    verify = sub.add_parser("verify", help="re-check a run folder's files against its manifest")
    verify.add_argument("run", type=Path)

    report = sub.add_parser("report", help="write report.md (and more) for one or several run folders")
    report.add_argument("runs", type=Path, nargs="+")
    report.add_argument("--output", type=Path, help="folder for the merged report")
    report.add_argument("--published", type=Path, metavar="CATALOG",
                        help="read published scores from this catalog for runs whose manifest has none (runs made before they were recorded)")

    index = sub.add_parser("index", help="add finished run folders to the results store (results/runs.sqlite)")
    index.add_argument("runs", type=Path, nargs="+")
    index.add_argument("--store", type=Path, help="the store file (default: runs.sqlite beside the first run folder)")

    query = sub.add_parser("query", help="answer an SQL query from the results store (read-only)")
    query.add_argument("sql", help="e.g. \"SELECT model, suite, value FROM scores WHERE origin = 'CN' AND task = suite\"")
    query.add_argument("--store", type=Path, default=DEFAULT_STORE, help=f"the store file (default {DEFAULT_STORE})")
    query.add_argument("--format", choices=["table", "csv", "json"], default="table")

    board = sub.add_parser("leaderboard", help="write a self-contained leaderboard page over the results store")
    board.add_argument("--store", type=Path, default=DEFAULT_STORE, help=f"the store file (default {DEFAULT_STORE})")
    board.add_argument("--output", type=Path, help="folder for leaderboard.html (default: leaderboard/ beside the store)")

    models = sub.add_parser("models", help="list the catalog with origin and availability here")
    models.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)

    sub.add_parser("suites", help="list the suites with item counts, sources, licenses and availability")

    prepare = sub.add_parser("prepare", help="prepare suite data into the cache")
    prepare.add_argument("suites", nargs="*", default=["all"])
    prepare.add_argument("--tasks-dir", type=Path, default=Path("configs/tasks"), help="task YAMLs to render (default configs/tasks)")

    # Everything after `lm-eval` is lm-eval's (split off in main(): argparse would claim --help and
    # refuse lm-eval's options), so this parser only names the command in --help.
    sub.add_parser(
        "lm-eval", add_help=False,
        help="lm-eval's own command line with the engine registered: benchharness lm-eval run --model benchharness ... (lm-eval's arguments)",
    )

    fetch = sub.add_parser("fetch", help="resolve models into the cache (assemble, verify, convert)")
    fetch.add_argument("models", nargs="+")
    fetch.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)
    return parser


def _split_lm_eval(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the harness's arguments, lm-eval's): what follows the command `lm-eval` belongs to lm-eval."""
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--cache":
            i += 2
        elif token.startswith("--cache=") or token in ("-q", "--quiet"):
            i += 1
        else:
            return (argv[: i + 1], argv[i + 1 :]) if token == "lm-eval" else (argv, [])
    return argv, []


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    head, lm_eval_arguments = _split_lm_eval(argv)
    args = build_parser().parse_args(head)
    args.lm_eval_arguments = lm_eval_arguments
    args.argv = argv  # `run --processes N` launches the same command line again
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from benchharness.suites.registry import default_cache_dir

    cache_dir = args.cache or default_cache_dir()
    try:
        return COMMANDS[args.command](args, cache_dir)
    except RankZeroFailed as exc:
        return exc.exit_code  # rank 0 has printed the error; one line, not one per process
    except HarnessError as exc:
        print(f"benchharness: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("benchharness: interrupted", file=sys.stderr)
        return 130


def cmd_run(args: argparse.Namespace, cache_dir: Path) -> int:
    from benchharness.config.experiment import Overrides, load_experiment
    from benchharness.run.distributed import check_parallel, init_from_env, launch, launched_world_size, shutdown, strip_processes
    from benchharness.run.plan import find_resumable, preflight
    from benchharness.run.runner import run_experiment
    from benchharness.config.yamlfile import validate

    given = {k: getattr(args, k) for k in ("limit", "models", "suites", "device", "output", "engine", "batch_size", "set") if getattr(args, k) not in (None, [])}
    overrides = validate(Path("command line"), given, Overrides, prefix="--")
    experiment = load_experiment(args.config, overrides)
    resume = None
    if args.resume is not None:
        resume = find_resumable(experiment.output_dir, experiment.config_hash()) if args.resume == "latest" else Path(args.resume)

    if args.processes is not None:
        if args.processes < 1:
            raise HarnessError(f"--processes {args.processes}: must be at least 1. Fix: --processes N with N >= 1.")
        if launched_world_size() > 1:
            raise HarnessError("--processes inside a launched process group (WORLD_SIZE is set). Fix: use either --processes N or accelerate launch / torchrun, not both.")
        if args.processes > 1:
            check_parallel(experiment, args.processes)
            # Check everything (and fill the caches) here, so bad input is one line and exit 2
            # before any process starts, and the processes find data and weights ready.
            preflight(experiment, cache_dir, resume)
            argv = strip_processes(args.argv)
            if resume is not None and args.resume == "latest":
                # Every process must finish the same run folder.
                argv = [a for a in argv if a != "--resume"] + ["--resume", str(resume)]
            launched = dt.datetime.now(dt.timezone.utc)
            code = launch(argv, args.processes)
            # The launcher turns rank 0's exit status 3 into its own 1; the run's manifest says which it was.
            folder = resume or _run_started_since(experiment.output_dir, experiment.config_hash(), launched)
            return PARITY_FAILED if code != 0 and folder is not None and _parity_failed(folder) else code

    dist = init_from_env(experiment.inference.device)
    try:
        folder = run_experiment(experiment, cache_dir, resume=resume, dist=dist)
    finally:
        shutdown(dist)
    if dist is None or dist.is_main:
        print(folder)
        if _parity_failed(folder):
            parity = json.loads((folder / "manifest.json").read_text())["parity"]
            print(f"benchharness: parity failed: the engine's results differ from lm-eval's hf model beyond the tolerance "
                  f"on {', '.join(parity.get('failed', []))} (scores kept; see manifest.json 'parity' and report.md). "
                  "Fix: rerun those models with `--engine hf`, and report the difference.", file=sys.stderr)
            return PARITY_FAILED
    return 0


def _parity_failed(folder: Path) -> bool:
    """The run in `folder` finished and its parity certificate failed."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("status") == "complete" and (manifest.get("parity") or {}).get("status") == "failed"


def _run_started_since(output_dir: Path, config_hash: str, since: dt.datetime) -> Path | None:
    """The run folder of this config that launched processes created (run_id = UTC start time + hash)."""
    names = sorted(p.name for p in output_dir.glob(f"*-{config_hash}") if p.name >= f"{since:%Y%m%d-%H%M%S}")
    return output_dir / names[-1] if names else None


def cmd_speed(args: argparse.Namespace, cache_dir: Path) -> int:
    from benchharness.config.experiment import Overrides, load_experiment
    from benchharness.run.speed_command import run_speed_only
    from benchharness.config.yamlfile import validate

    given = {k: getattr(args, k) for k in ("models", "device", "set") if getattr(args, k) not in (None, [])}
    experiment = load_experiment(args.config, validate(Path("command line"), given, Overrides, prefix="--"))
    print(run_speed_only(experiment, cache_dir))
    return 0


def cmd_verify(args: argparse.Namespace, cache_dir: Path) -> int:
    from benchharness.store.verify import verify_run

    problems = verify_run(args.run)
    for line in problems:
        print(line)
    if problems:
        print(f"{args.run}: {len(problems)} problem(s)")
        return 1
    print(f"{args.run}: every file matches the manifest")
    return 0


def cmd_report(args: argparse.Namespace, cache_dir: Path) -> int:
    from benchharness.report.render import build_report

    for run in args.runs:
        if not (run / "manifest.json").is_file():
            raise HarnessError(f"{run}: not a run folder (no manifest.json). Fix: pass folders under results/.")
    if args.published is not None and not args.published.is_file():
        raise HarnessError(f"--published {args.published}: no such catalog file. Fix: e.g. --published configs/models.yaml.")
    paths = build_report(list(args.runs), args.output, published=args.published)
    print(paths)
    return 0


def cmd_index(args: argparse.Namespace, cache_dir: Path) -> int:
    from benchharness.store.results_db import default_store, index_runs

    store = args.store or default_store(Path(args.runs[0]).resolve().parent)
    done, refused = index_runs(args.runs, store)
    for item in done:
        print(f"{item.run_id}: {item.scores} score rows, {item.samples} samples -> {store}")
    for line in refused:
        print(f"benchharness: {line}", file=sys.stderr)
    return 1 if refused else 0


def cmd_query(args: argparse.Namespace, cache_dir: Path) -> int:
    import pandas as pd

    from benchharness.store.results_db import query

    frame = query(args.sql, args.store)
    if args.format == "csv":
        print(frame.to_csv(index=False), end="")
    elif args.format == "json":
        print(frame.to_json(orient="records", force_ascii=False))
    else:
        with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 200):
            print(frame.to_string(index=False) if len(frame) else "(no rows)")
    return 0


def cmd_leaderboard(args: argparse.Namespace, cache_dir: Path) -> int:
    from benchharness.report.leaderboard import write_leaderboard

    print(write_leaderboard(args.store, args.output))
    return 0


def cmd_models(args: argparse.Namespace, cache_dir: Path) -> int:
    from benchharness.config.catalog import load_catalog
    from benchharness.models.sources import availability

    catalog = load_catalog(args.catalog)
    print(f"{'name':36} {'origin':6} {'params':7} {'organisation':34} {'published':9} available here")
    for entry in sorted(catalog.models.values(), key=lambda e: (e.origin, e.family, e.name)):
        states = [availability(s, cache_dir) for s in entry.sources]
        usable = next((s for s in states if s.available), None)
        where = f"yes ({usable.detail})" if usable else f"no ({states[0].detail})"
        # How many scores its makers published (catalog `published:`), on how many suites.
        published = f"{len(entry.published)} ({len({p.suite for p in entry.published})})" if entry.published else "-"
        print(f"{entry.name:36} {entry.origin:6} {entry.params:7} {entry.organisation[:34]:34} {published:9} {where}")
    return 0


def cmd_suites(args: argparse.Namespace, cache_dir: Path) -> int:
    from benchharness.suites.registry import SUITES

    for suite in SUITES.values():
        ok, detail = suite.availability()
        print(f"{suite.name}  (lm-eval task {suite.task}, {suite.items:,} items, available here: {'yes' if ok else 'no'})")
        print(f"    {suite.description}")
        print(f"    source: {suite.source}; license: {suite.license}")
        if suite.metric_note:
            print(f"    score: {suite.metric_note}")
        if not ok:
            print(f"    missing: {detail}")
    return 0


def cmd_prepare(args: argparse.Namespace, cache_dir: Path) -> int:
    from benchharness.suites.registry import SUITES, get_suite, prepare_suite, render_tasks

    names = list(SUITES) if args.suites == ["all"] else args.suites
    for name in names:
        suite = get_suite(name)
        ok, detail = suite.availability()
        if not ok and args.suites == ["all"]:
            print(f"{name}: skipped, data not available here ({detail})")
            continue
        prepared = prepare_suite(suite, cache_dir / "data")
        print(f"{prepared.name}: {prepared.n_items} items in {prepared.folder} (fingerprint {prepared.fingerprint[:16]})")
    tasks = render_tasks(args.tasks_dir, cache_dir / "data", cache_dir / "tasks")
    print(f"task YAMLs for lm-eval: {tasks}  (lm_eval --include_path {tasks} --tasks bh_mmlu ...)")
    return 0


def cmd_fetch(args: argparse.Namespace, cache_dir: Path) -> int:
    from benchharness.config.catalog import load_catalog
    from benchharness.models.sources import resolve_model

    catalog = load_catalog(args.catalog)
    for name in args.models:
        resolved = resolve_model(catalog.get(name), cache_dir)
        print(f"{name}: {resolved.path} (sha256 {resolved.weights_sha256})")
    return 0


def cmd_lm_eval(args: argparse.Namespace, cache_dir: Path) -> int:
    from benchharness.engine.lm_eval_cli import run_lm_eval

    return run_lm_eval(args.lm_eval_arguments, cache_dir / "tasks")


COMMANDS = {
    "run": cmd_run,
    "report": cmd_report,
    "models": cmd_models,
    "suites": cmd_suites,
    "prepare": cmd_prepare,
    "fetch": cmd_fetch,
    "speed": cmd_speed,
    "verify": cmd_verify,
    "lm-eval": cmd_lm_eval,
    "index": cmd_index,
    "query": cmd_query,
    "leaderboard": cmd_leaderboard,
}
