"""Stage 9, run: the orchestration that passes an experiment through the stages.

Takes: an `Experiment`. Gives: a complete run folder, added to the results store, with its
report. `plan.py` checks every input before anything is written; `runner.py` evaluates
model by model and suite by suite; `distributed.py` spreads it over processes.
Imports: every stage before it.
"""
