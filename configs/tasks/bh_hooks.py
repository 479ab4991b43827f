"""Functions the task YAMLs here name with `!function bh_hooks.<name>` (lm-eval loads modules beside the YAML).

Thin re-exports: the code lives in benchharness.scorers.hooks, where it is tested.
"""

from benchharness.scorers.hooks import (
    gsm8k_process_results,
    humaneval_instruct_process_results,
    humaneval_process_results,
    summarize_sandbox,
)

__all__ = ["gsm8k_process_results", "humaneval_instruct_process_results", "humaneval_process_results", "summarize_sandbox"]
