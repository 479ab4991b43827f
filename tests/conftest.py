"""Shared fixtures: a tiny real-architecture model built in-process, and experiment files in tmp."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with a BPE tokenizer trained on MMLU-like text: real code paths, seconds to build."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [
        "The following are multiple choice questions (with answers) about abstract algebra.",
        "Answer: A B C D", "Find the degree for the given field extension over Q.",
        "Which of the following is true? Statement 1 | Statement 2 | True, False",
    ] * 4
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def write_experiment(folder: Path, body: str, catalog: str | None = None) -> Path:
    """An experiment file in `folder`, pointing at the repo's task YAMLs and a catalog."""
    folder.mkdir(parents=True, exist_ok=True)
    catalog_path = folder / "models.yaml"
    catalog_path.write_text(textwrap.dedent(catalog) if catalog else (REPO / "configs" / "models.yaml").read_text())
    path = folder / "experiment.yaml"
    header = f"catalog: {catalog_path}\ntasks_dir: {REPO / 'configs' / 'tasks'}\n"
    path.write_text(header + textwrap.dedent(body))
    return path


def tiny_catalog(model_dir: Path) -> str:
    return f"""
    models:
      - name: tiny-llama
        origin: EU
        organisation: test
        family: Llama
        params: 40K
        license: Apache-2.0
        sources:
          - local: {model_dir}
    """


def read_jsonl(path: Path) -> list[dict]:
    # split on "\n" only: str.splitlines() also breaks at U+2028 and friends, which JSON strings may hold.
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def run_folders(output_dir: Path) -> list[Path]:
    """The run folders in an output folder (beside them: runs.sqlite, the results store)."""
    return sorted(p for p in output_dir.iterdir() if p.is_dir())
