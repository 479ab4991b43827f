"""The model catalog: the shipped file is complete and valid; bad entries are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchharness.config.catalog import HubSource, PackSource, load_catalog
from benchharness.errors import ConfigError
from conftest import REPO

CATALOG = REPO / "configs" / "models.yaml"


def test_offline_packs_one_per_origin() -> None:
    catalog = load_catalog(CATALOG)
    packs = {name: e for name, e in catalog.models.items() if any(isinstance(s, PackSource) for s in e.sources)}
    assert {e.origin: name for name, e in packs.items()} == {
        "CN": "qwen2.5-coder-0.5b-instruct-q4km",
        "US": "gemma-3-270m-q4km",
        "EU": "smollm2-135m-instruct-q41",
    }
    for entry in packs.values():
        assert "dequantized" in entry.build  # tables must say which build produced a score


@pytest.mark.parametrize(
    ("origin", "families"),
    [
        ("CN", {"Qwen2.5", "Qwen3", "DeepSeek-R1-Distill", "GLM-4", "InternLM3", "Yi-1.5", "MiniCPM4"}),
        ("US", {"Llama 3.2", "Llama 3.1", "Gemma 2", "Gemma 3", "Phi-3", "Phi-4", "OLMo 2"}),
        ("EU", {"Mistral", "Mistral Small", "Ministral", "EuroLLM", "Salamandra", "Teuken", "SmolLM2"}),
    ],
)
def test_mainstream_hub_models_per_origin(origin: str, families: set[str]) -> None:
    catalog = load_catalog(CATALOG)
    found = {e.family for e in catalog.models.values() if e.origin == origin and any(isinstance(s, HubSource) for s in e.sources)}
    assert families <= found


def test_duplicate_names_refused(tmp_path: Path) -> None:
    entry = "  - {name: a, origin: US, organisation: o, family: f, params: 1B, license: MIT, sources: [{hub: o/a}]}\n"
    path = tmp_path / "models.yaml"
    path.write_text("models:\n" + entry + entry)
    with pytest.raises(ConfigError, match=r"models\[1\]\.name: 'a' appears twice"):
        load_catalog(path)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("{name: a, origin: XX, organisation: o, family: f, params: 1B, license: MIT, sources: [{hub: o/a}]}", "models[0].origin"),
        ("{name: a, origin: US, organisation: o, family: f, params: 1B, license: MIT, sources: []}", "models[0].sources"),
        ("{name: a, origin: US, organisation: o, family: f, params: 1B, license: MIT, sources: [{pack: [x/y], sha256: abc, install: i}]}", "sha256"),
        ("{name: a, origin: US, organisation: o, family: f, params: 1B, license: MIT, sources: [{hub: o/a, revison: v1}]}", "revison: unknown key"),
        ("{name: 'bad name', origin: US, organisation: o, family: f, params: 1B, license: MIT, sources: [{hub: o/a}]}", "models[0].name"),
    ],
)
def test_bad_entries(tmp_path: Path, entry: str, expected: str) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  - " + entry + "\n")
    with pytest.raises(ConfigError) as err:
        load_catalog(path)
    assert str(path) in str(err.value) and expected in str(err.value)
