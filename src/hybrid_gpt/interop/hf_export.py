"""A checkpoint as a Hugging Face model directory, for `hybrid-gpt export --format hf`.

A model that one of transformers' own classes computes (all attention, GPT-2 or Llama family: interop.hf's
family_of) becomes that class's directory: config.json written by its config class, model.safetensors in its
tensor names (interop.hf's one mapping), loaded with no custom code. Any other model (a hybrid, with M or N blocks,
or a family no class of theirs computes) keeps our config fields and tensor names and brings its own modeling file
(hf_modeling.py, copied as modeling_hybrid_gpt.py and named by config.json's auto_map), loaded with
``trust_remote_code=True``. Both get the tokenizer as `AutoTokenizer` loads it (tokenizer.json as ours,
tokenizer_config.json with its special tokens and the chat template in Jinja) and generation_config.json.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from safetensors.torch import save as save_safetensors

from hybrid_gpt.checkpoint import own_tensors
from hybrid_gpt.data.template import jinja_template
from hybrid_gpt.data.tokenizer import Tokenizer
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import write_bytes, write_json, write_text
from hybrid_gpt.interop.config import EXPORT_EXTRA
from hybrid_gpt.interop.hf import CLASSES, family_of, hf_config, to_hf_state, transformers_module
from hybrid_gpt.model.gpt import GPT, GPTConfig
from hybrid_gpt.runtime import DTYPES

logger = logging.getLogger(__name__)

REMOTE_MODULE = "modeling_hybrid_gpt"  # the modeling file's name in an export (auto_map names its classes)
HF_EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                   "generation_config.json", f"{REMOTE_MODULE}.py")
EXPORT_MARK = "hybrid_gpt_export"  # config.json's record of the export: what --overwrite may replace
CONFIG_CLASSES = {"llama": "LlamaConfig", "gpt2": "GPT2Config"}


def native_family(cfg: GPTConfig) -> str | None:
    """The transformers family ("llama", "gpt2") whose own class computes ``cfg``'s model, or None (a hybrid, or a
    mix of the families' parts), which then needs the modeling file."""
    try:
        return family_of(cfg)
    except HybridGPTError as e:
        logger.info(f"no transformers class computes this model ({e}): writing {REMOTE_MODULE}.py beside it, "
                    "loaded with trust_remote_code=True")
        return None


def hf_transformers():
    """`transformers`, which writes a native export's config.json, or a one-line error naming the extra."""
    return transformers_module("exporting a standard model as a Hugging Face directory", EXPORT_EXTRA)


def _token_ids(specials: dict) -> dict:
    return {"bos_token_id": specials["bos"], "eos_token_id": specials["eos"], "pad_token_id": specials["eos"]}


def _native_config(cfg: GPTConfig, family: str, specials: dict, dtype: str) -> dict:
    """config.json as the family's own config class writes it (this transformers version's fields: its RoPE
    section, its defaults left out), with our token ids and the weights' dtype."""
    transformers = hf_transformers()
    fields = {k: v for k, v in hf_config(cfg).items() if k != "model_type"}
    config = getattr(transformers, CONFIG_CLASSES[family])(**fields, **_token_ids(specials))
    out = config.to_diff_dict()
    out["torch_dtype" if int(transformers.__version__.split(".")[0]) < 5 else "dtype"] = dtype  # 5 renamed it
    return out


def _remote_config(cfg: GPTConfig, specials: dict, dtype: str) -> dict:
    """config.json of a model the modeling file computes: our GPTConfig's fields (dropout aside: an export is for
    inference), auto_map naming the file's classes."""
    fields = {k: v for k, v in cfg.to_dict().items() if k not in ("dropout", "tie_embeddings")}
    return {"architectures": ["HybridGPTForCausalLM"], "model_type": "hybrid_gpt",
            "auto_map": {"AutoConfig": f"{REMOTE_MODULE}.HybridGPTConfig",
                         "AutoModelForCausalLM": f"{REMOTE_MODULE}.HybridGPTForCausalLM"},
            **fields, "tie_word_embeddings": cfg.tie_embeddings, **_token_ids(specials), "dtype": dtype,
            "use_cache": True}


def _tokenizer_config(tok: Tokenizer, cfg: GPTConfig, specials: dict) -> dict:
    """tokenizer_config.json: the fast tokenizer of tokenizer.json as it is (no class of transformers' own that
    would rebuild it), its special tokens by name, and the chat template where the checkpoint has one.
    Decoding leaves spaces as they are (clean_up_tokenization_spaces), as ours does."""
    bos, eos = (None if i is None else tok.hf.id_to_token(i) for i in (specials["bos"], specials["eos"]))
    out = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": eos,
           "unk_token": None, "model_max_length": cfg.block_size, "clean_up_tokenization_spaces": False}
    if tok.template is not None:
        out["chat_template"] = jinja_template(tok.template)
    return out


def _weights(model: GPT, family: str | None, dtype: str) -> bytes:
    """model.safetensors: HF's names and layouts for a native family, else ours; a tied lm_head stored once (as
    both name it: transformers ties it back when it loads)."""
    state = model.state_dict()
    state = to_hf_state(state, model.config) if family else own_tensors(state, model)
    cast = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in state.items()}
    return save_safetensors(cast, metadata={"format": "pt"})


def write_hf_dir(tmp: Path, model: GPT, tok: Tokenizer, family: str | None, specials: dict, dtype: str,
                 mark: dict) -> dict:
    """Write the export of ``model`` and ``tok`` into the empty directory ``tmp`` (a staged_dir that the caller
    swaps into place whole): as transformers' class of ``family`` (:func:`native_family`), or with the modeling
    file when None; ``mark`` is recorded in config.json under EXPORT_MARK. Returns what was written."""
    cfg = model.config
    config = _native_config(cfg, family, specials, dtype) if family else _remote_config(cfg, specials, dtype)
    config[EXPORT_MARK] = {**mark, "layers": cfg.layers, "native": family is not None}
    write_json(tmp / "config.json", config)
    write_bytes(tmp / "model.safetensors", _weights(model, family, dtype))
    write_text(tmp / "tokenizer.json", tok.to_str())
    write_json(tmp / "tokenizer_config.json", _tokenizer_config(tok, cfg, specials))
    generation = {k: v for k, v in _token_ids(specials).items() if v is not None}
    if specials["stop"]:
        generation["eos_token_id"] = specials["stop"]
    write_json(tmp / "generation_config.json", generation)
    if family is None:
        source = resources.files("hybrid_gpt.interop").joinpath("hf_modeling.py").read_text(encoding="utf-8")
        write_text(tmp / f"{REMOTE_MODULE}.py", source)
    return {"architecture": CLASSES[family] if family else "HybridGPTForCausalLM", "native": family is not None}

