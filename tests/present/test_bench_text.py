"""The benchmark's text tables pinned to the character for fixed results: the terminal's and the report's output
must not change when the code that writes them does (fixed-width text, not markdown: cells padded to their
column's width, trailing spaces kept)."""

from hybrid_gpt.infer.costs import costs_table
from hybrid_gpt.model.gpt import GPTConfig
from hybrid_gpt.present.bench import format_costs, format_table, format_train_table, random_weights


def s(median, lo, hi, n=3):
    """A figure's summary as infer.timing.summary gives it."""
    return {"median": median, "min": lo, "max": hi, "n": n, "values": [lo, median, hi]}


STEP = "static decode step, torch.compile: inductor, frozen weights, C++ wrapper"
RESULT = {
    "environment": {"device": "cpu", "dtype": "float32,bfloat16", "torch": "2.0", "threads": 2, "cpu_model": "Test CPU",
                    "linear_kernels": "oneDNN", "transformers": "5.0", "ctranslate2": "4.0"},
    "config": {"repeats": 3, "warmup": 1, "new_tokens": 4, "naive": True, "naive_max_context": 16,
               "contexts": [16, 32], "prefill": True, "quality_tokens": 512},
    "hardware": {"memory_bandwidth_bytes_per_s": 5.0e10, "matmul_flops_per_s": 1.25e11, "method": "a test"},
    "models": {
        "standard": {"rows": [
            {"context": 16, "batch": 1, "kv_cache_bytes": 65536, "prefill_ms": s(1.234, 1.1, 1.5),
             "decode_tok_s": s(812.3, 790.05, 830.0), "naive_decode_tok_s": s(300.0, 290.0, 310.0),
             "decode_fraction_of_limit": 0.123},
            {"context": 32, "batch": 1, "kv_cache_bytes": 131072, "prefill_ms": s(2.5, 2.25, 2.75),
             "decode_tok_s": s(700.0, 650.0, 720.0), "decode_fraction_of_limit": 0.1}]},
        "hybrid": {"rows": [
            {"context": 16, "batch": 1, "kv_cache_bytes": 32768, "prefill_ms": s(0.9, 0.8, 1.0),
             "decode_tok_s": s(1200.0, 1100.0, 1300.0), "naive_decode_tok_s": s(450.0, 440.0, 460.0),
             "decode_fraction_of_limit": 0.2}]},
        "standard+compile": {"compiled": True, "rows": [
            {"context": 16, "batch": 1, "kv_cache_bytes": 65536, "decode_tok_s": s(1500.0, 1400.0, 1600.0)}]},
    },
    "peers": {
        "peer": {"weights_of": "standard", "implementation": "transformers GPT2LMHeadModel",
                 "max_abs_logit_diff": 1.5e-6, "rows": [
                     {"context": 16, "batch": 1, "prefill_ms": s(3.0, 2.5, 3.5),
                      "decode_tok_s": s(400.0, 380.0, 420.0)}]},
        "ctranslate2": {"weights_of": "standard", "implementation": "CTranslate2 4.0 Generator (float32)",
                        "max_abs_logit_diff": 2.25e-5, "top1_agreement": 0.984375, "rows": [
                            {"context": 16, "batch": 1, "decode_tok_s": s(900.0, 880.0, 950.0)}]},
    },
    "ratios": {
        "hybrid/standard": [{"context": 16, "batch": 1, "prefill_speedup": 1.37, "prefill_speedup_ci95": [1.2, 1.5],
                             "decode_speedup": 1.48, "decode_speedup_ci95": None,
                             "naive_decode_speedup": 1.5, "naive_decode_speedup_ci95": [1.45, 1.55],
                             "kv_cache_ratio": 0.5, "predicted_decode_speedup": 1.31}],
        "standard/peer": [{"context": 16, "batch": 1, "decode_speedup": 2.03, "decode_speedup_ci95": [1.9, 2.2]}],
    },
    "order": {"seed": 7, "rounds": []},
    "weights": "random (GPT's initialisation, seed 0)",
    "compiled": {"standard+compile": {"step": STEP, "checks": [], "same_greedy_tokens": 1.0}},
    "quality": {"standard": {"bpb": 2.34567, "bpb_float32": 2.34567, "cost_bpb": 0.0},
                "standard@bfloat16": {"bpb": 2.35, "bpb_float32": 2.34567, "cost_bpb": 0.00433}},
}

