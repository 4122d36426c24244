"""The peer baselines: our all-attention model's weights in Hugging Face's own class of its family,
GPT2LMHeadModel (the GPT-2 family) or LlamaForCausalLM (the Llama family), and converted from those to
CTranslate2's C++ engine (float32, int8); their decoders for the benchmark's estimator (timing.decode_rate) and
the peers bench measures beside the standard entries (:func:`make_peers`).

The configs and weights go through interop.hf, the one mapping between our names and HF's. `transformers`
and `ctranslate2` are optional dependencies (the `peer` extra).
"""

from __future__ import annotations

import logging

import torch

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.infer.config import PEERS
from hybrid_gpt.infer.decoders import Stepping
from hybrid_gpt.infer.entries import entry_name, precision
from hybrid_gpt.interop.hf import family_of, hf_config, to_hf_state, transformers_module
from hybrid_gpt.model.gpt import GPT
from hybrid_gpt.runtime import DTYPES

logger = logging.getLogger(__name__)


def _transformers():
    return transformers_module("the peer baseline", "peer")


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


# --- the peers in the benchmark: their decoders, and which peers of which entries ---


class PeerDecoder(Stepping):
    """A transformers model's side of the estimator (as decoders.OursDecoder is ours): its own cache, cropped
    back between repeats."""

    def __init__(self, hf):
        import inspect

        from transformers import DynamicCache

        self.hf, self.cache = hf, None
        self.cache_arg = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
        # transformers 5 crops by the number of tokens to remove (negative), 4 by the length to keep.
        self.crop_removes = "tokens_to_remove" in inspect.signature(DynamicCache.crop).parameters

    def prefill(self, tokens: torch.Tensor) -> None:
        out = self.hf(tokens, use_cache=True, logits_to_keep=1)
        self.cache = out["cache"] if "cache" in out else out["past_key_values"]  # transformers 5 / 4

    def rewind(self, length: int) -> None:
        have = self.cache.get_seq_length()
        self.cache.crop(-(have - length) if self.crop_removes else length)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        out = self.hf(token, use_cache=True, logits_to_keep=1, **{self.cache_arg: self.cache})
        return out.logits[:, -1].argmax(-1, keepdim=True)


class CT2Decoder:
    """CTranslate2's side. Its Generator keeps a KV cache only inside one generate call and has no call that
    rewinds one; what it does keep between calls is a static prompt's state. So:

    - prefill: one generate call on the whole prompts for one new token (the prompt but its last token
      forwarded at once, then the last one: what generation does before its first token), as ours;
    - decode: one generate call from the static prompt ``tokens[0, :context - n]``, its state cached when the
      decoder is made (untimed) and copied to the batch in every call, with start tokens
      ``tokens[:, context - n]``, for n greedy tokens (min_length = max_length = n): n forward steps at the
      positions ours decodes. Timed: the whole call, so CTranslate2's per-call setup and the copy of the cached
      state count, as our Python per step does. At batch > 1 the rows share row 0's context (a static prompt is
      one for the batch): a step costs the same whatever the token values."""

    def __init__(self, generator, tokens: torch.Tensor, n: int):
        self.generator = generator
        self.decode(tokens, n)  # forward and cache the static prompt now, outside the timed calls

    def prefill(self, tokens: torch.Tensor) -> None:
        self.generator.generate_batch([ct2_tokens(row) for row in tokens.tolist()], max_length=1,
                                      include_prompt_in_result=False, beam_size=1, sampling_topk=1)

    def decode(self, tokens: torch.Tensor, n: int) -> torch.Tensor:
        length = tokens.size(1) - n
        return torch.tensor(ct2_greedy(self.generator, tokens[0, :length].tolist(), tokens[:, length].tolist(), n))


