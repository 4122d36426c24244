"""The importer's choices that options need, torch-free: the CLI builds its parser from them without loading
the readers."""

STORED_DTYPES = ("float32", "bfloat16")  # precisions the weights may be stored in
