"""Training data: documents from text, jsonl, parquet and `datasets` sources (sources.py),
prepared once into token-id shards (shards.py, written by jax_residual.prepare)."""
