"""A checkpoint as a GGUF file in llama.cpp's layout, for `hybrid-gpt export --format gguf`: the inverse of
interop.gguf's reader, through the same tables (interop.hf's rules, gguf's tensor names, llama.cpp's q/k
permutation, the pre-tokenizer names).

Only what llama.cpp's ``llama`` architecture computes is written: an all-attention model of the Llama family
(RMSNorm, RoPE over every head dim, SwiGLU, grouped-query attention, optional biases). llama.cpp has no per-token
MLP mixer (M) and no block without a mixer (N), so a hybrid has no GGUF form; GPT-2-family models are refused too
(see check_gguf_model). The metadata is what llama.cpp reads (general.*, llama.* hyperparameters, tokenizer.ggml.*
and the Jinja chat template); matrices are float32 or float16, vectors (norm gains, biases) always float32, as
llama.cpp's own converter writes them.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from hybrid_gpt.data.template import jinja_template
from hybrid_gpt.data.tokenizer import Tokenizer
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.interop.config import EXPORT_EXTRA
from hybrid_gpt.interop.gguf import (
    CONTROL,
    PRE_TOKENIZERS,
    USER_DEFINED,
    gguf_module,
    permute,
    rope_heads,
    tensor_names,
)
from hybrid_gpt.interop.hf import to_hf_state
from hybrid_gpt.model.gpt import GPTConfig
from hybrid_gpt.runtime import DTYPES

NORMAL = 1  # tokenizer.ggml.token_type of a vocabulary token
GGUF_MAGIC = b"GGUF"
_NO_BLOCK = {"M": "per-token MLP mixer (M)", "N": "block without a token mixer (N)"}


def check_gguf_model(cfg: GPTConfig) -> None:
    """HybridGPTError, saying why, unless llama.cpp's llama architecture computes ``cfg``'s model; checked before
    any weight is read."""
    other = [c for c in "MN" if c in cfg.layers]
    if other:
        raise HybridGPTError(f"llama.cpp has no {' and no '.join(_NO_BLOCK[c] for c in other)}, so pattern "
                             f"{cfg.layers} has no GGUF form; export it with --format hf (a transformers directory "
                             "with its own modeling file)")
    if cfg.family != "llama":
        raise HybridGPTError(f"GGUF export writes llama.cpp's llama architecture, which computes Llama-family models "
                             f"(RMSNorm, RoPE, SwiGLU) only; this model is of the {cfg.family} family: export it with "
                             "--format hf")
    if cfg.rope_dims != cfg.head_dim:
        raise HybridGPTError(f"llama.cpp's llama architecture rotates every head dim, this model {cfg.rope_dims} of "
                             f"{cfg.head_dim}; export it with --format hf")


def gguf_gate():
    """The `gguf` package, which writes the file, or a one-line error naming the extra that installs it."""
    return gguf_module("writing GGUF files", EXPORT_EXTRA)


def _without_offsets(spec):
    """A pre-tokenizer's JSON without ByteLevel's trim_offsets, which moves offsets, never token ids."""
    if isinstance(spec, dict):
        return {k: _without_offsets(v) for k, v in spec.items() if k != "trim_offsets"}
    return [_without_offsets(v) for v in spec] if isinstance(spec, list) else spec


def pre_tokenizer_name(spec) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) of a tokenizer.json's pre-tokenizer: the entry of interop.gguf's
    PRE_TOKENIZERS that serialises as it does ("gpt-2": GPT-2's byte-level regex, ours; "smollm": digits split one
    by one first, SmolLM2's), whose regexes are llama.cpp's of that name."""
    for name, make in PRE_TOKENIZERS.items():
        probe = HFTokenizer(models.BPE())
        probe.pre_tokenizer = make()
        if _without_offsets(json.loads(probe.to_str())["pre_tokenizer"]) == _without_offsets(spec):
            return name
    raise HybridGPTError(f"the tokenizer's pre-tokenizer has no llama.cpp name hybrid-gpt knows (only "
                         f"{', '.join(PRE_TOKENIZERS)}); export it with --format hf")


