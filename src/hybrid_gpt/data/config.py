"""The data's limits that options need, torch- and numpy-free: the CLI builds its parser from them without
loading the tokenizer's libraries."""

MAX_VOCAB = 2**16  # token files are uint16
