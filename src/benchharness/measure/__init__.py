"""Stage 6, measure: how fast, against what the machine can do.

Takes: a loaded model and an lm-eval model. Gives: the machine's limits (matmul FLOP/s, memory
bandwidth), the fixed-shape and serving probes, timings and peak memory, and the rows of
throughput.csv (`probe.py`), from a metered wrapper around any engine (`metered.py`).
Imports: config, models, suites, scorers, engine.
"""