# The least a table is made from: no peers, no order, no hardware, prefill and naive decode not measured.
BARE = {
    "environment": {"device": "cuda", "dtype": "bfloat16", "torch": "2.0", "threads": 8, "cpu_model": "Test CPU"},
    "config": {"repeats": 1, "warmup": 0, "new_tokens": 8, "naive": False, "contexts": [64], "prefill": False},
    "models": {"AAAA": {"rows": [{"context": 64, "batch": 8, "decode_tok_s": s(10000.0, 9000.0, 11000.0, 1)}]}},
    "ratios": {},
}

TRAIN = {"batch_size": 16, "tokens_per_sec": {"standard": s(12345.6, 12000.4, 13000.0),
                                               "hybrid": s(23456.0, 22000.0, 24000.0),
                                               "peer": s(9876.5, 9000.0, 10000.0)},
         "standard_vs_peer": 1.25}

HW = {"memory_bandwidth_bytes_per_s": 5.0e10, "matmul_flops_per_s": 1.25e11, "method": "given"}


TABLE = "\n".join([
    'device cpu, float32,bfloat16, 2 threads, torch 2.0, transformers 5.0, ctranslate2 4.0; CPU Test '
    'CPU; our linear layers: oneDNN',
    "weights: random (GPT's initialisation, seed 0)",
    '3 repeats after 1 warm-up, models in a new order each repeat (seed 7), 4 new tokens; medians '
    '[min-max]',
    'model                   context  batch  prefill ms        cached tok/s            of limit  '
    'naive tok/s          KV cache MB',
    '----------------------  -------  -----  ----------------  ----------------------  --------  '
    '-------------------  -----------',
    'standard                16       1      1.23 [1.10-1.50]  812.3 [790.0-830.0]     12%       '
    '300.0 [290.0-310.0]  0.06       ',
    'standard                32       1      2.50 [2.25-2.75]  700.0 [650.0-720.0]     10%       '
    'skipped              0.12       ',
    'hybrid                  16       1      0.90 [0.80-1.00]  1200.0 [1100.0-1300.0]  20%       '
    '450.0 [440.0-460.0]  0.03       ',
    'standard+compile        16       1      -                 1500.0 [1400.0-1600.0]  -         -'
    '                    0.06       ',
    'peer (standard)         16       1      3.00 [2.50-3.50]  400.0 [380.0-420.0]     -         -'
    '                    -          ',
    'ctranslate2 (standard)  16       1      -                 900.0 [880.0-950.0]     -         -'
    '                    -          ',
    'naive decode skipped above context 16 (--naive-max-context): each of its steps re-runs the whole'
    ' sequence',
    '',
    'speedup hybrid/standard (>1: the first is faster; geometric mean of the paired per-repeat ratios'
    ' [95% CI])',
    '  context 16, batch 1: prefill 1.37x [1.20, 1.50], decode 1.48x, naive_decode 1.50x [1.45, '
    '1.55], predicted_decode 1.31x',
    '',
    'speedup standard/peer (>1: the first is faster; geometric mean of the paired per-repeat ratios '
    '[95% CI])',
    '  context 16, batch 1: decode 2.03x [1.90, 2.20]',
    'peer (transformers GPT2LMHeadModel) logits match: max |difference| 1.50e-06',
    'ctranslate2 (CTranslate2 4.0 Generator (float32)) logits match: max |difference| 2.25e-05, same '
    'greedy token at 98.4% of positions',
    'standard+compile (static decode step, torch.compile: inductor, frozen weights, C++ wrapper): the'
    " eager path's greedy token at 100% of steps (the lowest over the sizes measured)",
    'quality standard: 2.3457 bits per byte on 512 validation tokens (+0.0000 vs float32)',
    'quality standard@bfloat16: 2.3500 bits per byte on 512 validation tokens (+0.0043 vs float32)',
    "hardware limit ('of limit' column): 50.0 GB/s memory bandwidth, 125.0 GFLOP/s matmul (a test); a"
    " step's limit is the larger of reading weights + KV cache and its arithmetic. Small models that "
    "fit in the CPU's caches can exceed a DRAM-bandwidth limit.",
])

BARE_TABLE = "\n".join([
    'device cuda, bfloat16, 8 threads, torch 2.0',
    '1 repeats after 0 warm-up, 8 new tokens; medians [min-max]',
    'model  context  batch  prefill ms  cached tok/s              of limit  naive tok/s  KV cache MB',
    '-----  -------  -----  ----------  ------------------------  --------  -----------  -----------',
    'AAAA   64       8      -           10000.0 [9000.0-11000.0]  -         -            -          ',
    'prefill not timed (--no-prefill): each decoder was primed once per context and batch',
])

