"""The token-mixing probe's tasks and defaults, torch-free: the CLI builds `hybrid-gpt probe`'s flags from
them without loading torch; analysis/probe.py's run_probe takes them as its defaults."""

TASKS = ("recall", "two-hop")
TASK_CHOICES = (*TASKS, "both")
DEFAULT_TASK = "both"
DEFAULT_PATTERNS = ("AAAA", "AAMM", "AANN", "MMAA", "AA")
DEFAULT_SEEDS = (1, 2, 3)
