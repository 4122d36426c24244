"""HybridGPT for transformers: the model that `hybrid-gpt export --format hf` writes beside a hybrid's weights (as
modeling_hybrid_gpt.py, named by config.json's auto_map), loaded with
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``.

It computes what hybrid-gpt's GPT computes (hybrid_gpt/model/gpt.py), block for block, under the same tensor
names: each block a token mixer chosen by the layer pattern (A causal self-attention, M a per-token MLP, N none),
then its feed-forward MLP; GPT-2's family (LayerNorm, learned positions, tanh-GELU, biases) or Llama's (RMSNorm,
rotary positions, SwiGLU, grouped-query attention) by configuration. It needs torch and transformers only (no
hybrid-gpt), and takes the keyword arguments of transformers 4 (``past_key_values``) and 5 (``cache``) alike.
This file is never imported by hybrid-gpt itself: the exporter copies its text. It repeats gpt.py's few lines of
math (RMSNorm, RoPE, the activations) on purpose: it must run where hybrid-gpt is not installed; the export tests
hold the two to the same logits.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 5 names the output's cache `cache`, 4 `past_key_values`.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class HybridGPTConfig(PretrainedConfig):
    """hybrid-gpt's GPTConfig (its field names, its defaults), ``tie_word_embeddings`` for its tie_embeddings;
    the usual transformers names (hidden_size, num_hidden_layers, ...) read the same values."""

    model_type = "hybrid_gpt"
    attribute_map = {"hidden_size": "n_embd", "num_attention_heads": "n_head", "max_position_embeddings": "block_size"}

    def __init__(self, vocab_size=4096, block_size=256, n_embd=384, n_head=6, layers="AAAA", mlp_hidden=0,
                 norm="layernorm", norm_eps=1e-5, positions="learned", rope_theta=10000.0, rotary_dims=0, ffn="gelu",
                 ffn_hidden=0, n_kv_head=0, bias=True, tie_word_embeddings=True, use_cache=True, **kwargs):
        for derived in ("num_hidden_layers", "num_key_value_heads", "head_dim"):
            kwargs.pop(derived, None)  # written by save_pretrained; they follow from the fields below
        self.vocab_size, self.block_size, self.n_embd, self.n_head = vocab_size, block_size, n_embd, n_head
        self.layers, self.mlp_hidden, self.norm, self.norm_eps = layers, mlp_hidden, norm, norm_eps
        self.positions, self.rope_theta, self.rotary_dims, self.ffn = positions, rope_theta, rotary_dims, ffn
        self.ffn_hidden, self.n_kv_head, self.bias, self.use_cache = ffn_hidden, n_kv_head, bias, use_cache
        self.num_hidden_layers = len(layers)
        self.num_key_value_heads = n_kv_head or n_head
        self.head_dim = n_embd // n_head
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class RMSNorm(nn.Module):
    """Hugging Face Llama's RMSNorm: in float32, the gain applied after casting back."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _norm(config):
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope_tables(positions, dims, theta):
    """cos and sin [B, 1, T, dims] at ``positions`` [B, T], non-interleaved (Hugging Face Llama's convention)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dims, 2, dtype=torch.int64, device=positions.device).float() / dims))
    freqs = positions[..., None].float() * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]
    return angles.cos(), angles.sin()


def _apply_rope(x, cos, sin):
    """RoPE on the first cos.size(-1) dims of each head of ``x`` [B, H, T, head_dim]; the rest pass through."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    dims = cos.size(-1)
    if dims == x.size(-1):
        return x * cos + _rotate_half(x) * sin
    rot, keep = x[..., :dims], x[..., dims:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, keep), dim=-1)


