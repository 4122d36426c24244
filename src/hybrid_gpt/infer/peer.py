"""The peer baseline: our all-attention model's weights in Hugging Face's own class of its family,
GPT2LMHeadModel (the GPT-2 family) or LlamaForCausalLM (the Llama family).

The configs and weights go through interop.hf, the one mapping between our names and HF's. `transformers`
is an optional dependency (the `peer` extra).
"""

from __future__ import annotations

import torch

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.interop.hf import family_of, hf_config, to_hf_state
from hybrid_gpt.model.gpt import GPT


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise HybridGPTError("the peer baseline needs `transformers`: install it with `uv sync --extra peer`") from e
    return transformers


def _build(model: GPT, config_class: str, model_class: str, **extra):
    """HF's ``model_class`` holding ``model``'s weights, on its device and in its dtype, in eval mode."""
    transformers = _transformers()
    cfg = model.config
    fields = {k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type")}
    hf = getattr(transformers, model_class)(getattr(transformers, config_class)(**fields, use_cache=True, **extra))
    state = to_hf_state(model.state_dict(), cfg)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:
        raise HybridGPTError(f"{model_class} mapping failed: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        hf.tie_weights()
    p = next(model.parameters())
    return hf.to(device=p.device, dtype=p.dtype).eval()


def to_hf_gpt2(model: GPT):
    """A GPT2LMHeadModel with the same configuration and weights (all-attention GPT-2-family models only)."""
    if family_of(model.config) != "gpt2":
        raise HybridGPTError(f"a model of the {model.config.family} family does not map onto GPT-2")
    # GPT-2's own bos/eos (50256) lie outside our vocabularies.
    return _build(model, "GPT2Config", "GPT2LMHeadModel", bos_token_id=0, eos_token_id=0)


def to_hf_llama(model: GPT):
    """A LlamaForCausalLM with the same configuration and weights (all-attention Llama-family models only)."""
    if family_of(model.config) != "llama":
        raise HybridGPTError(f"a model of the {model.config.family} family does not map onto Llama")
    return _build(model, "LlamaConfig", "LlamaForCausalLM", bos_token_id=None, eos_token_id=None, pad_token_id=None)


def to_hf(model: GPT):
    """HF's model of ``model``'s family (GPT-2 or Llama) with the same weights."""
    return {"gpt2": to_hf_gpt2, "llama": to_hf_llama}[family_of(model.config)](model)


@torch.inference_mode()
def max_logit_difference(model: GPT, hf, idx: torch.Tensor) -> float:
    return (model(idx) - hf(idx).logits).abs().max().item()


# --- CTranslate2: a C++ inference engine, the fastest peer a CPU user would pick (float32 or int8) ---

CT2_COMPUTE_TYPES = ("float32", "int8")  # the precisions its peer runs in (int8: weights quantized when loaded)


CT2_MISSING = "the CTranslate2 peer needs `ctranslate2`: install it with `uv sync --extra peer`"


def ctranslate2_module(required: bool = True):
    """The ``ctranslate2`` module (the peer extra); where it is not installed, a one-line error, or None when not
    ``required`` (bench then measures without it)."""
    try:
        import ctranslate2
    except ImportError as e:
        if not required:
            return None
        raise HybridGPTError(CT2_MISSING) from e
    return ctranslate2


def ct2_tokens(ids) -> list[str]:
    """Token ids as the names in a converted model's vocabulary ("<id>"): CTranslate2's generate calls take names."""
    return [f"<{i}>" for i in ids]


class _Vocabulary:
    """What the converter reads of a tokenizer: names for our ids, and id 0 as bos/eos/unk (as in to_hf_gpt2)."""

    bos_token = eos_token = unk_token = "<0>"

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def get_vocab(self) -> dict[str, int]:
        return dict(zip(ct2_tokens(range(self.vocab_size)), range(self.vocab_size)))


def to_ctranslate2(model: GPT, directory) -> str:
    """Convert ``model`` (all-attention, GPT-2 or Llama family, any dtype) into a CTranslate2 model directory
    ``directory`` (created; float32 weights, which CTranslate2 quantizes when a Generator loads them with
    compute_type int8); returns its path. Goes through :func:`to_hf` and CTranslate2's own TransformersConverter,
    handed the HF model in memory and a vocabulary of :func:`ct2_tokens`, so nothing is read from a hub."""
    import copy
    from pathlib import Path

    ctranslate2_module()
    from ctranslate2.converters import TransformersConverter

    hf = to_hf(copy.deepcopy(model).float().cpu())
    source = Path(directory) / "hf-config"
    hf.config.save_pretrained(source)  # the converter reads the config.json to pick its loader

    class Converter(TransformersConverter):
        def load_model(self, *args, **kwargs):
            return hf

        def load_tokenizer(self, *args, **kwargs):
            return _Vocabulary(model.config.vocab_size)

    return Converter(str(source)).convert(str(Path(directory) / "ct2"), quantization="float32")


def ct2_generator(path: str, compute_type: str = "float32", device: str = "cpu", threads: int | None = None):
    """A CTranslate2 Generator of the converted model at ``path``, in ``compute_type`` (float32 or int8), using
    ``threads`` threads (default torch's, as our model uses)."""
    ctranslate2 = ctranslate2_module()
    if compute_type not in CT2_COMPUTE_TYPES:
        raise HybridGPTError(f"CTranslate2 compute type {compute_type!r}: choose from {', '.join(CT2_COMPUTE_TYPES)}")
    return ctranslate2.Generator(path, device=device, compute_type=compute_type, inter_threads=1,
                                 intra_threads=threads or torch.get_num_threads())


def ct2_logits(generator, idx: torch.Tensor) -> torch.Tensor:
    """The converted model's logits [B, T, vocab] for token ids ``idx`` [B, T] (float32, on the CPU)."""
    import numpy as np

    out = generator.forward_batch(idx.tolist())
    if generator.device != "cpu":
        out = out.to_device(ctranslate2_module().Device.cpu)
    return torch.as_tensor(np.asarray(out)).float()


@torch.inference_mode()
def ct2_agreement(model: GPT, generator, idx: torch.Tensor) -> dict:
    """How closely the converted model follows ``model`` on ``idx`` [B, T]: the max |logit difference| and the
    fraction of positions whose greedy (top-1) token is the same."""
    ours, theirs = model(idx).float().cpu(), ct2_logits(generator, idx)
    return {"max_abs_logit_diff": (ours - theirs).abs().max().item(),
            "top1_agreement": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()}


def ct2_greedy(generator, context: list[int], starts: list[int], n: int, *, cache_context: bool = True):
    """``n`` greedy tokens for each row of a batch that shares ``context`` (token ids) and then has its own start
    token (``starts``, one per row): [len(starts), n] token ids. ``context`` is CTranslate2's static prompt, its
    state cached across calls with ``cache_context`` (the one state its Generator keeps between calls); the start
    tokens are forwarded at once, then the n - 1 other steps run with its own KV cache; no end token stops it
    early (min_length = max_length = n)."""
    results = generator.generate_batch([ct2_tokens([s]) for s in starts], static_prompt=ct2_tokens(context),
                                       cache_static_prompt=cache_context, include_prompt_in_result=False,
                                       max_length=n, min_length=n, beam_size=1, sampling_topk=1)
    return [r.sequences_ids[0] for r in results]
