"""The GPT: a decoder-only transformer whose token mixer is chosen per block by a layer pattern.

    A  causal multi-head self-attention (the usual block)
    M  a static per-token MLP in place of attention: norm -> Linear(d, h) -> activation -> Linear(h, d)
    N  no token mixer at all (the block keeps only its feed-forward MLP): the zero-parameter control

"AAAA" is the standard model and "AAMM" the original experiment's hybrid. Only the attention
sub-layer changes; every block keeps its feed-forward MLP. M and N blocks never look at other
positions, so they need no KV cache.

Two families are one class, told apart by configuration (GPTConfig): GPT-2 (the defaults: LayerNorm,
learned positions, tanh-GELU MLP, biases, tied embeddings) and Llama (RMSNorm, rotary positions,
SwiGLU MLP, grouped-query attention, no biases, optionally untied embeddings), so that every analysis
runs on both. Names follow GPT-2's (except `mixer`, GPT-2's `attn`) in both families, so that weights
map 1:1 onto Hugging Face's GPT2LMHeadModel for the standard model.
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
from hybrid_gpt.options import (
    MAX_CONTEXT,
    MAX_LAYERS,
    MAX_MODEL_VOCAB,
    MAX_WIDTH,
    Spec,
    check_fields,
    option,
    pattern_problem,
)

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


LAYER_COUNT = Spec(lo=1, hi=MAX_LAYERS)  # a foreign config's number of blocks: checked before it is spelled out
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
FFNS = ("gelu", "swiglu")


@dataclass
class GPTConfig:
    """A model's shape. The family fields (from ``norm`` on) default to GPT-2's, so a config.json written
    before they existed loads as the model it was; :meth:`llama` gives the Llama family's."""

    vocab_size: int = option(4096, lo=1, hi=MAX_MODEL_VOCAB)
    block_size: int = option(256, lo=1, hi=MAX_CONTEXT)  # maximum context length; RoPE tables and caches
    n_embd: int = option(384, lo=1, hi=MAX_WIDTH)
    n_head: int = option(6, lo=1, hi=MAX_WIDTH)
    layers: str = option("AAAA", kind="text", check=pattern_problem)  # one letter per block, from MIXERS
    mlp_hidden: int = option(0, lo=0, hi=MAX_WIDTH)  # hidden width of an M mixer; 0 means n_embd // 4 ("tiny")
    dropout: float = option(0.0, lo=0.0, hi=1.0, hi_open=True)
    norm: str = option("layernorm", choices=NORMS)
    norm_eps: float = option(1e-5, lo=0.0, lo_open=True)
    positions: str = option("learned", choices=POSITIONS)  # a learned table (wpe) or rotary embeddings on q and k
    rope_theta: float = option(10000.0, lo=0.0, lo_open=True)
    rotary_dims: int = option(0, lo=0, hi=MAX_WIDTH)  # RoPE on the first rotary_dims dims of each head; 0: all
    ffn: str = option("gelu", choices=FFNS)  # the feed-forward MLP's (and M mixer's) activation
    ffn_hidden: int = option(0, lo=0, hi=MAX_WIDTH)  # hidden width of the feed-forward MLP; 0 means 4 * n_embd
    n_kv_head: int = option(0, lo=0, hi=MAX_WIDTH)  # key/value heads (grouped-query when fewer than n_head); 0: n_head
    bias: bool = option(True)  # biases of the attention and feed-forward linears (M mixers always have them)
    tie_embeddings: bool = option(True)  # lm_head shares wte's weight

    @classmethod
    def llama(cls, **kw) -> "GPTConfig":
        """A config of the Llama family: RMSNorm (eps 1e-5), RoPE, SwiGLU, no biases; ``kw`` sets the rest."""
        return cls(**{"norm": "rmsnorm", "positions": "rope", "ffn": "swiglu", "bias": False, **kw})

    @property
    def n_layer(self) -> int:
        return len(self.layers)

    @property
    def m_hidden(self) -> int:
        return self.mlp_hidden or max(1, self.n_embd // 4)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn_width(self) -> int:
        return self.ffn_hidden or 4 * self.n_embd

    @property
    def rope_dims(self) -> int:
        """The dims of each head that RoPE rotates (with rotary positions)."""
        return self.rotary_dims or self.head_dim

    @property
    def family(self) -> str:
        """"llama" (rmsnorm, rope, swiglu), "gpt2" (every family field but norm_eps at its default), else "custom"."""
        if (self.norm, self.positions, self.ffn) == ("rmsnorm", "rope", "swiglu"):
            return "llama"
        if ((self.norm, self.positions, self.ffn, self.ffn_hidden, self.n_kv_head, self.bias, self.tie_embeddings)
                == ("layernorm", "learned", "gelu", 0, 0, True, True)):
            return "gpt2"
        return "custom"

    def validate(self) -> "GPTConfig":
        """Self, if every field has its type and range (the specs above, checked as the CLI's options are: a
        config.json's or an imported model's config before anything is computed from it) and the fields agree."""
        check_fields(self, "model config: ", none=False)
        check_layers(self.layers)
        if self.n_embd % self.n_head:
            raise HybridGPTError(f"model config: n_embd {self.n_embd} must be divisible by n_head {self.n_head}")
        if self.n_head % self.kv_heads:
            raise HybridGPTError(f"model config: n_head {self.n_head} must be divisible by n_kv_head {self.n_kv_head}")
        if self.positions == "rope" and (self.rope_dims % 2 or self.rope_dims > self.head_dim):
            raise HybridGPTError(f"model config: rotary_dims {self.rope_dims} must be even and at most the head dim "
                                 f"{self.head_dim}")
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
        d, v, h, f = self.n_embd, self.vocab_size, self.m_hidden, self.ffn_width
        gates = 2 if self.ffn == "swiglu" else 1  # SwiGLU's c_fc holds the gate and the up projection
        ln = 2 * d if self.norm == "layernorm" else d
        qkv = (self.n_head + 2 * self.kv_heads) * self.head_dim
        attn = qkv * d + d * d + self.bias * (qkv + d)
        per_mixer = {"A": ln + attn, "M": ln + gates * h * d + gates * h + h * d + d, "N": 0}
        ffn = ln + gates * f * d + f * d + self.bias * (gates * f + d)
        embeddings = v * d * (1 if self.tie_embeddings else 2) + (self.block_size * d if self.positions == "learned"
                                                                   else 0)
        return embeddings + sum(per_mixer[c] + ffn for c in self.layers) + ln

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.float32) -> int:
        """KV-cache bytes each token of context costs: keys and values of the attention blocks only."""
        per_layer = 2 * self.kv_heads * self.head_dim
        return per_layer * self.layers.count("A") * torch.empty((), dtype=dtype).element_size()


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query per head over the cache, spelled out, with the softmax in float32; ``mask``
    ([1, cache length] bool, a static step's) hides the slots not yet written.

    Used on the CPU at batch > 1 and in bfloat16 at any batch, where PyTorch's scaled_dot_product_attention
    kernel is the slower for a single query; float32 at batch 1 keeps SDPA, the faster there (the
    measurements are in docs/performance.md). With grouped-query
    attention (fewer key/value heads than query heads) the queries of each group are stacked against their
    shared key/value head."""
    B, H, _, D = q.shape
    groups = H // k.size(1)
    if groups > 1:  # query head h reads key/value head h // groups, as SDPA's enable_gqa
        q = q.reshape(B, k.size(1), groups, D)
    scores = (q @ k.transpose(-2, -1)).float() * (1.0 / math.sqrt(q.size(-1)))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    y = torch.softmax(scores, dim=-1).to(v.dtype) @ v
    return y.view(B, H, 1, D) if groups > 1 else y


class RMSNorm(nn.Module):
    """Root-mean-square norm as Hugging Face's LlamaRMSNorm computes it (in float32, the gain applied after
    casting back), so that imported Llama weights give the same numbers."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps)


