"""Stage 7, store: what a run writes, and the store of every run.

Takes: lm-eval results, samples and throughput rows. Gives: the run folder (manifest,
scores.csv and sample records built in `score_rows.py`, lm-eval's results format), its
verification, and the SQLite results store across runs (`results_db.py`).
Imports: config, models, suites, scorers, engine, measure.
"""