def _activate(ffn, h):
    if ffn == "gelu":
        return F.gelu(h, approximate="tanh")
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class CausalSelfAttention(nn.Module):
    """One fused q, k, v projection (rows: n_head query heads, then the key heads, then the value heads);
    grouped-query when there are fewer key/value heads; RoPE on q and k with rotary positions. ``slot``: this
    layer's place in the cache, which holds the attention layers only."""

    def __init__(self, config, slot):
        super().__init__()
        self.n_head, self.kv_heads, self.head_dim = config.n_head, config.num_key_value_heads, config.head_dim
        self.slot = slot
        self.rope_dims = (config.rotary_dims or self.head_dim) if config.positions == "rope" else 0
        self.theta = config.rope_theta
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.kv_heads) * self.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x, positions, mask, cache):
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, self.n_head + 2 * self.kv_heads, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.n_head, self.kv_heads, self.kv_heads], dim=1)
        if self.rope_dims:
            cos, sin = _rope_tables(positions, self.rope_dims, self.theta)
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.slot)
        if self.kv_heads != self.n_head:  # query head h reads key/value head h // groups
            groups = self.n_head // self.kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if mask is None:  # a whole sequence (causal) or one new token (everything cached)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class TokenMLP(nn.Module):
    """The M mixer: the same small MLP at every position independently (always with biases)."""

    def __init__(self, config):
        super().__init__()
        self.ffn = config.ffn
        hidden = config.mlp_hidden or max(1, config.n_embd // 4)
        self.c_fc = nn.Linear(config.n_embd, (2 if config.ffn == "swiglu" else 1) * hidden)
        self.c_proj = nn.Linear(hidden, config.n_embd)

    def forward(self, x, positions, mask, cache):
        return self.c_proj(_activate(self.ffn, self.c_fc(x)))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ffn = config.ffn
        width = config.ffn_hidden or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, (2 if config.ffn == "swiglu" else 1) * width, bias=config.bias)
        self.c_proj = nn.Linear(width, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.c_proj(_activate(self.ffn, self.c_fc(x)))


class Block(nn.Module):
    """Pre-norm: ``x + mixer(ln_1(x))`` (skipped for N, which has neither), then ``x + mlp(ln_2(x))``."""

    def __init__(self, config, kind, slot):
        super().__init__()
        if kind == "A":
            self.ln_1, self.mixer = _norm(config), CausalSelfAttention(config, slot)
        elif kind == "M":
            self.ln_1, self.mixer = _norm(config), TokenMLP(config)
        else:
            self.ln_1, self.mixer = None, None
        self.ln_2 = _norm(config)
        self.mlp = MLP(config)

    def forward(self, x, positions, mask, cache):
        if self.mixer is not None:
            x = x + self.mixer(self.ln_1(x), positions, mask, cache)
        return x + self.mlp(self.ln_2(x))


def _attention_mask(attention_mask, past, T, device):
    """The boolean mask [B, 1, T, past + T] (True: attend) for a chunk after ``past`` cached tokens, or None where
    SDPA's own causal rule (or none, for one new token) is the same. Padding (0 in the 2-D ``attention_mask``)
    is hidden; each query always sees itself, so that a padded row never attends to nothing (NaN)."""
    padded = attention_mask is not None and not bool(attention_mask.bool().all())
    if not padded and (past == 0 or T == 1):
        return None
    keys = torch.arange(past + T, device=device)
    queries = keys[past:, None]
    mask = (keys[None] <= queries)[None, None]
    if padded:
        mask = (mask & attention_mask[:, None, None, -(past + T):].bool()) | (keys[None] == queries)[None, None]
    return mask


class HybridGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HybridGPTConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}  # only when config.tie_word_embeddings

    def __init__(self, config):
        super().__init__(config)
        slots = [config.layers[:i].count("A") for i in range(len(config.layers))]
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.positions == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules["h"] = nn.ModuleList(Block(config, kind, slot) for kind, slot in zip(config.layers, slots))
        modules["ln_f"] = _norm(config)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        cache = cache if cache is not None else past_key_values
        x = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None and "A" in self.config.layers else 0
        if position_ids is None:
            position_ids = (torch.arange(T, device=x.device) + past)[None].expand(B, T)
        if int(position_ids.max()) >= self.config.block_size:
            raise ValueError(f"position {int(position_ids.max())} is beyond the model's context of "
                             f"{self.config.block_size} tokens")
        if self.config.positions == "learned":
            x = x + self.transformer.wpe(position_ids)
        mask = _attention_mask(attention_mask, past, T, x.device)
        for block in self.transformer.h:
            x = block(x, position_ids, mask, cache)
        x = self.transformer.ln_f(x)
        if isinstance(logits_to_keep, int) and logits_to_keep:
            x = x[:, -logits_to_keep:]
        elif not isinstance(logits_to_keep, int):
            x = x[:, logits_to_keep]
        logits = self.lm_head(x)
        loss = None
        if labels is not None:  # the next token's, as transformers' causal LMs: labels are the inputs, -100 ignored
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})

