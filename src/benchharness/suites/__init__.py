"""Stage 3, suites: each suite's raw data prepared into fingerprinted JSONL, and the task YAMLs rendered for lm-eval.

Takes: a suite name and where its data is. Gives: prepared files in the cache, their
fingerprint, and lm-eval task YAMLs pointing at them (`registry.py`; one preparer per source).
Imports: config, models.
"""
