import math

from hybrid_gpt.analysis.longcontext import measured_crossing, pair_names, series, summarize
from hybrid_gpt.present.longcontext import plot_speed_context, render_markdown


def _bench(points: dict) -> dict:
    """A bench result of AAAA and AAMM with {context: (ratio, [lo, hi])} at batch 1, and a flat batch-8 row."""
    rows = []
    for c, (r, ci) in points.items():
        rows += [{"context": c, "batch": 1, "decode_speedup": r, "decode_speedup_ci95": ci},
                 {"context": c, "batch": 8, "decode_speedup": 1.1, "decode_speedup_ci95": [1.0, 1.2]}]
    return {"weights": "random", "models": {"standard": {"layers": "AAAA"}, "AAMM": {"layers": "AAMM"},
                                            "AAMM@bfloat16": {"layers": "AAMM", "dtype": "bfloat16"}},
            "ratios": {"AAMM/standard": rows}}


def test_measured_crossings_interpolate_in_log_context_and_need_the_whole_interval():
    b = _bench({256: (1.0, [0.9, 1.1]), 1024: (1.2, [1.1, 1.3]), 4096: (1.6, [1.3, 1.8]),
                16384: (2.0, [1.8, 2.2])})
    assert pair_names(b) == ("AAMM", "standard")
    pts = series(b, 1)
    assert [p["context"] for p in pts] == [256, 1024, 4096, 16384]
    c = measured_crossing(pts, 1.25)
    # 1.25 is 1/8 of the way from 1.2 to 1.6: 2^(10 + 2/8) tokens
    assert c["estimate"] == round(2 ** 10.25) and c["clears_from"] == 4096
    c = measured_crossing(pts, 1.5)
    assert c["estimate"] == round(math.exp(math.log(1024) + 0.75 * math.log(4)))
    assert c["clears_from"] == 16384  # 4096's interval reaches down to 1.3
    assert measured_crossing(pts, 3.0) == {"estimate": None, "clears_from": None}
    assert measured_crossing(pts, 0.5) == {"estimate": 256, "clears_from": 256}
    # a dip at the longest context: the interval does not clear from anywhere
    dip = series(_bench({256: (1.6, [1.55, 1.7]), 1024: (1.4, [1.2, 1.6])}), 1)
    assert measured_crossing(dip, 1.5)["clears_from"] is None


def test_summary_plot_and_table_without_configs(tmp_path):
    b = _bench({256: (1.0, [0.9, 1.1]), 4096: (1.6, [1.5, 1.7])})
    s = summarize(b)
    assert set(s["batches"]) == {"1", "8"} and s["batches"]["1"]["prediction"] == []
    assert s["batches"]["1"]["crossings"]["1.25"]["clears_from"] == 4096
    name = plot_speed_context({"cpu": s}, tmp_path / "speed.png")
    assert (tmp_path / name).stat().st_size > 1000
    md = render_markdown({"cpu": s}, name)
    assert "| 4,096 | 1.60x [1.50, 1.70] | - |" in md and "reaches 1.25x" in md


def test_prediction_from_the_models_configs(tmp_path):
    from dataclasses import asdict, replace

    from hybrid_gpt.model.gpt import GPTConfig

    b = _bench({256: (1.0, [0.9, 1.1]), 4096: (1.6, [1.5, 1.7])})
    for name, layers in (("standard", "AAAA"), ("AAMM", "AAMM")):
        b["models"][name]["config"] = asdict(GPTConfig(vocab_size=4096, block_size=4096, n_embd=128, n_head=4,
                                                        layers=layers))
    b["hardware"] = {"memory_bandwidth_bytes_per_s": 50e9, "matmul_flops_per_s": 200e9}
    grid = summarize(b)["batches"]["1"]["prediction"]
    assert grid[0]["context"] == 64 and grid[-1]["context"] == 4 * 4096
    ratios = [p["predicted"] for p in grid]
    assert all(1.0 <= r for r in ratios) and ratios[-1] > ratios[0]  # the gain grows with the context
    # the predicted crossing is the cost model's, exact to the token, and the grid agrees with it
    from hybrid_gpt.infer.costs import first_context_reaching

    crossing = summarize(b)["batches"]["1"]["crossings"]["1.25"]["predicted"]
    standard, hybrid = (GPTConfig(**b["models"][n]["config"]) for n in ("standard", "AAMM"))
    standard, hybrid = (replace(c, block_size=4 * 4096) for c in (standard, hybrid))
    assert crossing == first_context_reaching(standard, hybrid, 1.25, limit=4 * 4096, batch=1,
                                              hardware=b["hardware"])
    assert all(p["predicted"] < 1.25 for p in grid if p["context"] < crossing)
    assert all(p["predicted"] >= 1.25 for p in grid if p["context"] >= crossing)