TRAIN_TABLE = "\n".join([
    "training throughput: one optimizer step (forward, backward, AdamW), batch 16 x the model's "
    'context; tokens/s, medians [min-max]',
    '  standard         12,346 [12,000-13,000]',
    '  hybrid           23,456 [22,000-24,000]',
    '  peer             9,876 [9,000-10,000]',
    '  standard / peer: 1.25x',
])

COSTS_TABLE = "\n".join([
    'hardware: memory bandwidth 50.0 GB/s, matmul 125.0 GFLOP/s (given)',
    "float32 weights and KV cache; a step's time is the larger of its bytes / bandwidth and its FLOPs"
    ' / matmul rate; per token = per step / tokens the step computes',
    '  AA: gpt2, context 64, 43,904 parameters, KV cache 512 bytes per token',
    '  AM: gpt2, context 64, 40,232 parameters, KV cache 256 bytes per token',
    '',
    'decode: one new token per row, `context` tokens cached',
    'model  context  batch  MFLOP/tok  MB/tok  KV share  step ms  tok/s    bound   dominant component',
    '-----  -------  -----  ---------  ------  --------  -------  -------  ------  ------------------',
    'AA     16       1      0.09       0.176   5%        0.004    283,678  memory  ffn_weights (38%)',
    'AA     64       1      0.10       0.201   17%       0.004    248,964  memory  ffn_weights (32%)',
    'AM     16       1      0.08       0.157   3%        0.003    318,034  memory  ffn_weights (42%)',
    'AM     64       1      0.08       0.170   10%       0.003    294,978  memory  ffn_weights (39%)',
    '',
    "prefill: a `context`-token prompt per row, last position's logits",
    'model  context  batch  MFLOP/tok  MB/tok  KV share  step ms  tok/s      bound    dominant '
    'component',
    '-----  -------  -----  ---------  ------  --------  -------  ---------  -------  '
    '------------------',
    'AA     16       1      0.05       0.012   9%        0.007    2,341,876  compute  ffn_weights '
    '(51%)',
    'AA     64       1      0.06       0.004   27%       0.030    2,155,767  compute  ffn_weights '
    '(52%)',
    'AM     16       1      0.05       0.010   5%        0.006    2,770,390  compute  ffn_weights '
    '(59%)',
    'AM     64       1      0.05       0.003   17%       0.024    2,679,184  compute  ffn_weights '
    '(65%)',
    '',
    'predicted speedup AM/AA (> 1: AM faster); first context reaching each target up to 64; Amdahl '
    'bound = the limit as context -> infinity',
    '  decode, batch 1: 16: 1.12x, 64: 1.18x; reaches 1.25x never, 1.5x never; bound 2.00x',
    '  prefill, batch 1: 16: 1.18x, 64: 1.24x; reaches 1.25x never, 1.5x never; bound 2.00x',
])

# What an int8 table says differently: its precision line.
INT8_LINE = ("int8 linear weights (a float32 scale per row), float32 tables, norms and KV cache; a step's time is "
             "the larger of its bytes / bandwidth and its FLOPs / matmul rate; per token = per step / tokens the "
             "step computes")


def test_the_bench_table_of_a_full_result_is_pinned():
    assert format_table(RESULT) == TABLE


def test_the_bench_table_of_a_bare_result_is_pinned():
    assert format_table(BARE) == BARE_TABLE


def test_the_training_table_is_pinned():
    assert format_train_table(TRAIN) == TRAIN_TABLE


def _config(layers: str) -> GPTConfig:
    return GPTConfig(vocab_size=512, block_size=64, n_embd=32, n_head=2, layers=layers)


def test_the_costs_table_is_pinned():
    table = costs_table({p: _config(p) for p in ("AA", "AM")}, [16, 64], [1], "float32", HW)
    assert format_costs(table) == COSTS_TABLE
    int8 = format_costs(costs_table({"AN": _config("AN")}, [8], [2], "int8", HW, phases=["prefill"]))
    assert int8.splitlines()[1] == INT8_LINE


def test_the_sentence_of_random_weights_is_pinned():
    shape = {"preset": "cpu", "layers": ["AAAA", "AAMM"], "block_size": 8192, "seed": 3}
    assert random_weights(shape) == ("random (GPT's initialisation, seed 3; the cpu shape at context 8,192, layers "
                                     "AAAA,AAMM): speed does not depend on what weights learned")
