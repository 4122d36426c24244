"""GGUF files (llama.cpp's format) of the Llama and GPT-2 families, read into our model and tokenizer.

The metadata becomes a GPTConfig; every tensor is dequantised to float32 with ``gguf.quants.dequantize``
and renamed through HF's names (gguf's own table, then interop.hf's one mapping to ours). llama.cpp stores
the rows of Llama's q and k projections permuted for its interleaved RoPE; they are put back in HF's
rotate_half order. The tokenizer.json is built from the file's vocabulary, merges, pre-tokenizer name and
control tokens with the `tokenizers` library. Reading needs the optional `gguf` package. The tables here
(tensor_names, rope_heads, permute and unpermute, PRE_TOKENIZERS) are also the export's (gguf_export.py): one
mapping in both directions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import clip
from hybrid_gpt.interop.config import install_hint
from hybrid_gpt.interop.hf import (
    CLASSES,
    KIND_NAMES,
    N_LAYER,
    Key,
    drop_template,
    ensure_import_fits,
    from_hf_state,
    layer_pattern,
    of_kind,
    read_keys,
    rules,
)
from hybrid_gpt.model.gpt import GPTConfig
from hybrid_gpt.options import MAX_WIDTH, Spec

logger = logging.getLogger(__name__)

EXTRA_HINT = install_hint("smollm2")
FAMILIES = tuple(CLASSES)  # general.architecture values that our GPT class computes: "llama", "gpt2"
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values of special and of added plain tokens


def _byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) as `tokenizers` pre-tokenizers: GPT-2's regex, and
# SmolLM's, which first splits off every digit ("\p{N}") and then applies GPT-2's.
PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "gpt-2": _byte_level,
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()]),
}


def gguf_module(needs: str = "reading GGUF files", extra: str = "smollm2"):
    """The `gguf` package, or a one-line error saying what ``needs`` it and the extra that installs it."""
    try:
        import gguf
    except ImportError as e:
        raise HybridGPTError(f"{needs} needs the `gguf` package: {install_hint(extra)}") from e
    return gguf


class _Metadata:
    """Typed access to a GGUF file's key-value metadata."""

    def __init__(self, reader, where: str):
        self.fields, self.where = reader.fields, where

    def raw(self, key: str):
        """The value of ``key`` as the file holds it, unchecked; None when absent."""
        field = self.fields.get(key)
        if field is None:
            return None
        try:
            return field.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise HybridGPTError(f"{self.where}: metadata {key} is unreadable ({clip(e, 80)})") from e

    def get(self, key: str, kind: type, default=None, item: type | None = None):
        """The value of ``key``, of ``kind`` (a list: of ``item``s); ``default`` when absent (None: required)."""
        value = self.raw(key)
        if value is None:
            if default is None:
                raise HybridGPTError(f"{self.where} lacks the metadata {key}")
            return default
        checked = of_kind(value, kind)
        if kind is list and checked is not None and any(of_kind(v, item) is None for v in checked):
            checked = None
        if checked is None:
            raise HybridGPTError(f"{self.where}: metadata {key} must be "
                                 f"{'a list' if kind is list else KIND_NAMES[kind]}, got {clip(repr(value), 60)}")
        return checked


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute`` of q/k rows (each head's rows as interleaved pairs, for its RoPE): back
    to HF's rotate_half order, where a head's first half of rows pairs with its second half."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's ``permute`` of q/k rows (convert_hf_to_gguf.py's), the inverse of :func:`unpermute`: from HF's
    rotate_half order to the interleaved pairs its RoPE rotates."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def tensor_names(gguf, arch: str, cfg: GPTConfig) -> dict[str, str]:
    """{HF name: GGUF name} of every tensor of ``cfg``'s model: interop.hf's rules, then gguf's own table of
    llama.cpp's names; the one mapping of the import and the export."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.n_layer)
    return {hf: names.get_name(hf, try_suffixes=(".weight", ".bias")) for r in rules(cfg) for hf in r.theirs}


def rope_heads(name: str, arch: str, cfg: GPTConfig) -> int | None:
    """The head count of a GGUF tensor whose rows llama.cpp permutes for its RoPE (a Llama model's attn_q and
    attn_k, weights and biases), else None."""
    kind = name.split(".")[-2] if arch == "llama" else None
    return {"attn_q": cfg.n_head, "attn_k": cfg.kv_heads}.get(kind)


_COMMON_KEYS = (Key("embedding_length", "n_embd"), Key("attention.head_count", "n_head"), Key("block_count", N_LAYER),
                Key("context_length", "block_size"))
_HEAD_SIZE_KEYS = ("rope.dimension_count", "attention.key_length", "attention.value_length")
GGUF_KEYS = {  # under "<architecture>.", checked by interop.hf's read_keys as a config.json's keys are
    "gpt2": (*_COMMON_KEYS, Key("feed_forward_length", "ffn_hidden", None),
             Key("attention.layer_norm_epsilon", "norm_eps")),
    "llama": (*_COMMON_KEYS, Key("attention.head_count_kv", "n_kv_head", 0), Key("feed_forward_length", "ffn_hidden"),
              Key("attention.layer_norm_rms_epsilon", "norm_eps"), Key("rope.freq_base", "rope_theta", 10000.0),
              Key("expert_count", default=0, kind="int", spec=Spec(lo=0)),
              Key("rope.scaling.type", default="none", kind="str", spec=Spec(allow_empty=True)),
              *(Key(name, default=None, kind="int", spec=Spec(lo=1, hi=MAX_WIDTH)) for name in _HEAD_SIZE_KEYS)),
}


def _config(meta: _Metadata, arch: str, vocab: int, tied: bool) -> GPTConfig:
    """The GPTConfig of a GGUF file's metadata, every key checked (read_keys) before anything is computed."""
    v = read_keys(lambda name: meta.raw(f"{arch}.{name}"), GGUF_KEYS[arch], meta.where)
    n_embd, heads = v["embedding_length"], v["attention.head_count"]
    common = dict(vocab_size=vocab, block_size=v["context_length"], n_embd=n_embd, n_head=heads,
                  layers=layer_pattern(v["block_count"]), tie_embeddings=tied, dropout=0.0)
    if arch == "gpt2":
        ffn = v["feed_forward_length"]
        return GPTConfig(**common, ffn_hidden=0 if ffn in (None, 4 * n_embd) else ffn,
                         norm_eps=v["attention.layer_norm_epsilon"]).validate()
    if v["expert_count"]:
        raise HybridGPTError(f"{meta.where} is a mixture of experts, which our model does not compute")
    scaling = v["rope.scaling.type"]
    if scaling != "none":
        raise HybridGPTError(f"{meta.where}: RoPE scaling {clip(repr(scaling))} is not supported (only plain RoPE)")
    head_dim = n_embd // heads
    for name in _HEAD_SIZE_KEYS:
        if v[name] not in (None, head_dim):
            raise HybridGPTError(f"{meta.where}: {arch}.{name} is not the head size {head_dim}, which our attention "
                                 "assumes")
    return GPTConfig.llama(**common, n_kv_head=v["attention.head_count_kv"], ffn_hidden=v["feed_forward_length"],
                           norm_eps=v["attention.layer_norm_rms_epsilon"], rope_theta=v["rope.freq_base"]).validate()


def _dequantize(gguf, tensor, where: str) -> torch.Tensor:
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise HybridGPTError(f"{where}: tensor {tensor.name} is of type {tensor.tensor_type.name}, which the gguf "
                             "package cannot dequantise") from e
    shape = [int(n) for n in reversed(tensor.shape.tolist())]  # GGUF lists dimensions innermost first
    return torch.tensor(np.asarray(values, dtype=np.float32)).reshape(shape)


def read_gguf_tokenizer(meta: _Metadata) -> str:
    """tokenizer.json (text) of a GGUF file's byte-level BPE vocabulary."""
    kind = meta.get("tokenizer.ggml.model", str)
    if kind == "llama":
        raise HybridGPTError(f"{meta.where} has a SentencePiece tokenizer, which is not supported: hybrid-gpt needs "
                             "a byte-level BPE tokenizer (tokenizer.ggml.model 'gpt2')")
    if kind != "gpt2":
        raise HybridGPTError(f"{meta.where}: tokenizer.ggml.model {clip(repr(kind))} is not supported (only 'gpt2', "
                             "byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre", str, "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise HybridGPTError(f"{meta.where}: pre-tokenizer {clip(repr(pre))} is not supported (only "
                             f"{', '.join(PRE_TOKENIZERS)})")
    tokens = meta.get("tokenizer.ggml.tokens", list, item=str)
    types = meta.get("tokenizer.ggml.token_type", list, [1] * len(tokens), item=int)
    merges = [m.split(" ") for m in meta.get("tokenizer.ggml.merges", list, item=str)]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens) or len(types) != len(tokens) or any(len(m) != 2 for m in merges):
        raise HybridGPTError(f"{meta.where}: its vocabulary is malformed (a token repeats, a token type is missing "
                             "or a merge is not two tokens)")
    try:
        hf = HFTokenizer(models.BPE(vocab, [tuple(m) for m in merges], fuse_unk=False, byte_fallback=False))
    except Exception as e:  # tokenizers raises a bare Exception for a merge of unknown tokens
        raise HybridGPTError(f"{meta.where}: its BPE merges do not fit its vocabulary ({clip(e, 80)})") from e
    hf.pre_tokenizer = PRE_TOKENIZERS[pre]()
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                           for i, t in enumerate(types) if t == CONTROL])
    hf.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                   for i, t in enumerate(types) if t == USER_DEFINED])
    return hf.to_str()