def gguf_vocabulary(tok: Tokenizer) -> dict:
    """The tokenizer.ggml.* lists of a byte-level BPE tokenizer: tokens in id order, their types (control for
    special tokens, user-defined for added plain ones), merges as "a b", and the pre-tokenizer's name. What GGUF
    cannot hold (a normalizer, BPE options llama.cpp lacks, ids with gaps) is refused."""
    spec = json.loads(tok.to_str())
    model = spec["model"]
    if spec.get("normalizer") is not None:
        raise HybridGPTError("the tokenizer has a normalizer, which a GGUF vocabulary cannot hold; export it with "
                             "--format hf")
    unusual = [k for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix") if model.get(k)]
    if unusual or model.get("byte_fallback"):
        raise HybridGPTError(f"the tokenizer's BPE sets {', '.join(unusual) or 'byte_fallback'}, which llama.cpp's "
                             "BPE lacks; export it with --format hf")
    vocab = tok.hf.get_vocab(with_added_tokens=True)
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise HybridGPTError("the tokenizer's ids have gaps, which a GGUF vocabulary (a list) cannot hold")
    tokens = sorted(vocab, key=vocab.get)
    added = tok.hf.get_added_tokens_decoder()
    types = [(CONTROL if added[i].special else USER_DEFINED) if i in added else NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre_tokenizer_name(spec.get("pre_tokenizer"))}


def _write_metadata(writer, gguf, cfg: GPTConfig, tok: Tokenizer, specials: dict, dtype: str, name: str) -> None:
    file_type = gguf.LlamaFileType.ALL_F32 if dtype == "float32" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.ffn_width)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    vocabulary = gguf_vocabulary(tok)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name of byte-level BPE
    writer.add_tokenizer_pre(vocabulary["pre"])
    writer.add_token_list(vocabulary["tokens"])
    writer.add_token_types(vocabulary["types"])
    writer.add_token_merges(vocabulary["merges"])
    # Without a bos of the template's (ChatML), the document start: llama.cpp otherwise takes id 11 for the bos,
    # and some versions strip the bos token's text from the front of every rendered chat.
    bos = specials["bos"] if specials["bos"] is not None else tok.doc_start_id
    if bos is not None:
        writer.add_bos_token_id(bos)
    if specials["eos"] is not None:
        writer.add_eos_token_id(specials["eos"])
        writer.add_pad_token_id(specials["eos"])
    if tok.template is not None:
        writer.add_eot_token_id(tok.end_id)
        writer.add_chat_template(jinja_template(tok.template))
    writer.add_add_bos_token(specials["bos"] is not None)  # our prompts start with the template's bos, if any
    writer.add_add_eos_token(False)


def write_gguf(path: Path, state: dict, cfg: GPTConfig, tok: Tokenizer, specials: dict, dtype: str,
               name: str) -> int:
    """Write the GGUF file of our state dict ``state`` (config ``cfg``, tokenizer ``tok``) to ``path`` (the
    temporary of an atomic write: the caller renames it into place); returns the number of tensors written."""
    check_gguf_model(cfg)
    gguf = gguf_gate()
    names = tensor_names(gguf, "llama", cfg)
    writer = gguf.GGUFWriter(str(path), "llama")
    try:
        _write_metadata(writer, gguf, cfg, tok, specials, dtype, name)
        tensors = to_hf_state(state, cfg)
        for hf_name, t in tensors.items():
            gguf_name = names[hf_name]
            heads = rope_heads(gguf_name, "llama", cfg)
            t = permute(t, heads) if heads is not None else t
            kept = DTYPES["float32"] if t.dim() < 2 else DTYPES[dtype]
            writer.add_tensor(gguf_name, t.to(kept).contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return len(tensors)
