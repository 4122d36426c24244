"""`hybrid-gpt export`: a checkpoint as other tools take it, offline: a Hugging Face model directory
(interop.hf_export: transformers loads it, with no custom code for a standard GPT-2 or Llama model and with the
exported modeling file for a hybrid) or a GGUF file (interop.gguf_export: llama.cpp runs it, all-attention
Llama-family models only).

Everything that can be refused is refused before the weights are read (the format, a model the format cannot
hold, an existing output without --overwrite, an output that is not an earlier export), and the output appears
whole or not at all: a directory is built aside and swapped in (output_dir), a file written aside and renamed
(atomic_path); what was there before is left as it was on any failure.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from hybrid_gpt.checkpoint import load_checkpoint, read_config, refuse_foreign, resolve
from hybrid_gpt.data.tokenizer import Tokenizer
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import atomic_path, check_not_source, claimed_dir, clip, exclusive_writer, output_dir
from hybrid_gpt.interop.config import EXPORT_DTYPES, EXPORT_FORMATS
from hybrid_gpt.interop.gguf_export import GGUF_MAGIC, check_gguf_model, gguf_gate, write_gguf
from hybrid_gpt.interop.hf_export import EXPORT_MARK, HF_EXPORT_FILES, hf_transformers, native_family, write_hf_dir

logger = logging.getLogger(__name__)

HF_WHAT = "Hugging Face model directory"
FLOAT16_MAX = torch.finfo(torch.float16).max


def special_tokens(tok: Tokenizer) -> dict:
    """The ids an export names: ``bos`` (the template's opening token, ours <|bos|>; None for ChatML), ``eos``
    (the template's turn end, which ends a reply; without a template <|endoftext|>, if the tokenizer has it),
    also the padding, and ``stop`` (every id that ends a reply, eos first): one choice for both formats."""
    if tok.template is None:
        eos = tok.doc_start_id
        return {"bos": None, "eos": eos, "stop": [] if eos is None else [eos]}
    eos = tok.end_id
    return {"bos": tok.bos_id, "eos": eos, "stop": [eos, *sorted(tok.stop_ids - {eos})]}


def _check_gguf_out(out: Path, overwrite: bool) -> None:
    """Refuse a GGUF output that exists (without ``overwrite``), or that is not a GGUF file: it may be a user's."""
    if out.suffix != ".gguf":
        raise HybridGPTError(f"a GGUF file's name ends in .gguf (hybrid-gpt import reads it by that), not "
                             f"{clip(out.name)}; choose --out NAME.gguf")
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise HybridGPTError(f"{out} already exists; pass --overwrite to replace it")
    if out.is_symlink() or not out.is_file():
        raise HybridGPTError(f"{out} is not a regular file; it is left untouched (choose another output path)")
    with open(out, "rb") as f:
        if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise HybridGPTError(f"{out} exists and is not a GGUF file; it is left untouched (remove it, or choose "
                                 "another output path)")


def _check_float16(model) -> None:
    """Refuse float16 weights that would overflow: an infinite weight makes a model that computes nothing."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and t.numel() and float(t.abs().max()) > FLOAT16_MAX:
            raise HybridGPTError(f"{name} holds values beyond float16's range ({FLOAT16_MAX:g}); export with "
                                 "--dtype float32")


def export_model(checkpoint: str | Path, fmt: str, out: str | Path, dtype: str = "float32",
                 overwrite: bool = False) -> dict:
    """Write the checkpoint at ``checkpoint`` as ``fmt`` ("hf": a directory; "gguf": a file) at ``out``, weights
    in ``dtype``; return a summary. An existing ``out`` is replaced only with ``overwrite``, and only if it is an
    earlier export (a directory of an export's files whose config.json carries EXPORT_MARK; a GGUF file)."""
    if fmt not in EXPORT_FORMATS:
        raise HybridGPTError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {clip(repr(fmt))}")
    if dtype not in EXPORT_DTYPES:
        raise HybridGPTError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}, got {clip(repr(dtype))}")
    root, _ = resolve(checkpoint)
    cfg, _ = read_config(root)
    out = Path(out)
    check_not_source(root, out)
    claim = dict(allowed=HF_EXPORT_FILES, what=HF_WHAT, overwrite=overwrite)
    if fmt == "gguf":
        check_gguf_model(cfg)
        gguf_gate()
        _check_gguf_out(out, overwrite)
    else:
        family = native_family(cfg)
        if family is not None:
            hf_transformers()
        with claimed_dir(out, writer=False, **claim):  # refused now, not after reading the weights
            refuse_foreign(out, EXPORT_MARK, "a hybrid-gpt export's")
    model, tok, _ = load_checkpoint(root)
    if dtype == "float16":
        _check_float16(model)
    specials = special_tokens(tok)
    mark = {"source": str(root), "dtype": dtype}
    summary = {"format": fmt, "out": str(out), "family": cfg.family, "layers": cfg.layers,
               "parameters": model.num_params(), "dtype": dtype, "chat_template": tok.template is not None}
    if fmt == "hf":
        with output_dir(out, **claim) as tmp:
            refuse_foreign(out, EXPORT_MARK, "a hybrid-gpt export's")
            summary |= write_hf_dir(tmp, model, tok, family, specials, dtype, mark)
        return summary
    with exclusive_writer(out):
        _check_gguf_out(out, overwrite)  # again under the lock
        with atomic_path(out) as tmp:
            summary["tensors"] = write_gguf(tmp, model.state_dict(), cfg, tok, specials, dtype, root.name)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
    logger.info(f"wrote {summary['tensors']} tensors to {out}")
    return summary
