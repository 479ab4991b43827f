"""Stage 4, scorers: how an answer is scored, and the statistics of scores.

Takes: a model's answers (lm-eval's filtered responses). Gives: per-item scores (GSM8K's final
number, HumanEval verdicts from the sandbox) and intervals and paired tests over them (`stats.py`).
Imports: config, models, suites.
"""
