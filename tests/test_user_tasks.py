"""A user's own tasks, stock lm-eval tasks offline, chat templates, and the `speed` command."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from benchharness.cli import main
from conftest import read_jsonl, tiny_catalog, write_experiment, run_folders

BODY = """
name: user
models: [tiny-llama]
suites:
  - name: {suite}
    limit: 3
engine: hf
inference: {{dtype: float32, device: cpu, batch_size: 4}}
output_dir: runs
speed: null
"""


def test_task_from_an_include_path(tmp_path: Path, tiny_model_dir: Path) -> None:
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    data = tmp_path / "capitals.jsonl"
    data.write_text("".join(json.dumps({"q": f"Capital number {i}?", "choices": ["Paris", "Rome"], "gold": i % 2}) + "\n" for i in range(4)))
    (tasks / "capitals.yaml").write_text(textwrap.dedent(f"""
        task: my_capitals
        dataset_path: json
        dataset_kwargs: {{data_files: {{test: "{data}"}}}}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{q}}}}\\nAnswer:"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: gold
        metric_list: [{{metric: acc}}]
    """))
    config = write_experiment(tmp_path, BODY.format(suite="my_capitals") + f"include_paths: [{tasks}]\n", tiny_catalog(tiny_model_dir))
    assert main(["--cache", str(tmp_path / "cache"), "run", str(config)]) == 0
    (run,) = run_folders(config.parent / "runs")
    samples = read_jsonl(run / "samples/tiny-llama/my_capitals.jsonl")
    assert [s["target"] for s in samples] == [0, 1, 0]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["tasks"]["my_capitals"]["data_fingerprint"] is None  # not data the harness prepared


def test_stock_task_needing_the_hub_fails_fast_offline(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    config = write_experiment(tmp_path, BODY.format(suite="hellaswag"), tiny_catalog(tiny_model_dir))
    assert main(["--cache", str(tmp_path / "cache"), "run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "hellaswag" in err and "hub" in err and "Fix" in err
    assert not (config.parent / "runs").exists()


def test_unknown_task_name(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_experiment(tmp_path, BODY.format(suite="no_such_task_anywhere"), tiny_catalog(tiny_model_dir))
    assert main(["--cache", str(tmp_path / "cache"), "run", str(config)]) == 2
    assert "unknown suite 'no_such_task_anywhere'" in capsys.readouterr().err


def test_chat_template_switch(tmp_path: Path, tiny_model_dir: Path) -> None:
    chat_dir = tmp_path / "tiny-chat"
    shutil.copytree(tiny_model_dir, chat_dir)
    config_path = chat_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    config_path.write_text(json.dumps(config))
    catalog = tiny_catalog(chat_dir).replace("license: Apache-2.0", "license: Apache-2.0\n        instruct: true")
    hashes = {}
    for switch in (False, True):
        cfg = write_experiment(tmp_path / str(switch), BODY.format(suite="mmlu") + f"chat_template: {str(switch).lower()}\n", catalog)
        assert main(["--cache", str(tmp_path / "cache"), "run", str(cfg)]) == 0
        (run,) = run_folders(cfg.parent / "runs")
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["models"]["tiny-llama"]["chat_template"] is switch
        hashes[switch] = [s["prompt_hash"] for s in read_jsonl(run / "samples/tiny-llama/bh_mmlu.jsonl")]
    assert hashes[False] != hashes[True]  # the template really changed the prompts


def test_speed_command(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = BODY.format(suite="mmlu").replace("speed: null", "speed: {batch: 1, prompt_len: 8, new_tokens: 3, warmup: 1, min_reps: 2, min_seconds: 0, limits_min_seconds: 0}")
    config = write_experiment(tmp_path, body, tiny_catalog(tiny_model_dir))
    assert main(["--cache", str(tmp_path / "cache"), "speed", str(config)]) == 0
    out = capsys.readouterr().out
    assert "GFLOP/s" in out and "tiny-llama" in out
    assert "prefill" in out and "decode" in out
    assert not (config.parent / "runs").exists()  # the probe alone writes no run folder
