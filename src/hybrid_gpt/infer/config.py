"""Inference's options and limits, torch-free: the CLI builds its flags from them without loading torch; the
engine, chat, the benchmark and the cost model import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hybrid_gpt.data.config import MAX_VOCAB
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.options import DTYPE_NAMES, check_fields, option

# How long one generation may run: past its context a model sees only a sliding window, so a request of a
# million tokens from a 32-token model is a typo that would run for a quarter of an hour. At most
# GENERATION_CONTEXTS times the model's context, never less than MIN_GENERATION_LIMIT (a short-context model
# may still write a page), never more than MAX_NEW_TOKENS.
MAX_NEW_TOKENS = 100_000
GENERATION_CONTEXTS = 32
MIN_GENERATION_LIMIT = 1024
GENERATION_RULE = (f"at most {GENERATION_CONTEXTS} x the model's context or {MIN_GENERATION_LIMIT:,}, whichever is "
                   f"more, and {MAX_NEW_TOKENS:,} at the most")


def generation_limit(block_size: int) -> int:
    """The most new tokens one generation by a model of context ``block_size`` may ask for (GENERATION_RULE)."""
    return min(MAX_NEW_TOKENS, max(MIN_GENERATION_LIMIT, GENERATION_CONTEXTS * block_size))


def check_new_tokens(n: int, block_size: int, name: str = "max_new_tokens") -> None:
    """HybridGPTError, naming ``name``, unless ``n`` new tokens are within :func:`generation_limit`: checked
    before anything is generated, by generate itself and up front by the commands that generate."""
    limit = generation_limit(block_size)
    if n > limit:
        raise HybridGPTError(f"{name} {n:,} is more than a model of context {block_size:,} may generate at once: "
                             f"{limit:,} ({GENERATION_RULE}); ask for fewer")


# The linear layers' weights in int8 with a float32 scale per output row, everything else (embedding tables,
# norms, biases, the KV cache) in float32: infer/entries.quantize_int8's model. Its weights and its KV cache
# differ in width, which is why a precision here is a torch.dtype or this name.
INT8 = "int8"
PRECISIONS = (*DTYPE_NAMES, INT8)
# The precisions bench measures: runtime's dtypes (DTYPE_NAMES; weights and KV cache in it), and int8 (see
# entries.quantize_int8), each priced by the cost model.
BENCH_DTYPES = PRECISIONS
TRAIN_BENCH_BATCH = 16  # rows per step of the training throughput (bench --train-batch)

# Physical bounds of a machine's figures, in GB/s and GFLOP/s: from a microcontroller's (1 MB/s, 1 MFLOP/s) to
# far beyond any accelerator (1 PB/s, 1 EFLOP/s; an H200 moves 4.8 TB/s): a figure outside is a typo, whose
# step times would print hundreds of digits.
BANDWIDTH_GBS = (1e-3, 1e6)
FLOPS_GFLOPS = (1e-3, 1e9)
# The contexts of a costs table by default, up to the model's (costs.default_contexts).
CONTEXTS = (256, 1024, 4096, 16384)

MIN_TEMPERATURE = 1e-3  # below it logits / temperature overflow float32; 0 means greedy


def _temperature(value: float) -> str | None:
    return None if value == 0 or value >= MIN_TEMPERATURE else f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}"


@dataclass
class Sampling:
    """How each next token is drawn; the chat and sample commands' flags are built from these fields."""

    max_new_tokens: int = option(128, lo=1, hi=MAX_NEW_TOKENS,
                                 help=f"tokens generated per reply or sample: {GENERATION_RULE} (past its context "
                                      "the model sees only a sliding window)")
    temperature: float = option(0.8, lo=0, hi=1000, check=_temperature, help="0 for greedy")
    top_k: int = option(50, lo=0, hi=MAX_VOCAB, help="0 to disable")
    top_p: float | None = option(None, lo=0, lo_open=True, hi=1, help="nucleus sampling: keep this much mass")

    def validate(self, block_size: int | None = None) -> "Sampling":
        """These settings within their options' ranges, and with ``block_size`` within what a model of that
        context may generate (:func:`generation_limit`): a one-line error before anything is generated."""
        check_fields(self)
        if block_size is not None:
            check_new_tokens(self.max_new_tokens, block_size)
        return self


PEERS = ("transformers", "ctranslate2")


@dataclass
class BenchConfig:
    contexts: list[int] | None = None  # final context lengths (prompt + new tokens); default from the model
    new_tokens: int = 24
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    repeats: int = 5
    warmup: int = 1
    naive: bool = True  # also decode without a cache (re-run the growing sequence for every token)
    # ... at contexts up to this only: each naive step is a whole prefill, hopeless at long contexts.
    naive_max_context: int = 2048
    # Time the prefill. Without it each decoder is primed once per context and batch, untimed, and only the
    # decode is repeated: at long contexts the prefills would take most of the time.
    prefill: bool = True
    peer: bool = True  # False: no peer at all
    # Which peers, each with the standard model's weights: "transformers" (HF's class of its family, in each of
    # cfg.dtypes) and "ctranslate2" (CTranslate2's C++ engine, float32 and int8), where installed.
    peers: list[str] = field(default_factory=lambda: list(PEERS))
    seed: int = 0
    # Weight and KV-cache precisions to measure, each model in each; float32 keeps the plain model name,
    # the others are named "<model>@<dtype>" (e.g. "standard@bfloat16").
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    quality_tokens: int = 32768  # validation tokens for each precision's bits per byte (when data is given)
    # Also measure every float entry's decode through the static step compiled (engine.compile_step: one graph
    # for every position; CPU: inductor with frozen weights and its C++ wrapper; GPU: CUDA graphs), as
    # "<entry>+compile". Its prefill is the eager model's, so it is not timed again.
    compile: bool = False
