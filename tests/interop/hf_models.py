"""Helpers of the import and export tests: tiny random Hugging Face models written by save_pretrained, as a
downloaded model directory holds them, and as GGUF files in llama.cpp's layout, with data.chatml's tokenizer and
SmolLM2's chat template; tiny random models of ours to export. Nothing here needs the network or a large file."""

import json

import torch
from data.chatml import CHATML_SPECIALS, SMOLLM2_JINJA

VOCAB = 320  # of data.chatml's tokenizer: ChatML's control tokens first (ids 0..3, as in SmolLM2)


def randomise(model, seed: int, std: float = 0.15):
    """Every weight drawn again (norm gains around 1, biases around 0), so that no test passes by an
    initialisation accident (unit norms, zero biases) and the logits are peaked enough for greedy decoding."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            gain = p.dim() == 1 and ("norm" in name or "ln" in name) and name.endswith("weight")
            p.copy_(1.0 + 0.1 * noise if gain else (0.1 if p.dim() == 1 else std) * noise)
    return model.eval()


def tiny_llama(tied: bool = True, block: int = 256, seed: int = 0, **kw):
    """A random LlamaForCausalLM with grouped-query attention (4 heads, 2 key/value heads), 2 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=block, rms_norm_eps=1e-5, rope_theta=10000.0,
               tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg.update(kw)
    torch.manual_seed(seed)
    return randomise(LlamaForCausalLM(LlamaConfig(**cfg)), seed)


def tiny_gpt2(seed: int = 0, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0)
    cfg.update(kw)
    torch.manual_seed(seed)
    return randomise(GPT2LMHeadModel(GPT2Config(**cfg)), seed)


def save_hf(model, bpe, path, template: str | None = "jinja"):
    """``model`` as a HF model directory: save_pretrained's config.json and model.safetensors, tokenizer.json,
    and the chat template as transformers 5 writes it (chat_template.jinja), as transformers 4 did (in
    tokenizer_config.json), or none."""
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text(bpe.to_str())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>"}
    if template == "jinja":
        (path / "chat_template.jinja").write_text(SMOLLM2_JINJA)
    elif template == "config":
        config["chat_template"] = SMOLLM2_JINJA
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def our_model(family: str, layers: str, vocab_size: int, seed: int = 0, **kw):
    """A random GPT of ours of the smoke preset's width with 4 heads and a context of 64, of ``family`` ("gpt2", or
    "llama" with 2 key/value heads: grouped-query), every weight drawn again (:func:`randomise`)."""
    from helpers import LLAMA, smoke_model

    family_fields = dict(LLAMA, n_kv_head=2) if family == "llama" else {}
    return randomise(smoke_model(layers, seed, vocab_size=vocab_size, block_size=64, n_head=4,
                                 **{**family_fields, **kw}), seed)


def greedy_hf(hf, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` tokens HF's generate picks greedily (with its own KV cache), stopping at nothing."""
    out = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                      eos_token_id=None, attention_mask=torch.ones_like(prompt))
    return out[:, prompt.size(1):]


def greedy_ours(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` tokens our engine picks greedily, with the KV cache."""
    from hybrid_gpt.infer.engine import generate

    return torch.cat(list(generate(model, prompt, n, temperature=0)), dim=1)


# -- GGUF files as llama.cpp's convert_hf_to_gguf.py writes them ---------------------------------------------------

LLAMA_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
LLAMA_GGUF_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down"}
GPT2_GGUF = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
             "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}
GPT2_GGUF_BLOCK = {"ln_1": "attn_norm", "ln_2": "ffn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
                   "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def llama_cpp_permute(weights, n_head: int, n_head_kv: int | None):
    """llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py), verbatim: q/k rows for its interleaved RoPE."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def gguf_name(hf_name: str) -> str:
    if hf_name in LLAMA_GGUF or hf_name in GPT2_GGUF:
        return {**LLAMA_GGUF, **GPT2_GGUF}[hf_name]
    parts = hf_name.split(".")
    i, rest, suffix = parts[2], ".".join(parts[3:-1]), parts[-1]
    return f"blk.{i}.{(LLAMA_GGUF_BLOCK if parts[0] == 'model' else GPT2_GGUF_BLOCK)[rest]}.{suffix}"


def write_gguf(hf, bpe, path, *, arch: str | None = None, pre: str = "smollm", tokenizer_model: str = "gpt2",
               template: str | None = SMOLLM2_JINJA, qtype: str = "Q8_0", tensors: dict | None = None, meta=None):
    """``hf`` (a tiny LlamaForCausalLM or GPT2LMHeadModel) as a GGUF file in llama.cpp's layout: matrices
    quantised to ``qtype``, vectors F32, Llama's q/k rows permuted, GPT-2's Conv1D weights transposed and its
    output.weight a copy of token_embd; the tokenizer's vocabulary, merges, control tokens and pre-tokenizer
    name, and the chat template. ``tensors``: {GGUF name: (array, GGML type or None)} written instead of or
    beside the model's; ``meta``: a function of the writer that adds metadata. Loads the dequantised weights
    into ``hf``: the model the file holds."""
    import gguf
    import numpy as np

    c = hf.config
    llama = c.model_type == "llama"
    tok = json.loads(bpe.to_str())
    tokens = sorted(tok["model"]["vocab"], key=tok["model"]["vocab"].get)
    writer = gguf.GGUFWriter(str(path), arch or c.model_type)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_head_count(c.num_attention_heads)
    if llama:
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_head_count_kv(c.num_key_value_heads)
        writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
        writer.add_layer_norm_rms_eps(c.rms_norm_eps)
        writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    else:
        writer.add_feed_forward_length(4 * c.hidden_size)
        writer.add_layer_norm_eps(c.layer_norm_epsilon)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in CHATML_SPECIALS else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if template:
        writer.add_chat_template(template)
    if meta:
        meta(writer)
    overrides = dict(tensors or {})
    state = hf.state_dict()
    if not llama:  # llama.cpp writes GPT-2's tied output weight out again
        state["lm_head.weight"] = state["transformer.wte.weight"]
    dequantised = {}
    for name, t in state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) or (llama and name == "lm_head.weight"
                                                                   and c.tie_word_embeddings):
            continue
        w = t.detach().float().numpy()
        conv1d = not llama and name.endswith(".weight") and ".h." in name and w.ndim == 2
        if conv1d:
            w = w.T.copy()
        if w.ndim == 2:
            q = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])
            w = gguf.quants.dequantize(q, gguf.GGMLQuantizationType[qtype]).reshape(w.shape)
            written, raw = q, gguf.GGMLQuantizationType[qtype]
        else:
            written, raw = w, None
        if llama and (".q_proj." in name or ".k_proj." in name):
            heads = c.num_key_value_heads if ".k_proj." in name else c.num_attention_heads
            written = llama_cpp_permute(written, c.num_attention_heads, heads)
        written, raw = overrides.pop(gguf_name(name), (written, raw))
        writer.add_tensor(gguf_name(name), np.ascontiguousarray(written), raw_dtype=raw)
        dequantised[name] = torch.from_numpy(w.T.copy() if conv1d else w)
    for name, (array, raw) in overrides.items():
        writer.add_tensor(name, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if not llama:
        del dequantised["lm_head.weight"]  # GPT-2's lm_head is its wte
    missing, unexpected = hf.load_state_dict(dequantised, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return path
