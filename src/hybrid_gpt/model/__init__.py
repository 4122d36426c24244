"""The one model: a GPT whose blocks mix tokens by attention (A), a per-token MLP (M) or nothing (N)."""

from hybrid_gpt.model.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
