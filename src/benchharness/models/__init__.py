"""Stage 2, models: where a model's weights come from (pack, GGUF, local folder, hub), verified and loaded.

Takes: a catalog entry. Gives: a local transformers folder (converted once into the cache,
sha256-checked) and the loaded model and tokenizer.
Imports: config.
"""
