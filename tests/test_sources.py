"""Weight sources: packs are verified by sha256, local folders load, the hub fails fast offline."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from benchharness.config.catalog import GgufSource, HubSource, LocalSource, ModelEntry, PackSource
from benchharness.errors import SourceError
from benchharness.models.sources import availability, load_model, resolve_model


def _entry(*sources: object) -> ModelEntry:
    return ModelEntry(name="m", origin="EU", organisation="o", family="f", params="1M", license="MIT", sources=list(sources))


@pytest.fixture()
def fake_pack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, bytes]:
    """An installed package 'bh_fake_pack' holding two part files."""
    pkg = tmp_path / "site" / "bh_fake_pack"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "p1.bin").write_bytes(b"GGUF-part-one|")
    (pkg / "data" / "p2.bin").write_bytes(b"part-two")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return "bh_fake_pack", b"GGUF-part-one|part-two"


def test_pack_with_wrong_hash_is_refused(fake_pack: tuple[str, bytes], tmp_path: Path) -> None:
    pkg, _ = fake_pack
    src = PackSource(pack=[f"{pkg}/data/p1.bin", f"{pkg}/data/p2.bin"], sha256="0" * 64, install="pip install bh-fake-pack")
    assert availability(src, tmp_path).available
    with pytest.raises(SourceError, match="sha256 mismatch.*pip install bh-fake-pack"):
        resolve_model(_entry(src), tmp_path / "cache")
    # Nothing half-assembled or converted is left in the cache.
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert leftovers == []


def test_pack_hash_checks_the_concatenation_in_order(fake_pack: tuple[str, bytes], tmp_path: Path) -> None:
    pkg, content = fake_pack
    good = hashlib.sha256(content).hexdigest()
    swapped = PackSource(pack=[f"{pkg}/data/p2.bin", f"{pkg}/data/p1.bin"], sha256=good, install="i")
    with pytest.raises(SourceError, match="sha256 mismatch"):
        resolve_model(_entry(swapped), tmp_path / "cache")


def test_missing_pack_names_the_install_command(tmp_path: Path) -> None:
    src = PackSource(pack=["bh_not_installed_pkg/x.bin"], sha256="0" * 64, install="pip install bh-not-installed")
    state = availability(src, tmp_path)
    assert not state.available and "pip install bh-not-installed" in state.detail
    with pytest.raises(SourceError, match="not available on this machine.*pip install bh-not-installed"):
        resolve_model(_entry(src), tmp_path)


def test_gguf_file_with_wrong_hash_is_refused(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not really gguf")
    with pytest.raises(SourceError, match="sha256 mismatch"):
        resolve_model(_entry(GgufSource(gguf=gguf, sha256="1" * 64)), tmp_path / "cache")


def test_hub_offline_fails_fast_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(SourceError) as err:
        resolve_model(_entry(HubSource(hub="org/never-cached-model")), tmp_path)
    message = str(err.value)
    assert "org/never-cached-model" in message and "hub" in message and "\n" not in message


def test_hub_unreachable_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Point the hub at a closed local port: the same failure as a machine without internet.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for mod in [m for m in sys.modules if m.startswith("huggingface_hub")]:
        monkeypatch.delitem(sys.modules, mod)
    with pytest.raises(SourceError, match="org/some-model.*unreachable or not cached"):
        resolve_model(_entry(HubSource(hub="org/some-model")), tmp_path)


def test_local_folder_resolves_and_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    entry = _entry(HubSource(hub="org/not-here"), LocalSource(local=tiny_model_dir))
    resolved = resolve_model(entry, tmp_path)  # the hub source is skipped offline, the local one used
    assert resolved.path == tiny_model_dir.resolve()
    assert resolved.weights_sha256 is not None and len(resolved.weights_sha256) == 64
    model, tokenizer = load_model(resolved, entry, "float32", "cpu")
    assert model.config.num_hidden_layers == 2 and tokenizer.bos_token == "<s>"
