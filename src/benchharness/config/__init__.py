"""Stage 1, config: the experiment file and the model catalog, validated into typed specs.

Takes: an experiment YAML (and `--set` / command-line overrides), `configs/models.yaml`.
Gives: `Experiment` (suites, models as catalog entries, inference and speed settings, config hash).
Imports: only `errors` and `files` of the package.
"""
