"""Experiment config: good files load into typed specs; every kind of bad file gives one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchharness.config.experiment import Overrides, load_experiment
from benchharness.errors import ConfigError
from conftest import REPO, write_experiment

GOOD = """
name: t
models: [smollm2-135m-instruct-q41, gemma-3-270m-q4km]
suites:
  - name: mmlu
    limit: 10
    num_fewshot: 0
inference: {dtype: float32, device: cpu, batch_size: 4}
seed: 7
output_dir: out
"""


def test_default_experiment_loads() -> None:
    exp = load_experiment(REPO / "configs" / "experiments" / "default.yaml")
    assert [m.origin for m in exp.models] == ["CN", "US", "EU"]
    assert exp.suites[0].name == "mmlu" and exp.suites[0].limit == 228
    assert exp.output_dir == REPO / "results"  # relative paths are taken from the file's folder
    assert len(exp.config_hash()) == 8


def test_good_file_and_overrides(tmp_path: Path) -> None:
    path = write_experiment(tmp_path, GOOD)
    exp = load_experiment(path)
    assert [m.name for m in exp.models] == ["smollm2-135m-instruct-q41", "gemma-3-270m-q4km"]
    assert exp.inference.batch_size == 4 and exp.seed == 7
    assert exp.output_dir == tmp_path / "out"

    over = load_experiment(path, Overrides(limit=3, models=["gemma-3-270m-q4km"], device="cuda", output=Path("/x"), suites=["mmlu"]))
    assert [m.name for m in over.models] == ["gemma-3-270m-q4km"]
    assert over.suites[0].limit == 3 and over.suites[0].num_fewshot == 0
    assert over.inference.device == "cuda" and over.output_dir == Path("/x")
    assert over.config_hash() != exp.config_hash()


def test_hash_is_stable_and_ignores_output_folder(tmp_path: Path) -> None:
    a = load_experiment(write_experiment(tmp_path / "a", GOOD))
    b = load_experiment(write_experiment(tmp_path / "b", GOOD.replace("output_dir: out", "output_dir: elsewhere")))
    c = load_experiment(write_experiment(tmp_path / "c", GOOD.replace("seed: 7", "seed: 8")))
    assert a.config_hash() == b.config_hash() != c.config_hash()


def test_inline_model(tmp_path: Path) -> None:
    body = GOOD.replace(
        "models: [smollm2-135m-instruct-q41, gemma-3-270m-q4km]",
        "models:\n  - {name: mine, origin: EU, organisation: me, family: x, params: 1B, license: MIT, sources: [{local: weights}]}",
    )
    exp = load_experiment(write_experiment(tmp_path, body))
    assert exp.models[0].name == "mine"
    assert exp.models[0].sources[0].local == tmp_path / "weights"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("name: t\nmodels: [a\nsuites: []\n", "malformed YAML"),
        (GOOD + "colour: blue\n", "colour: unknown key"),
        (GOOD.replace("seed: 7", "sed: 7"), "sed: unknown key"),
        (GOOD.replace("num_fewshot: 0", "num_shots: 0"), "suites[0].num_shots: unknown key"),
        (GOOD.replace("limit: 10", "limit: 0"), "suites[0].limit: Input should be greater than 0"),
        (GOOD.replace("limit: 10", "limit: -5"), "suites[0].limit"),
        (GOOD.replace("limit: 10", "limit: lots"), "suites[0].limit"),
        (GOOD.replace("seed: 7", "seed: [1]"), "seed:"),
        (GOOD.replace("batch_size: 4", "batch_size: 0"), "inference.batch_size"),
        (GOOD.replace("device: cpu", "device: tpu"), "inference.device"),
        (GOOD.replace("dtype: float32", "dtype: float8"), "inference.dtype"),
        (GOOD.replace("name: t\n", ""), "name: required key is missing"),
        (GOOD.replace("gemma-3-270m-q4km", "no-such-model"), "models[1]: unknown model 'no-such-model'"),
        (GOOD.replace("gemma-3-270m-q4km", "smollm2-135m-instruct-q41"), "listed twice"),
        (GOOD.replace("inference:", "engine: tgi\ninference:"), "engine"),
    ],
)
def test_bad_files_name_file_key_and_fix(tmp_path: Path, body: str, expected: str) -> None:
    path = write_experiment(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    message = str(err.value)
    assert str(path) in message
    assert expected in message
    assert "Fix" in message or "Did you mean" in message or "benchharness models" in message


def test_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_experiment(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="experiment config file not found"):
        load_experiment(tmp_path / "nope.yaml")


def test_bad_inline_model_names_its_key(tmp_path: Path) -> None:
    body = GOOD.replace(
        "models: [smollm2-135m-instruct-q41, gemma-3-270m-q4km]",
        "models:\n  - {name: mine, origin: FR, organisation: me, family: x, params: 1B, license: MIT, sources: [{local: w}]}",
    )
    with pytest.raises(ConfigError, match=r"models\[0\]\.origin"):
        load_experiment(write_experiment(tmp_path, body))


def test_set_overrides_any_key_and_changes_the_hash(tmp_path: Path) -> None:
    path = write_experiment(tmp_path, GOOD)
    base = load_experiment(path)
    exp = load_experiment(path, Overrides(set=["inference.max_batch_tokens=2048", "suites.0.limit=5", "parity.requests=0",
                                              "speed=null", "chat_template=true"]))
    assert exp.inference.max_batch_tokens == 2048 and exp.inference.batch_size == 4  # siblings kept
    assert exp.suites[0].limit == 5 and exp.suites[0].num_fewshot == 0
    assert exp.parity.requests == 0 and exp.speed is None and exp.chat_template is True
    assert exp.config_hash() != base.config_hash()
    # a value that decides no result (parity) leaves the hash as it is, as in the file
    assert load_experiment(path, Overrides(set=["parity.requests=3"])).config_hash() == base.config_hash()
    # the command line's own CLI entry point reaches the same experiment
    from benchharness.cli import build_parser
    args = build_parser().parse_args(["run", str(path), "--set", "suites.0.limit=5", "--set", "seed=9"])
    assert args.set == ["suites.0.limit=5", "seed=9"]


@pytest.mark.parametrize("assignment, expected", [
    ("inference.batch_size=0", "inference.batch_size: "),            # validated like the file
    ("inference.batch_sise=4", "inference.batch_sise: unknown key"),  # misspelt key
    ("suites.3.limit=5", "is a list of 1; '3' is not an index"),
    ("seed.x=1", "'seed' is 7, not a mapping or list"),
    ("seed", "expected key.path=value"),
])
def test_set_errors_name_the_key_and_the_fix(tmp_path: Path, assignment: str, expected: str) -> None:
    path = write_experiment(tmp_path, GOOD)
    with pytest.raises(ConfigError) as info:
        load_experiment(path, Overrides(set=[assignment]))
    message = str(info.value)
    assert expected in message and "Fix:" in message
