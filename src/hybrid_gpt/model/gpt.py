"""The GPT: GPT-2 architecture whose token mixer is chosen per block by a layer pattern.

    A  causal multi-head self-attention (the usual GPT-2 block)
    M  a static per-token MLP in place of attention: LayerNorm -> Linear(d, h) -> GELU -> Linear(h, d)
    N  no token mixer at all (the block keeps only its feed-forward MLP): the zero-parameter control

"AAAA" is the standard model and "AAMM" the original experiment's hybrid. Only the attention
sub-layer changes; every block keeps its feed-forward MLP. M and N blocks never look at other
positions, so they need no KV cache. Names follow GPT-2's (except `mixer`, GPT-2's `attn`) so that
weights map 1:1 onto Hugging Face's GPT2LMHeadModel for the standard model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.model.kernels import Linear  # nn.Linear whose CPU products run on oneDNN (see kernels.py)

MIXERS = "AMN"
_USE_ONLY = "use only A (attention), M (per-token MLP) and N (no mixer)"


def check_layers(pattern) -> str:
    """``pattern`` itself if it is a layer pattern: a non-empty string of the letters in MIXERS (upper case).

    The one validator of layer patterns; a user's spelling goes through :func:`parse_layers` first.
    """
    if not isinstance(pattern, str) or not pattern:
        raise HybridGPTError(f"a layer pattern must be non-empty, one letter per block; {_USE_ONLY}")
    bad = sorted(set(pattern) - set(MIXERS))
    if bad:
        raise HybridGPTError(f"layer pattern {pattern!r} has letters {''.join(bad)!r}; {_USE_ONLY}")
    return pattern


def parse_layers(text) -> str:
    """A layer pattern as a user writes it (" aamm ") in its normal form ("AAMM"), checked by check_layers."""
    return check_layers(text.strip().upper() if isinstance(text, str) else text)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout, skipped outright when it would do nothing (eval mode or p == 0): a decoded token
    passes several dropout sites, and calling nn.Dropout modules there costs time in every step."""
    return F.dropout(x, p, training=True) if training and p > 0 else x


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    block_size: int = 256  # maximum context length
    n_embd: int = 384
    n_head: int = 6
    layers: str = "AAAA"  # one letter per block, from MIXERS
    mlp_hidden: int = 0  # hidden width of an M mixer; 0 means n_embd // 4 ("tiny")
    dropout: float = 0.0

    @property
    def n_layer(self) -> int:
        return len(self.layers)

    @property
    def m_hidden(self) -> int:
        return self.mlp_hidden or max(1, self.n_embd // 4)

    def validate(self) -> "GPTConfig":
        ints = {"vocab_size": self.vocab_size, "block_size": self.block_size, "n_embd": self.n_embd,
                "n_head": self.n_head, "mlp_hidden": self.mlp_hidden}
        for name, value in ints.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise HybridGPTError(f"model config: {name} must be an integer, got {value!r}")
            if value < (0 if name == "mlp_hidden" else 1):
                raise HybridGPTError(f"model config: {name} must be positive, got {value}")
        check_layers(self.layers)
        if self.n_embd % self.n_head:
            raise HybridGPTError(f"model config: n_embd {self.n_embd} must be divisible by n_head {self.n_head}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise HybridGPTError(f"model config: dropout must be in [0, 1), got {self.dropout!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        if not isinstance(d, dict):
            raise HybridGPTError("model config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise HybridGPTError(f"model config has unknown keys {unknown}")
        return cls(**d).validate()

    def num_params(self) -> int:
        """Parameters of the model this config describes (tied embeddings counted once)."""
        d, v, h = self.n_embd, self.vocab_size, self.m_hidden
        ln = 2 * d
        per_mixer = {"A": ln + 3 * d * d + 3 * d + d * d + d, "M": ln + d * h + h + h * d + d, "N": 0}
        ffn = ln + 4 * d * d + 4 * d + 4 * d * d + d
        return v * d + self.block_size * d + sum(per_mixer[c] + ffn for c in self.layers) + ln

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.float32) -> int:
        """KV-cache bytes each token of context costs: keys and values of the attention blocks only."""
        return 2 * self.layers.count("A") * self.n_embd * torch.empty((), dtype=dtype).element_size()


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of one query per head over the cache, spelled out, with the softmax in float32.

    Used on the CPU at batch > 1, where PyTorch's scaled_dot_product_attention kernel is slow for a
    single query, above all in bfloat16; at batch 1 SDPA is the faster of the two, so it keeps it
    (the measurements are in docs/performance.md)."""
    scores = (q @ k.transpose(-2, -1)).float() * (1.0 / math.sqrt(q.size(-1)))
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, cache_index: int):
        super().__init__()
        self.n_head = config.n_head
        self.cache_index = cache_index  # which slot of a KV cache this layer owns
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # fused q, k, v
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, kv_cache=None) -> torch.Tensor:
        B, T, C = x.shape
        # One view and one permute give q, k, v as [B, heads, T, head_dim] each, and k, v side by side
        # ([2, B, heads, T, head_dim]) as the cache stores them, so that one copy caches both.
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        start = 0
        if kv_cache is not None:
            start = kv_cache.pos
            k, v = kv_cache.update(self.cache_index, qkv[1:])
        p = self.dropout if self.training else 0.0
        if start == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        elif T == 1 and B > 1 and q.is_cpu and p == 0.0:
            y = _attend_one(q, k, v)
        elif T == 1:  # one new token attends to everything cached: no mask needed
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:  # a chunk appended to a cache: query i sees keys up to start + i
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # a view, without a copy, when T == 1


class TokenMLP(nn.Module):
    """The static per-token mixer: the same small function applied at every position independently."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.m_hidden)
        self.c_proj = Linear(config.m_hidden, config.n_embd)

    def forward(self, x: torch.Tensor, kv_cache=None) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")), self.dropout, self.training)


def _rename_legacy_mixer(state_dict, prefix, *args, **kwargs):
    for key in [k for k in state_dict if k.startswith(prefix + "attn.")]:
        state_dict[prefix + "mixer." + key[len(prefix + "attn."):]] = state_dict.pop(key)


class Block(nn.Module):
    """Pre-norm residual block: ``x + mixer(ln_1(x))`` (skipped for N), then ``x + mlp(ln_2(x))``.

    The token mixer is called ``mixer`` whatever its kind; GPT-2's name for it (``attn``) appears only
    in ``peer.py``. Checkpoints written before the rename (keys ``...attn...``) still load.
    """

    def __init__(self, config: GPTConfig, kind: str, cache_index: int):
        super().__init__()
        self.kind = kind
        self._register_load_state_dict_pre_hook(_rename_legacy_mixer)
        if kind == "A":
            self.ln_1, self.mixer = nn.LayerNorm(config.n_embd), CausalSelfAttention(config, cache_index)
        elif kind == "M":
            self.ln_1, self.mixer = nn.LayerNorm(config.n_embd), TokenMLP(config)
        else:  # "N": no mixer and no parameters for it
            self.ln_1, self.mixer = None, None
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, kv_cache=None) -> torch.Tensor:
        if self.mixer is not None:
            x = x + dropout(self.mixer(self.ln_1(x), kv_cache), self.dropout, self.training)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config.validate()
        attn_slots = [config.layers[:i].count("A") for i in range(config.n_layer)]
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList(Block(config, kind, slot) for kind, slot in zip(config.layers, attn_slots)),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied embeddings
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual projection's variance shrinks with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields the tied weight once

    @property
    def attention_layers(self) -> int:
        return self.config.layers.count("A")

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache=None,
                loss_reduction: str = "mean", last_only: bool = False):
        """Logits [B, T, vocab]; with ``targets`` also the cross-entropy loss (targets < 0 are ignored).

        With a ``kv_cache`` the tokens are taken to follow the ``kv_cache.pos`` tokens already cached;
        the caller advances the cache afterwards. ``last_only`` returns the logits of the last position
        alone ([B, 1, vocab]): generation needs no more, and a prompt's vocabulary projection is costly.
        """
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise HybridGPTError(
                f"sequence of {start + T} tokens exceeds the model's context of {self.config.block_size}"
            )
        # Slicing the position table is the lookup of positions start..start+T-1, with less per-call work.
        x = self.transformer.wte(idx) + self.transformer.wpe.weight[start:start + T]
        x = dropout(x, self.config.dropout, self.training)
        for block in self.transformer.h:
            x = block(x, kv_cache)
        if last_only and targets is None:
            x = x[:, -1:]
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)
        return logits, loss

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on matrices and embeddings only, never on biases or LayerNorm gains."""
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _Captured(Exception):
    """Ends a forward pass once everything asked for is captured: the rest of the model is not computed."""


@torch.no_grad()
def mixer_activations(model: GPT, idx: torch.Tensor, blocks: Iterable[int]) -> dict[int, tuple]:
    """{block: (x, mixer(ln_1(x)))} for the given blocks (0-based): the residual stream entering each and its
    token mixer's output (before the block's dropout), from one forward of ``model`` on ``idx``.

    Hooks read them during the model's own forward, so nothing re-implements a block and GPT.forward
    carries no extra argument; the pass stops after the last block asked for. It runs in the model's
    current mode: in eval mode the activations are free of dropout.
    """
    blocks = sorted(set(blocks))
    h = model.transformer.h
    for i in blocks:
        if not 0 <= i < len(h) or h[i].mixer is None:
            raise HybridGPTError(f"block {i + 1} of pattern {model.config.layers} has no token mixer to capture")
    out: dict[int, tuple] = {}

    def entering(i):
        def hook(block, args):
            out[i] = args[0]
        return hook

    def mixed(i):
        def hook(mixer, args, output):
            out[i] = (out[i], output)
            if i == blocks[-1]:
                raise _Captured
        return hook

    handles = []
    try:
        for i in blocks:
            handles += [h[i].register_forward_pre_hook(entering(i)), h[i].mixer.register_forward_hook(mixed(i))]
        model(idx)
    except _Captured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return out