class Rotary(nn.Module):
    """RoPE's cos and sin tables, [block_size, rope_dims] each, in Hugging Face Llama's convention
    (non-interleaved: each table is cat(freqs, freqs), paired with :func:`rotate_half`).

    One per model (``GPT.rotary``), the same module in each of its attention blocks, so that an attention
    block is a mixer of ``(x, kv_cache)`` alone, as the others are. The tables follow from the config, so
    they stay out of the state dict (non-persistent buffers); they stay float32 when the model is cast (a
    bfloat16 table would misplace far positions; a cast rebuilds them) and are cast to the activations'
    dtype at use, as Hugging Face's Llama does."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.dims, self.theta, self.length = config.rope_dims, config.rope_theta, config.block_size
        cos, sin = self._tables()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.dims, 2, dtype=torch.int64).float() / self.dims))
        freqs = torch.outer(torch.arange(self.length, dtype=torch.float32), inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos(), angles.sin()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # moves (and may cast) the tables; the cast is undone here
        if self.cos.dtype != torch.float32:
            self.cos, self.sin = (t.to(self.cos.device) for t in self._tables())
        return self

    def forward(self, positions: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) at ``positions`` (a slice, or a tensor of T positions, a static step's), [T, rope_dims]
        each."""
        return self.cos[positions], self.sin[positions]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x`` [..., T, head_dim] at the positions of ``cos``/``sin`` [T, rope_dims]: the first
    rope_dims dims of each head are rotated, the rest pass through."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    dims = cos.size(-1)
    if dims == x.size(-1):
        return x * cos + rotate_half(x) * sin
    rot, keep = x[..., :dims], x[..., dims:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, keep), dim=-1)


