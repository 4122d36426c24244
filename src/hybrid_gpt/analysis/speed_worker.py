"""One speed run of a replacement study, in a process of its own: ``python -m hybrid_gpt.analysis.speed_worker
REQUEST.json RESULT.json``.

The study runs this several times so that its speed figures include the variance between processes (memory
layout, thread placement, the machine's state), which repeats inside one process do not see. Each run loads
the full model, builds every shape from its weights (retrofit.measure_speed: bench's paired, interleaved
estimator; speed depends on the shape, not on what the weights learned) and writes, per shape, the decode and
prefill ratios against the full model with their within-run intervals and the cost model's prediction.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import read_json, write_json


def measure(request: dict) -> dict:
    from hybrid_gpt.analysis.retrofit import FULL, RetrofitConfig, measure_speed
    from hybrid_gpt.checkpoint import load_checkpoint
    from hybrid_gpt.runtime import resolve_device

    model, _, _ = load_checkpoint(request["checkpoint"], resolve_device(request.get("device", "auto")))
    cfg = RetrofitConfig(speed_contexts=list(request["contexts"]), decode_tokens=int(request["decode_tokens"]),
                         batch_sizes=[1], speed_repeats=int(request["repeats"]), seed=int(request["seed"]),
                         dtypes=["float32"])
    speed = measure_speed(model, dict(request["shapes"]), cfg, int(request["mlp_hidden"]))
    shapes = {}
    for name, shape in speed["shapes"].items():
        for row in shape["rows"]:
            shapes[name if len(request["contexts"]) == 1 else f"{name}@{row['context']}"] = {
                "context": row["context"], "decode": row["decode"], "prefill": row["prefill"],
                "decode_tok_s": row["decode_tok_s"], "prefill_ms": row["prefill_ms"],
                "predicted": row["predicted_decode"], "predicted_prefill": row["predicted_prefill"],
                "kv_cache_bytes": row["kv_cache_bytes"], "layers": shape["layers"]}
    shapes.pop(FULL, None)
    full_rows = speed["shapes"][FULL]["rows"]
    return {"shapes": shapes, "full": {"decode_tok_s": [r["decode_tok_s"] for r in full_rows],
                                       "prefill_ms": [r["prefill_ms"] for r in full_rows]},
            "hardware": speed["hardware"], "environment": speed["environment"], "elapsed_s": speed["elapsed_s"]}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m hybrid_gpt.analysis.speed_worker REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    try:
        write_json(Path(argv[1]), measure(read_json(Path(argv[0]), "a speed run's request")))
    except HybridGPTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
