"""The generate_until requests of a harness task, as lm-eval builds them from the rendered task
YAML (`benchharness prepare` renders them), for the benchmark scripts beside this file."""

from __future__ import annotations

from pathlib import Path

from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from benchharness.suites.registry import default_cache_dir


def generate_requests(task_name: str, limit: int | None, cache: Path | None = None) -> list[Instance]:
    """Task `task_name`'s generate_until requests over its first `limit` documents (None: all)."""
    tasks_dir = (cache or default_cache_dir()) / "tasks"
    if not tasks_dir.is_dir():
        raise SystemExit(f"no rendered tasks at {tasks_dir}: run `benchharness prepare` first")
    task = TaskManager(include_path=str(tasks_dir)).load_task_or_group([task_name])[task_name]
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    requests = [instance for instance in task.instances if instance.request_type == "generate_until"]
    if not requests:
        raise SystemExit(f"{task_name} has no generate_until requests")
    return requests
