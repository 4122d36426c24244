"""Where one cached decode step's time goes: torch.profiler over eager steps and over the static step compiled
(inductor, frozen weights; its Python wrapper here, so that each kernel it calls shows), on a preset's shape
with random weights, batch 1, at the end of the context. Prints the step's time and each operator group's
share. Speed does not depend on what the weights learned; the absolute times move with the machine's load,
the shares much less.

    uv run python scripts/profile_decode.py --shape seed --threads 2
"""

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from hybrid_gpt.infer.engine import KVCache, StaticKVCache
from hybrid_gpt.infer.entries import quantize_int8, shape_models

GROUPS = {"linear layers": ("linear", "addmm", "aten::mm", "quantized::"),
          "attention": ("scaled_dot_product", "bmm", "softmax"),
          "compiled kernels (fused elementwise)": ("CompiledFxGraph",),
          "dispatch and Python around the graph": ("Dynamo", "Torch-Compiled Region", "Pregraph", "AOTDispatcher")}


def group_of(name: str) -> str:
    return next((g for g, keys in GROUPS.items() if any(k in name for k in keys)), "other operators and Python")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="seed")
    ap.add_argument("--layers", default="AAAA")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--int8", action="store_true", help="bench's int8 model (kernels.Int8Linear)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = next(iter(shape_models(args.shape, [args.layers]).values())).eval()
    if args.int8:
        model = quantize_int8(model)
    T = model.config.block_size
    tok = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        eager_cache = KVCache(model, 1, max_len=T)
        static = StaticKVCache(model, 1, max_len=T)
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        with torch._inductor.config.patch(freezing=True):  # engine.compile_step's, but the Python wrapper
            static.pos = T - 8
            static.step(compiled, tok)

        def eager():
            eager_cache.pos = T - 8
            model(tok, kv_cache=eager_cache, last_only=True)

        def fused():
            static.pos = T - 8
            static.step(compiled, tok)

        print(f"{args.shape} shape, {args.layers}{', int8' if args.int8 else ''}, context {T}, batch 1, "
              f"{args.threads} threads")
        for label, fn in (("eager", eager), ("static, compiled", fused)):
            for _ in range(20):
                fn()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            step_us = (time.perf_counter() - t0) / args.steps * 1e6
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.steps):
                    fn()
            shares = defaultdict(float)
            for e in prof.key_averages():
                shares[group_of(e.key)] += e.self_cpu_time_total
            total = sum(shares.values())
            print(f"  {label}: {step_us:.0f} us a step ({1e6 / step_us:.0f} tok/s) unprofiled")
            for g, t in sorted(shares.items(), key=lambda kv: -kv[1]):
                print(f"    {100 * t / total:5.1f}%  {g}")


if __name__ == "__main__":
    main()
