"""Per-suite data preparation: each module turns one raw source into prepared JSONL files."""