class CausalSelfAttention(nn.Module):
    """Multi-head attention with one fused q, k, v projection (rows: n_head query heads, then kv_heads key
    heads, then kv_heads value heads); grouped-query when kv_heads < n_head; with a ``rotary`` table, RoPE on
    q and k at their absolute positions (after the cache's ``pos`` tokens)."""

    def __init__(self, config: GPTConfig, cache_index: int, rotary: Rotary | None = None):
        super().__init__()
        self.rotary = rotary
        self.n_head, self.kv_heads, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.gqa = self.kv_heads != self.n_head
        self.cache_index = cache_index  # which slot of a KV cache this layer owns
        self.c_attn = Linear(config.n_embd, (self.n_head + 2 * self.kv_heads) * self.head_dim, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, kv_cache=None) -> torch.Tensor:
        B, T, C = x.shape
        # A static step (engine.StaticKVCache) gives its positions and mask as tensors and keeps its int ``pos``
        # out of the model, so that one compiled graph serves every position; it attends over the whole
        # cache, masked.
        mask = kv_cache.mask if kv_cache is not None else None
        start = 0 if kv_cache is None or mask is not None else kv_cache.pos
        qkv = self.c_attn(x)
        if not self.gqa:
            # One view and one permute give q, k, v as [B, heads, T, head_dim] each, and k, v side by side
            # ([2, B, heads, T, head_dim]) as the cache stores them, so that one copy caches both.
            qkv = qkv.view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            kv = qkv[1:]
        else:
            qkv = qkv.view(B, T, self.n_head + 2 * self.kv_heads, self.head_dim)
            q = qkv[:, :, :self.n_head].transpose(1, 2)
            kv = qkv[:, :, self.n_head:].view(B, T, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            k, v = kv.unbind(0)
        if self.rotary is not None:
            cos, sin = self.rotary(kv_cache.positions(T) if kv_cache is not None else slice(0, T))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            kv = torch.stack((k, v))
        if kv_cache is not None:
            k, v = kv_cache.update(self.cache_index, kv)
        p = self.dropout if self.training else 0.0
        if start == 0 and mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, enable_gqa=self.gqa)
        elif T == 1 and q.is_cpu and p == 0.0 and (B > 1 or q.dtype != torch.float32):
            y = _attend_one(q, k, v, mask)
        elif T == 1 or mask is not None:  # one new token attends to everything cached (or to the mask's slots)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=self.gqa)
        else:  # a chunk appended to a cache: query i sees keys up to start + i
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=self.gqa)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # a view, without a copy, when T == 1