def make_peers(models: dict[str, GPT], vocab: int, block: int, gen, device, kinds=PEERS) -> dict[str, dict]:
    """The peers of ``kinds`` (see BenchConfig.peers) for the standard (all-attention) entries: name -> {"kind",
    "of" (our entry whose weights it holds), "dtype", "model", "max_abs_logit_diff", "implementation"}."""
    unknown = [k for k in kinds if k not in PEERS]
    if unknown:
        raise HybridGPTError(f"unknown peer {unknown[0]!r}; choose from {', '.join(PEERS)}")
    standard = [n for n, m in models.items() if set(m.config.layers) == {"A"}]
    if not standard:
        logger.info("peer: skipped (no standard, all-attention model among the checkpoints)")
        return {}
    probe = torch.randint(0, vocab, (2, min(block, 64)), generator=gen).to(device)
    peers = _transformers_peers(models, standard, probe) if "transformers" in kinds else {}
    return peers | (_ct2_peers(models, standard, probe) if "ctranslate2" in kinds else {})


def _transformers_peers(models: dict[str, GPT], standard: list[str], probe: torch.Tensor) -> dict[str, dict]:
    """One transformers model of the entry's family (GPT2LMHeadModel, LlamaForCausalLM) with its weights, per
    precision of the standard entries."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        logger.info("peer: skipped (transformers is not installed: `uv sync --extra peer`)")
        return {}
    peers, seen = {}, set()
    for of in standard:
        dtype = precision(models[of])
        if dtype in seen or dtype not in DTYPES:  # one peer per precision (none for int8): of the first in it
            continue
        seen.add(dtype)
        try:
            hf = to_hf(models[of])
        except HybridGPTError as e:  # a family transformers has no model of: measure ours alone
            logger.info(f"peer: skipped for {of} ({e})")
            continue
        diff = max_logit_difference(models[of], hf, probe)
        impl = f"transformers {type(hf).__name__}"
        peers[entry_name("peer", dtype)] = {"kind": "transformers", "of": of, "dtype": dtype, "model": hf,
                                            "max_abs_logit_diff": diff, "implementation": impl}
        logger.info(f"peer: {impl} with {of}'s weights ({dtype}), max |logit difference| {diff:.2e}")
    return peers


def _ct2_peers(models: dict[str, GPT], standard: list[str], probe: torch.Tensor) -> dict[str, dict]:
    """CTranslate2's Generator of the first float32 standard entry, converted once (to a temporary directory,
    removed once loaded), in float32 ("ctranslate2") and int8 ("ctranslate2@int8"), each checked against our
    logits on ``probe``: max |difference| and the fraction of positions with the same greedy token."""
    import tempfile

    ctranslate2 = ctranslate2_module(required=False)
    if ctranslate2 is None:
        logger.info(f"ctranslate2 peer: skipped ({CT2_MISSING})")
        return {}

    of = next((n for n in standard if precision(models[n]) == "float32"), None)
    if of is None:
        logger.info("ctranslate2 peer: skipped (no float32 standard entry to convert)")
        return {}
    device = next(models[of].parameters()).device
    peers = {}
    with tempfile.TemporaryDirectory(prefix="hybrid-gpt-ct2-") as tmp:
        try:
            path = to_ctranslate2(models[of], tmp)
        except HybridGPTError as e:  # a family CTranslate2 has no converter of: measure ours alone
            logger.info(f"ctranslate2 peer: skipped for {of} ({e})")
            return {}
        for compute in CT2_COMPUTE_TYPES:
            gen = ct2_generator(path, compute, device.type)
            check = ct2_agreement(models[of], gen, probe)
            impl = f"CTranslate2 {ctranslate2.__version__} Generator ({compute})"
            peers[entry_name("ctranslate2", compute)] = {"kind": "ctranslate2", "of": of, "dtype": compute,
                                                         "model": gen, "implementation": impl, **check}
            logger.info(f"ctranslate2 peer: {impl} with {of}'s weights, max |logit difference| "
                        f"{check['max_abs_logit_diff']:.2e}, same greedy token at {100 * check['top1_agreement']:.1f}% "
                        "of positions")
    return peers
