"""The decoders the estimator times (timing.decode_rate): each primes a cache with a prefill, then is rewound to
``context - n`` and stepped n greedy tokens, so that every repeat decodes the same positions at the same cost
without a second prefill. Ours here, eager or through its compiled static step; the peers' in infer/peer.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hybrid_gpt.errors import RunFailure
from hybrid_gpt.infer.engine import KVCache, StaticKVCache
from hybrid_gpt.model.gpt import GPT


class Stepping:
    """A decoder driven one step at a time: rewound to ``context - n`` and stepped n times (see timing.decode_rate)."""

    def decode(self, tokens: torch.Tensor, n: int) -> torch.Tensor:
        length = tokens.size(1) - n
        self.rewind(length)
        token, out = tokens[:, length:length + 1], []
        for _ in range(n):
            token = self.step(token)
            out.append(token)
        return torch.cat(out, dim=1)


class OursDecoder(Stepping):
    """Our model's side of the estimator: a prefill that primes a KV cache, then cached greedy steps; with a
    ``static`` step (engine.compile_step), the steps run it on a StaticKVCache instead of the eager path."""

    def __init__(self, model: GPT, batch: int, context: int, static: Callable | None = None):
        self.model, self.static = model, static
        self.cache = (KVCache if static is None else StaticKVCache)(model, batch, max_len=context)

    def prefill(self, tokens: torch.Tensor) -> None:
        self.cache.reset()
        self.model(tokens, kv_cache=self.cache, last_only=True)
        self.cache.advance(tokens.size(1))

    def rewind(self, length: int) -> None:
        self.cache.pos = length  # the keys past it are overwritten by the next steps

    def step(self, token: torch.Tensor) -> torch.Tensor:
        if self.static is not None:
            return self.cache.step(self.static, token)[:, -1].argmax(-1, keepdim=True)
        logits = self.model(token, kv_cache=self.cache, last_only=True)
        self.cache.advance(1)
        return logits[:, -1].argmax(-1, keepdim=True)


def compile_check(eager: OursDecoder, compiled: OursDecoder, name: str, prompt: torch.Tensor, n: int) -> float:
    """The fraction of ``n`` greedy steps at which the compiled decoder picks the eager one's token (the same
    prompt, rewound to the same positions); its first call compiles, so a compiler failing is said here in
    one line."""
    for dec in (eager, compiled):
        dec.prefill(prompt)
    want = eager.decode(prompt, n)
    try:
        got = compiled.decode(prompt, n)
    except Exception as e:  # a compiler missing or failing: say so in one line
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise RunFailure(f"--compile: torch.compile failed for {name.removesuffix('+compile')} "
                         f"({type(e).__name__}: {first}); run bench without --compile") from e
    return (want == got).float().mean().item()