def _activate(ffn: str, h: torch.Tensor) -> torch.Tensor:
    """The feed-forward activation: tanh-GELU, or SwiGLU on a fused projection (gate half, then up half)."""
    if ffn == "gelu":
        return F.gelu(h, approximate="tanh")
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class TokenMLP(nn.Module):
    """The static per-token mixer: the same small function applied at every position independently,
    with the family's activation (its c_fc fused gate and up for SwiGLU) and always with biases."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ffn = config.ffn
        self.c_fc = Linear(config.n_embd, (2 if config.ffn == "swiglu" else 1) * config.m_hidden)
        self.c_proj = Linear(config.m_hidden, config.n_embd)

    def forward(self, x: torch.Tensor, kv_cache=None) -> torch.Tensor:
        return self.c_proj(_activate(self.ffn, self.c_fc(x)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ffn = config.ffn
        width = config.ffn_width
        self.c_fc = Linear(config.n_embd, (2 if config.ffn == "swiglu" else 1) * width, bias=config.bias)
        self.c_proj = Linear(width, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(self.c_proj(_activate(self.ffn, self.c_fc(x))), self.dropout, self.training)


def _rename_legacy_mixer(state_dict, prefix, *args, **kwargs):
    for key in [k for k in state_dict if k.startswith(prefix + "attn.")]:
        state_dict[prefix + "mixer." + key[len(prefix + "attn."):]] = state_dict.pop(key)


class Block(nn.Module):
    """Pre-norm residual block: ``x + mixer(ln_1(x))`` (skipped for N), then ``x + mlp(ln_2(x))``;
    ln_1 and ln_2 are the family's norm (LayerNorm or RMSNorm).

    The token mixer is called ``mixer`` whatever its kind; GPT-2's name for it (``attn``) appears only
    in ``interop/hf.py``. Checkpoints written before the rename (keys ``...attn...``) still load.
    """

    def __init__(self, config: GPTConfig, kind: str, cache_index: int, rotary: Rotary | None = None):
        super().__init__()
        self.kind = kind
        self._register_load_state_dict_pre_hook(_rename_legacy_mixer)
        if kind == "A":
            self.ln_1, self.mixer = _norm(config), CausalSelfAttention(config, cache_index, rotary)
        elif kind == "M":
            self.ln_1, self.mixer = _norm(config), TokenMLP(config)
        else:  # "N": no mixer and no parameters for it
            self.ln_1, self.mixer = None, None
        self.ln_2 = _norm(config)
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
        rotary = Rotary(config) if config.positions == "rope" else None  # no parameters: init draws unchanged
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.positions == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules["h"] = nn.ModuleList(Block(config, kind, slot, rotary)
                                     for kind, slot in zip(config.layers, attn_slots))
        modules["ln_f"] = _norm(config)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.rotary = rotary
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
        the caller advances the cache afterwards. The cache's interface: ``pos``, ``positions(T)`` (the new
        tokens' positions), ``update`` and ``mask`` (None, or a static step's mask of the cache's slots).
        ``last_only`` returns the logits of the last position alone ([B, 1, vocab]): generation needs no
        more, and a prompt's vocabulary projection is costly.
        """
        B, T = idx.shape
        if kv_cache is None or kv_cache.mask is None:  # a static step's cache checks its own length
            start = kv_cache.pos if kv_cache is not None else 0
            if start + T > self.config.block_size:
                raise HybridGPTError(
                    f"sequence of {start + T} tokens exceeds the model's context of {self.config.block_size}"
                )
        if self.rotary is None:
            # Indexing the position table by a slice is the lookup of positions start..start+T-1 with less
            # per-call work; a static step indexes it by a tensor.
            positions = kv_cache.positions(T) if kv_cache is not None else slice(0, T)
            x = self.transformer.wte(idx) + self.transformer.wpe.weight[positions]
        else:  # rotary positions act inside attention
            x = self.transformer.wte(idx)
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
        """Weight decay on matrices and embeddings only, never on biases or norm gains."""
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _Captured(Exception):
    """Ends a forward pass once everything asked for is captured: the rest of the model is not computed."""


@torch.no_grad()
def mixer_activations(model: GPT, idx: torch.Tensor, blocks: Iterable[int], normed: bool = False) -> dict[int, tuple]:
    """{block: (x, mixer(ln_1(x)))} for the given blocks (0-based): the residual stream entering each and its
    token mixer's output (before the block's dropout), from one forward of ``model`` on ``idx``; with
    ``normed``, the mixer's own input ln_1(x) in place of x.

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
            out[i] = (args[0] if normed else out[i], output)
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
