"""A model folder's attention heads, for the attention benchmarks (read from its config.json, no weights)."""

from __future__ import annotations

import json
from pathlib import Path


def attention_heads(model_dir: Path) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) of the decoder in `model_dir`."""
    config = json.loads((model_dir / "config.json").read_text())
    config = config.get("text_config", config)
    heads, kv_heads = int(config["num_attention_heads"]), int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return heads, kv_heads, int(config.get("head_dim") or int(config["hidden_size"]) // heads)
