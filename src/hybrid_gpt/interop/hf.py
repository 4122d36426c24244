"""The one mapping between our models and Hugging Face's: configs and state-dict names, both directions,
for the two families our GPT class holds, LlamaForCausalLM ("llama") and GPT2LMHeadModel ("gpt2").

Ours fuses what HF keeps apart: ``c_attn`` is q, k, v stacked by rows (Llama's q_proj, k_proj, v_proj) and
a SwiGLU ``c_fc`` is gate then up (gate_proj, up_proj). GPT-2's Conv1D layers store the transpose of our
Linear. Only all-attention patterns exist in HF's classes. Reading a HF directory needs no `transformers`:
config.json is read here, the weights with safetensors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from hybrid_gpt.checkpoint import FORMAT, load_weights, weights_limit
from hybrid_gpt.data.tokenizer import TOKENIZER_LIMIT
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import clip, read_json, read_text
from hybrid_gpt.interop.config import install_hint
from hybrid_gpt.model.gpt import LAYER_COUNT, GPTConfig
from hybrid_gpt.options import MAX_WIDTH, Spec, check_value, kinds, shown, spec_of
from hybrid_gpt.runtime import ensure_fits

logger = logging.getLogger(__name__)

ARCHITECTURES = {"LlamaForCausalLM": "llama", "GPT2LMHeadModel": "gpt2"}
CLASSES = {family: name for name, family in ARCHITECTURES.items()}
# Tensors of HF checkpoints that hold no weights of ours: GPT-2's causal-mask buffers (older files) and
# RoPE's inverse frequencies (recomputed from rope_theta).
BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
KIND_NAMES = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}


@dataclass(frozen=True)
class Rule:
    """Our tensor ``ours`` is HF's ``theirs``: stacked by rows (sizes ``rows``, each of trailing shape ``cols``)
    when there are several, transposed when ``conv1d`` (GPT-2)."""

    ours: str
    theirs: tuple[str, ...]
    rows: tuple[int, ...] = ()
    conv1d: bool = False
    cols: tuple[int, ...] = ()


def transformers_module(needs: str, extra: str):
    """The `transformers` package, or a one-line error saying what ``needs`` it and the extra that installs it
    (an optional dependency: reading HF directories does without it)."""
    try:
        import transformers
    except ImportError as e:
        raise HybridGPTError(f"{needs} needs `transformers`: {install_hint(extra)}") from e
    return transformers


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
                cols = (cfg.n_embd,) if s == ".weight" else ()
                out += [Rule(ours + "mixer.c_attn" + s, tuple(f"{theirs}self_attn.{p}_proj{s}" for p in "qkv"),
                             rows=(q, kv, kv), cols=cols),
                        Rule(ours + "mixer.c_proj" + s, (theirs + "self_attn.o_proj" + s,)),
                        Rule(ours + "mlp.c_fc" + s, (theirs + "mlp.gate_proj" + s, theirs + "mlp.up_proj" + s),
                             rows=(ffn, ffn), cols=cols),
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
            bad = [(n, tuple(p.shape), (rows, *r.cols)) for n, p, rows in zip(r.theirs, parts, r.rows)
                   if tuple(p.shape) != (rows, *r.cols)]  # each part against the config, so the culprit is named
            if bad:
                name, shape, expected = bad[0]
                raise HybridGPTError(f"{where}: {name} has shape {shape}, not {expected} as the model's "
                                     "configuration gives")
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


REQUIRED = object()  # the default of a key that must be present
N_LAYER = "n_layer"  # what a key sets when it gives the number of blocks (checked before the pattern is spelled out)


@dataclass(frozen=True)
class Key:
    """One key of a foreign model config (a HF config.json's, a GGUF file's metadata): the GPTConfig field it
    sets (``ours``; N_LAYER: the block count), or, for a key that is only checked, its own ``kind`` and
    ``spec``; ``default`` when it is absent or null."""

    name: str
    ours: str | None = None
    default: object = REQUIRED
    kind: str | None = None
    spec: Spec = Spec()


def read_keys(get: Callable[[str], object], keys: tuple[Key, ...], where: str) -> dict:
    """{key name: value} of ``keys`` as ``get`` gives them (None: absent), every one checked for type and range
    by the CLI's own rules (options.check_value with GPTConfig's spec of the field it sets, else the key's)
    before anything is computed from any of them: a hostile config is refused here in one line, never in an
    allocation, a loop or a hash. An int given for a float is read as the float."""
    kind_of = kinds(GPTConfig) | {N_LAYER: "int"}
    specs = {f.name: spec_of(f) for f in fields(GPTConfig)} | {N_LAYER: LAYER_COUNT}
    out = {}
    for key in keys:
        value = get(key.name)
        if value is None:
            if key.default is REQUIRED:
                raise HybridGPTError(f"{where} lacks {key.name}")
            value = key.default
        kind, spec = (kind_of[key.ours], specs[key.ours]) if key.ours else (key.kind, key.spec)
        problem = check_value(value, kind, spec)
        if problem:
            raise HybridGPTError(f"{where}: {key.name} {problem}, got {shown(value)}")
        out[key.name] = float(value) if kind == "float" and value is not None else value
    return out


def layer_pattern(n_layer: int) -> str:
    """The all-attention pattern of a checked block count (HF's and GGUF's models have no other)."""
    return "A" * n_layer


_OPTIONAL_WIDTH = dict(default=None, kind="int", spec=Spec(lo=1, hi=MAX_WIDTH))
HF_KEYS = {
    "llama": (Key("vocab_size", "vocab_size", 32000), Key("max_position_embeddings", "block_size", 2048),
              Key("hidden_size", "n_embd"), Key("num_attention_heads", "n_head"),
              Key("num_key_value_heads", "n_kv_head", 0), Key("num_hidden_layers", N_LAYER),
              Key("intermediate_size", "ffn_hidden", 11008), Key("rms_norm_eps", "norm_eps", 1e-6),
              Key("rope_theta", "rope_theta", 10000.0), Key("attention_bias", "bias", False),
              Key("tie_word_embeddings", "tie_embeddings", False), Key("mlp_bias", default=False, kind="bool"),
              Key("hidden_act", default="silu", kind="str", spec=Spec(choices=("silu",))),
              Key("head_dim", **_OPTIONAL_WIDTH)),
    "gpt2": (Key("vocab_size", "vocab_size", 50257), Key("n_positions", "block_size", 1024),
             Key("n_embd", "n_embd", 768), Key("n_head", "n_head", 12), Key("n_layer", N_LAYER, 12),
             Key("n_inner", **_OPTIONAL_WIDTH), Key("layer_norm_epsilon", "norm_eps", 1e-5),
             Key("tie_word_embeddings", "tie_embeddings", True),
             Key("activation_function", default="gelu_new", kind="str",
                 spec=Spec(choices=("gelu_new", "gelu_pytorch_tanh"))),
             Key("scale_attn_by_inverse_layer_idx", default=False, kind="bool"),
             Key("scale_attn_weights", default=True, kind="bool")),
}


def _rope_sections(d: dict, where: str) -> dict:
    """rope_parameters of a Llama config.json (transformers 5; {} in 4's, where rope_theta is at the top level);
    scaled RoPE (Llama 3.1's, YaRN, ...) is refused: our RoPE is the plain one."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise HybridGPTError(f"{where}: rope_parameters and rope_scaling must be objects")
    for spec in (params, scaling):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind != "default":
            raise HybridGPTError(f"{where}: RoPE scaling {clip(repr(kind))} is not supported (only plain RoPE)")
    return params


def config_from_hf(d: dict, where: str) -> GPTConfig:
    """Our GPTConfig of a HF config.json (LlamaForCausalLM or GPT2LMHeadModel; absent fields take HF's
    defaults), every key checked (:func:`read_keys`) before anything is computed from it; any other
    architecture, or a variant our class does not compute, is a one-line error."""
    if not isinstance(d, dict):
        raise HybridGPTError(f"{where} is not a JSON object")
    archs = d.get("architectures") or []
    family = d.get("model_type")
    known = (isinstance(archs, list) and len(archs) <= 1 and all(isinstance(a, str) and a in ARCHITECTURES
                                                                  for a in archs)
             and isinstance(family, str) and family in CLASSES and (not archs or ARCHITECTURES[archs[0]] == family))
    if not known:
        raise HybridGPTError(f"{where}: architecture {clip(repr(archs or family), 80)} is not supported; "
                             f"hybrid-gpt imports {' and '.join(ARCHITECTURES)}")
    if family == "llama":
        params = _rope_sections(d, where)
        v = read_keys(lambda k: params.get(k, d.get(k)) if k == "rope_theta" else d.get(k), HF_KEYS[family], where)
        heads, width = v["num_attention_heads"], v["hidden_size"]
        if v["head_dim"] not in (None, width // heads):
            raise HybridGPTError(f"{where}: head_dim {v['head_dim']} is not hidden_size / num_attention_heads, which "
                                 "our attention assumes")
        if v["mlp_bias"] != v["attention_bias"]:
            raise HybridGPTError(f"{where}: attention_bias and mlp_bias differ; our model has one bias setting")
        return GPTConfig.llama(
            vocab_size=v["vocab_size"], block_size=v["max_position_embeddings"], n_embd=width, n_head=heads,
            n_kv_head=v["num_key_value_heads"], layers=layer_pattern(v["num_hidden_layers"]),
            ffn_hidden=v["intermediate_size"], norm_eps=v["rms_norm_eps"], rope_theta=v["rope_theta"],
            bias=v["attention_bias"], tie_embeddings=v["tie_word_embeddings"], dropout=0.0).validate()
    v = read_keys(d.get, HF_KEYS[family], where)
    if v["scale_attn_by_inverse_layer_idx"] or not v["scale_attn_weights"]:
        raise HybridGPTError(f"{where}: GPT-2's attention-scaling variants are not supported")
    inner = v["n_inner"]
    return GPTConfig(vocab_size=v["vocab_size"], block_size=v["n_positions"], n_embd=v["n_embd"], n_head=v["n_head"],
                     layers=layer_pattern(v["n_layer"]), ffn_hidden=0 if inner in (None, 4 * v["n_embd"]) else inner,
                     norm_eps=v["layer_norm_epsilon"], tie_embeddings=v["tie_word_embeddings"],
                     dropout=0.0).validate()


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


def drop_template(why: str) -> None:
    """Note that the source's chat template is not carried over, and why: the one wording of every template
    that is left out (unusable, or without a hybrid-gpt form), so none goes without a note. Returns None."""
    logger.warning(f"note: its chat template {why}; the checkpoint has none (sample and eval work, chat does not)")


def chat_template_text(root: Path) -> str | None:
    """The Jinja chat template of a HF directory: chat_template.jinja (transformers 5) or tokenizer_config.json's
    chat_template (a string, or a list of named templates whose "default" is taken); None when it has none.
    One that cannot be used (not a regular file, not text, no "default" among named ones) is dropped with a
    note (:func:`drop_template`): the model imports without it."""
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        return read_text(jinja, "chat template", TOKENIZER_LIMIT)
    if jinja.exists():
        return drop_template("chat_template.jinja is not a regular file")
    config = root / "tokenizer_config.json"
    if not config.exists():
        return None
    if not config.is_file():
        return drop_template("file tokenizer_config.json is not a regular file")
    raw = read_json(config, "tokenizer config", TOKENIZER_LIMIT)
    template = raw.get("chat_template") if isinstance(raw, dict) else None
    if isinstance(template, list):
        named = {t["name"]: t.get("template") for t in template
                 if isinstance(t, dict) and isinstance(t.get("name"), str)}
        if "default" not in named:
            return drop_template("list in tokenizer_config.json has no template named \"default\"")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        return drop_template(f"in tokenizer_config.json is not text but {clip(repr(template), 40)}")
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
