"""The importer's and exporter's choices that options need, torch-free: the CLI builds its parser from them without
loading the readers and writers."""

STORED_DTYPES = ("float32", "bfloat16")  # precisions the weights may be stored in
EXPORT_FORMATS = ("hf", "gguf")  # a Hugging Face model directory; a GGUF file (llama.cpp)
EXPORT_EXTRA = "export"  # the optional dependencies the exports need (transformers, gguf)
EXPORT_DTYPES = ("float32", "float16")  # precisions of exported weights (GGUF: of its matrices; vectors stay float32)


def install_hint(extra: str) -> str:
    """How to install the optional dependencies of ``extra``: the one wording of every missing-package error."""
    return f"install it with `uv sync --extra {extra}` (or `pip install 'hybrid-gpt[{extra}]'`)"
