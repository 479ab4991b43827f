"""`benchharness lm-eval ...`: lm-eval's own command line with the benchharness engine registered.

lm-eval 0.4.13 discovers no plugins, so `lm_eval run --model benchharness` alone fails with "no
model for this name found". This imports the engine (which registers it as the lm-eval model
`benchharness`), then parses and executes the arguments with lm-eval's own command line
(`lm_eval._cli.HarnessCLI`): every subcommand, argument and flag means what it means there.

Two additions, both said on stderr:

- `run` with no `--include_path` (and no `--config`) gets the harness's rendered task folder
  (`<cache>/tasks`, made by `benchharness prepare` or `run`), so its suites (bh_mmlu,
  bh_gsm8k_cot, ...) are found by name next to lm-eval's own tasks.
- `run --model benchharness`: lm-eval hands `--device` and `--batch_size` to the model over
  the same keys in `--model_args`, with its own defaults (cuda:0, batch 1) when they are not
  given. For this model the flags that are not given take the value `--model_args` names, else
  the engine's default (batch_size auto; cuda if there is one, else cpu), so
  `--model_args device=cpu,batch_size=auto` means what it says. A flag and a model argument
  that disagree are refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchharness.errors import HarnessError

# lm-eval passes these to the model beside --model_args (simple_evaluate's additional_config).
_SHARED_KEYS = ("device", "batch_size", "max_batch_size")


def engine_arguments(args: argparse.Namespace) -> None:
    """Reconcile `--device/--batch_size/--max_batch_size` with `--model_args` for the benchharness model (in place)."""
    import torch

    model_args = args.model_args if isinstance(args.model_args, dict) else {}
    defaults = {"device": "cuda" if torch.cuda.is_available() else "cpu", "batch_size": "auto", "max_batch_size": None}
    for key in _SHARED_KEYS:
        flag = getattr(args, key, None)
        named = model_args.pop(key, None)
        if flag is not None and named is not None and str(flag) != str(named):
            raise HarnessError(
                f"lm-eval: --{key} {flag} and --model_args {key}={named} disagree. Fix: give the {key} once."
            )
        setattr(args, key, flag if flag is not None else named if named is not None else defaults[key])
    args.model_args = model_args


def run_lm_eval(arguments: list[str], tasks_dir: Path | None) -> int:
    """Run lm-eval's command line on `arguments` (what follows `benchharness lm-eval`); its exit status."""
    import benchharness.engine  # noqa: F401  (registers the lm-eval model "benchharness")
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    arguments = list(arguments)
    if arguments[:1] == ["--"]:
        arguments = arguments[1:]
    setup_logging()
    cli = HarnessCLI()
    saved = sys.argv
    sys.argv = ["lm-eval", *arguments]  # HarnessCLI reads sys.argv (and inserts `run` for the legacy form)
    try:
        args = cli.parse_args()
    except SystemExit as exc:  # --help, or an argument error argparse has printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    finally:
        sys.argv = saved
    if getattr(args, "command", None) == "run":
        if args.include_path is None and args.config is None and tasks_dir is not None:
            if tasks_dir.is_dir():
                args.include_path = str(tasks_dir)
                print(f"benchharness lm-eval: tasks included from {tasks_dir} (--include_path chooses another folder)", file=sys.stderr)
            else:
                print(f"benchharness lm-eval: no harness tasks in {tasks_dir} (`benchharness prepare` makes them)", file=sys.stderr)
        if args.model == "benchharness":
            engine_arguments(args)
    cli.execute(args)
    return 0