def read_gguf(path: Path) -> tuple[GPTConfig, dict[str, torch.Tensor], str, str | None]:
    """(config, our float32 state dict, tokenizer.json text, Jinja chat template or None) of a GGUF file."""
    gguf = gguf_module()
    where = str(path)
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, UnicodeDecodeError) as e:
        raise HybridGPTError(f"cannot read {where} as a GGUF file ({clip(e, 120)})") from e
    meta = _Metadata(reader, where)
    arch = meta.get("general.architecture", str)
    if arch not in FAMILIES:
        raise HybridGPTError(f"{where}: architecture {clip(repr(arch))} is not supported; hybrid-gpt imports "
                             f"{' and '.join(FAMILIES)} GGUF files")
    tokenizer = read_gguf_tokenizer(meta)
    template = meta.raw("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        template = drop_template(f"(tokenizer.chat_template) is not text but {clip(repr(template), 40)}")
    template = template or None
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise HybridGPTError(f"{where} lacks the tensor token_embd.weight")
    # The config is checked, and the import's memory with it, before any tensor is dequantised: the vocabulary
    # is the embedding's row count in the header (dimensions innermost first), and the memory is that of the
    # untied model when the file has an output.weight, which is decided below.
    shape = tensors["token_embd.weight"].shape.tolist()
    cfg = _config(meta, arch, int(shape[-1]) if len(shape) == 2 else 0, "output.weight" not in tensors)
    if arch == "llama" and "blk.0.attn_q.bias" in tensors:  # llama.cpp's optional biases (ours: all or none)
        cfg = replace(cfg, bias=True).validate()
    ensure_import_fits(cfg, where)
    logger.info(f"dequantising {len(tensors)} tensors of {where}")
    embd = _dequantize(gguf, tensors["token_embd.weight"], where)
    # Tied embeddings: no output.weight, or (llama.cpp's GPT-2 files) a copy of token_embd.
    output = _dequantize(gguf, tensors["output.weight"], where) if "output.weight" in tensors else None
    if output is not None and torch.equal(output, embd):
        cfg = replace(cfg, tie_embeddings=True).validate()
    state, used = {}, {"token_embd.weight", "output.weight"}
    conv1d = {n for r in rules(cfg) if r.conv1d for n in r.theirs}
    for hf_name, name in tensor_names(gguf, arch, cfg).items():
        if name not in tensors:
            raise HybridGPTError(f"{where} lacks the tensor {name}")
        t = {"token_embd.weight": embd, "output.weight": output}.get(name)
        t = _dequantize(gguf, tensors[name], where) if t is None else t
        heads = rope_heads(name, arch, cfg)
        if heads is not None:
            if t.dim() == 0 or t.shape[0] != heads * cfg.head_dim:
                raise HybridGPTError(f"{where}: tensor {name} has shape {tuple(t.shape)}, not {heads} heads of "
                                     f"{cfg.head_dim} rows")
            t = unpermute(t, heads)
        if hf_name in conv1d:  # llama.cpp stores GPT-2's Conv1D weights transposed, as our Linear: HF's layout back
            t = t.t()
        state[hf_name] = t
        used.add(name)
    extra = sorted(set(tensors) - used)
    if extra:
        raise HybridGPTError(f"{where} holds {len(extra)} tensor(s) our {arch} model has no place for, e.g. "
                             f"{clip(extra[0], 60)}")
    return cfg, from_hf_state(state, cfg, where), tokenizer, template
