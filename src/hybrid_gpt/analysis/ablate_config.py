"""The ablation's defaults, torch-free: the CLI builds `hybrid-gpt ablate`'s flags from them without loading
torch; analysis/ablate.py's run_ablate takes them as its defaults."""

DEFAULT_VARIANTS = ("AAAA", "AAMM", "AANN", "MMAA", "AA", "AAMM:matched")
BUDGETS = ("steps", "time")
DEFAULT_BUDGET = "steps"
DEFAULT_SEEDS = (1, 2, 3)
