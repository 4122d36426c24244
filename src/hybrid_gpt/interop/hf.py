"""The one mapping between our models and Hugging Face's: configs and state-dict names, both directions,
for the two families our GPT class holds, LlamaForCausalLM ("llama") and GPT2LMHeadModel ("gpt2").

Ours fuses what HF keeps apart: ``c_attn`` is q, k, v stacked by rows (Llama's q_proj, k_proj, v_proj) and
a SwiGLU ``c_fc`` is gate then up (gate_proj, up_proj). GPT-2's Conv1D layers store the transpose of our
Linear. Only all-attention patterns exist in HF's classes. Reading a HF directory needs no `transformers`:
config.json is read here, the weights with safetensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from hybrid_gpt.checkpoint import FORMAT, load_weights, weights_limit
from hybrid_gpt.data.tokenizer import TOKENIZER_LIMIT
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import clip, read_json, read_text
from hybrid_gpt.model.gpt import GPTConfig
from hybrid_gpt.runtime import ensure_fits

ARCHITECTURES = {"LlamaForCausalLM": "llama", "GPT2LMHeadModel": "gpt2"}
CLASSES = {family: name for name, family in ARCHITECTURES.items()}
# Tensors of HF checkpoints that hold no weights of ours: GPT-2's causal-mask buffers (older files) and
# RoPE's inverse frequencies (recomputed from rope_theta).
BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
KIND_NAMES = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}


@dataclass(frozen=True)
class Rule:
    """Our tensor ``ours`` is HF's ``theirs``: stacked by rows (sizes ``rows``) when there are several,
    transposed when ``conv1d`` (GPT-2)."""

    ours: str
    theirs: tuple[str, ...]
    rows: tuple[int, ...] = ()
    conv1d: bool = False


def family_of(cfg: GPTConfig) -> str:
    """"llama" or "gpt2": the HF family of a config, or HybridGPTError when it has none."""
    if set(cfg.layers) != {"A"}:
        raise HybridGPTError(f"only all-attention models map onto Hugging Face's classes, not pattern {cfg.layers}")
    if cfg.family not in CLASSES:
        raise HybridGPTError(f"a model of family {cfg.family!r} maps onto no Hugging Face class (only "
                             f"{' and '.join(CLASSES)})")
    if cfg.family == "llama" and cfg.rotary_dims not in (0, cfg.head_dim):
        raise HybridGPTError(f"RoPE on {cfg.rotary_dims} of {cfg.head_dim} head dims has no LlamaForCausalLM form")
    return cfg.family


def rules(cfg: GPTConfig) -> list[Rule]:
    """Every tensor of ours (the tied lm_head aside) and where it is in HF's state dict."""
    family = family_of(cfg)
    bias = (".weight", ".bias") if cfg.bias else (".weight",)
    out = []
    if family == "llama":
        out.append(Rule("transformer.wte.weight", ("model.embed_tokens.weight",)))
        q, kv, ffn = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.ffn_width
        for i in range(cfg.n_layer):
            ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
            out += [Rule(ours + "ln_1.weight", (theirs + "input_layernorm.weight",)),
                    Rule(ours + "ln_2.weight", (theirs + "post_attention_layernorm.weight",))]
            for s in bias:
                out += [Rule(ours + "mixer.c_attn" + s, tuple(f"{theirs}self_attn.{p}_proj{s}" for p in "qkv"),
                             rows=(q, kv, kv)),
                        Rule(ours + "mixer.c_proj" + s, (theirs + "self_attn.o_proj" + s,)),
                        Rule(ours + "mlp.c_fc" + s, (theirs + "mlp.gate_proj" + s, theirs + "mlp.up_proj" + s),
                             rows=(ffn, ffn)),
                        Rule(ours + "mlp.c_proj" + s, (theirs + "mlp.down_proj" + s,))]
        out.append(Rule("transformer.ln_f.weight", ("model.norm.weight",)))
    else:
        out += [Rule(f"transformer.{n}.weight", (f"transformer.{n}.weight",)) for n in ("wte", "wpe")]
        for i in range(cfg.n_layer):
            h = f"transformer.h.{i}."
            out += [Rule(h + n, (h + n,)) for n in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias")]
            for ours, theirs in (("mixer.c_attn", "attn.c_attn"), ("mixer.c_proj", "attn.c_proj"),
                                 ("mlp.c_fc", "mlp.c_fc"), ("mlp.c_proj", "mlp.c_proj")):
                out += [Rule(h + ours + s, (h + theirs + s,), conv1d=s == ".weight") for s in bias]
        out += [Rule(f"transformer.ln_f.{n}", (f"transformer.ln_f.{n}",)) for n in ("weight", "bias")]
    if not cfg.tie_embeddings:
        out.append(Rule("lm_head.weight", ("lm_head.weight",)))
    return out


def to_hf_state(state: Mapping[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Our state dict in HF's names and layouts (copies, contiguous)."""
    out = {}
    for r in rules(cfg):
        t = state[r.ours].detach()
        parts = t.split(list(r.rows)) if r.rows else (t,)
        for name, part in zip(r.theirs, parts):
            out[name] = (part.t() if r.conv1d else part).clone().contiguous()
    return out


def from_hf_state(state: Mapping[str, torch.Tensor], cfg: GPTConfig, where: str) -> dict[str, torch.Tensor]:
    """HF's state dict (as save_pretrained writes it) in our names and layouts. A missing tensor, one of the
    wrong shape for a fused one, or a tensor that is none of ours is a one-line error naming it."""
    out, used, missing = {}, set(), []
    for r in rules(cfg):
        absent = [n for n in r.theirs if n not in state]
        if absent:
            missing += absent
            continue
        parts = [state[n] for n in r.theirs]
        if r.rows:
            bad = [(n, tuple(p.shape), rows) for n, p, rows in zip(r.theirs, parts, r.rows) if p.dim() == 0 or
                   p.shape[0] != rows or p.shape[1:] != parts[0].shape[1:]]
            if bad:
                name, shape, rows = bad[0]
                raise HybridGPTError(f"{where}: {name} has shape {shape}, not the {rows} rows (and the columns of "
                                     f"{r.theirs[0]}) of the model's configuration")
            t = torch.cat(parts)
        else:
            t = parts[0].t() if r.conv1d and parts[0].dim() == 2 else parts[0]
        out[r.ours] = t.contiguous()
        used.update(r.theirs)
    if missing:
        raise HybridGPTError(f"{where} lacks {len(missing)} tensor(s) of its model, e.g. {clip(missing[0], 80)}")
    ignored = {"lm_head.weight"} if cfg.tie_embeddings else set()
    extra = sorted(n for n in state if n not in used and n not in ignored and not n.endswith(BUFFERS))
    if extra:
        raise HybridGPTError(f"{where} holds {len(extra)} tensor(s) that are none of its model's, e.g. "
                             f"{clip(extra[0], 80)}: it is not a plain {CLASSES[cfg.family]}")
    return out


# -- configs ----------------------------------------------------------------------------------------------------

def hf_config(cfg: GPTConfig) -> dict:
    """The config.json (fields of LlamaConfig or GPT2Config) of HF's model of ``cfg``."""
    family = family_of(cfg)
    common = {"architectures": [CLASSES[family]], "model_type": family, "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings}
    if family == "llama":
        return {**common, "hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_width,
                "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
                "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
                "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
                "rope_theta": cfg.rope_theta, "hidden_act": "silu", "attention_bias": cfg.bias,
                "mlp_bias": cfg.bias, "attention_dropout": 0.0}
    return {**common, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.ffn_width,
            "n_positions": cfg.block_size, "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def of_kind(value, kind: type):
    """``value`` as ``kind`` (an int counts as a float, a bool as nothing but a bool), or None if it is not one:
    the one type rule of imported metadata, config.json's and GGUF's alike."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)) else None


def _field(d: dict, key: str, kind: type, where: str, default=None):
    """``d[key]`` (else ``default``) if it is of ``kind`` (see :func:`of_kind`)."""
    value = of_kind(d.get(key, default), kind)
    if value is None:
        raise HybridGPTError(f"{where}: {key} must be {KIND_NAMES[kind]}, got {clip(repr(d.get(key, default)))}")
    return value


def _rope_theta(d: dict, where: str) -> float:
    """rope_theta of a Llama config.json (transformers 4: top level, 5: in rope_parameters); scaled RoPE
    (Llama 3.1's, YaRN, ...) is refused: our RoPE is the plain one."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise HybridGPTError(f"{where}: rope_parameters and rope_scaling must be objects")
    for spec in (params, scaling):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind != "default":
            raise HybridGPTError(f"{where}: RoPE scaling {clip(repr(kind))} is not supported (only plain RoPE)")
    return _field({"rope_theta": params.get("rope_theta", d.get("rope_theta", 10000.0))}, "rope_theta", float, where)


def config_from_hf(d: dict, where: str) -> GPTConfig:
    """Our GPTConfig of a HF config.json (LlamaForCausalLM or GPT2LMHeadModel; absent fields take HF's
    defaults); any other architecture, or a variant our class does not compute, is a one-line error."""
    if not isinstance(d, dict):
        raise HybridGPTError(f"{where} is not a JSON object")
    archs = d.get("architectures") or []
    family = d.get("model_type")
    if not isinstance(archs, list) or len(archs) > 1 or any(a not in ARCHITECTURES for a in archs) or (
            family not in CLASSES) or (archs and ARCHITECTURES[archs[0]] != family):
        raise HybridGPTError(f"{where}: architecture {clip(repr(archs or family), 80)} is not supported; "
                             f"hybrid-gpt imports {' and '.join(ARCHITECTURES)}")

    def f(key: str, kind: type = int, default=None):
        return _field(d, key, kind, where, default)

    if family == "llama":
        if f("hidden_act", str, "silu") != "silu":
            raise HybridGPTError(f"{where}: hidden_act {clip(repr(d['hidden_act']))} is not supported (only silu)")
        heads, width = f("num_attention_heads"), f("hidden_size")
        if d.get("head_dim") not in (None, width // max(heads, 1)):
            raise HybridGPTError(f"{where}: head_dim {clip(repr(d['head_dim']))} is not hidden_size / "
                                 "num_attention_heads, which our attention assumes")
        bias = f("attention_bias", bool, False)
        if f("mlp_bias", bool, False) != bias:
            raise HybridGPTError(f"{where}: attention_bias and mlp_bias differ; our model has one bias setting")
        return GPTConfig.llama(
            vocab_size=f("vocab_size", default=32000), block_size=f("max_position_embeddings", default=2048),
            n_embd=width, n_head=heads, n_kv_head=f("num_key_value_heads", default=heads),
            layers="A" * f("num_hidden_layers"), ffn_hidden=f("intermediate_size", default=11008),
            norm_eps=f("rms_norm_eps", float, 1e-6), rope_theta=_rope_theta(d, where), bias=bias,
            tie_embeddings=f("tie_word_embeddings", bool, False), dropout=0.0).validate()
    if f("activation_function", str, "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise HybridGPTError(f"{where}: activation_function {clip(repr(d['activation_function']))} is not "
                             "supported (only GPT-2's tanh GELU)")
    if d.get("scale_attn_by_inverse_layer_idx") or d.get("scale_attn_weights", True) is not True:
        raise HybridGPTError(f"{where}: GPT-2's attention-scaling variants are not supported")
    n_embd = f("n_embd", default=768)
    inner = d.get("n_inner")
    return GPTConfig(vocab_size=f("vocab_size", default=50257), block_size=f("n_positions", default=1024),
                     n_embd=n_embd, n_head=f("n_head", default=12), layers="A" * f("n_layer", default=12),
                     ffn_hidden=0 if inner in (None, 4 * n_embd) else f("n_inner"),
                     norm_eps=f("layer_norm_epsilon", float, 1e-5),
                     tie_embeddings=f("tie_word_embeddings", bool, True), dropout=0.0).validate()


def ensure_import_fits(cfg: GPTConfig, where: str) -> None:
    """Refuse, before the weights are read, a model whose import would not fit in memory: its float32 weights
    are held twice at the peak (as read, and in our model)."""
    ensure_fits(8 * cfg.num_params(), f"importing {where} ({cfg.num_params():,} parameters)",
                hint="import a smaller model, or free memory")


# -- a HF model directory -----------------------------------------------------------------------------------------

def _weight_files(root: Path) -> list[Path]:
    """The safetensors files of a HF directory: model.safetensors, or the shards its index names."""
    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "safetensors index")
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise HybridGPTError(f"{index} has no weight_map of tensor names to file names")
        names = sorted(set(weight_map.values()))
        bad = [n for n in names if Path(n).name != n or not (root / n).is_file()]
        if bad:
            raise HybridGPTError(f"{index} names shard {clip(repr(bad[0]))}, which is not a file in {root}")
        return [root / n for n in names]
    if any((root / n).exists() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise HybridGPTError(f"{root} holds PyTorch pickles (pytorch_model.bin), which are never loaded here; "
                             "convert them to safetensors first")
    raise HybridGPTError(f"{root} has no model.safetensors (nor model.safetensors.index.json)")


def chat_template_text(root: Path) -> str | None:
    """The Jinja chat template of a HF directory: chat_template.jinja (transformers 5) or tokenizer_config.json's
    chat_template (a string, or a list of named templates whose "default" is taken); None when it has none."""
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        return read_text(jinja, "chat template", TOKENIZER_LIMIT)
    config = root / "tokenizer_config.json"
    if not config.is_file():
        return None
    template = read_json(config, "tokenizer config", TOKENIZER_LIMIT)
    template = template.get("chat_template") if isinstance(template, dict) else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise HybridGPTError(f"{config}: chat_template must be a string or a list of named templates")
    return template


def read_hf_dir(root: Path) -> tuple[GPTConfig, dict[str, torch.Tensor], str, str | None]:
    """(config, our state dict, tokenizer.json text, Jinja chat template or None) of a HF model directory."""
    where = f"{root}/config.json"
    if not (root / "config.json").is_file():
        raise HybridGPTError(f"{root} is not a Hugging Face model directory (no config.json)")
    raw = read_json(root / "config.json", "model config")
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        raise HybridGPTError(f"{root} is a hybrid-gpt checkpoint already; use it as it is")
    cfg = config_from_hf(raw, where)
    tokenizer = root / "tokenizer.json"
    if not tokenizer.is_file():
        raise HybridGPTError(f"{root} has no tokenizer.json (a fast tokenizer), which the import needs")
    files = _weight_files(root)
    ensure_import_fits(cfg, str(root))
    limit = weights_limit(cfg)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        part = load_weights(file, limit)
        limit -= file.stat().st_size
        repeated = sorted(set(part) & set(state))
        if repeated:
            raise HybridGPTError(f"{file} repeats tensor {clip(repeated[0], 80)} of another shard")
        state.update(part)
    if cfg.family == "gpt2" and "transformer.wte.weight" not in state:  # the original GPT-2 files: no prefix
        state = {k if k.startswith("lm_head.") else "transformer." + k: v for k, v in state.items()}
    return (cfg, from_hf_state(state, cfg, str(root)), read_text(tokenizer, "tokenizer file", TOKENIZER_LIMIT),
            chat_template_text(root))
