"""Inference, apart from the model: the KV-cache engine, chat, the benchmark and the transformers peer."""
