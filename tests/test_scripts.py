"""The shell scripts under scripts/ that a GPU session runs: a CPU dry run at smoke sizes, so that a session with
a device spends none of its minutes on a script that breaks."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_study_dry_run_on_cpu(smoke_run, tmp_path):
    run, out = tmp_path / "run", tmp_path / "out"
    shutil.copytree(smoke_run / "data", run / "data")  # the smoke data, prepared once for the whole suite
    env = os.environ | {"DRY_RUN": "1", "OUT": str(out), "RUN": str(run), "HG": f"{sys.executable} -m hybrid_gpt",
                        # the pipeline step is the smoke pipeline that tests/test_pipeline.py runs
                        "STEPS": "ablate bench-long costs verdict"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_study.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [line.split(":")[0] for line in (out / "times.txt").read_text().splitlines()]
    assert steps == ["ablate", "bench-long", "costs", "verdict"]
    costs = json.loads((out / "costs.json").read_text())
    assert costs["contexts"] == [32, 64] and costs["hardware"]["memory_bandwidth_bytes_per_s"] > 0
    bench = json.loads((out / "run" / "speed" / "smoke.json").read_text())
    assert bench["weights"].startswith("random") and set(bench["models"]) == {"AAAA", "AAMM"}
    verdict = json.loads((out / "run" / "hypothesis.json").read_text())
    ctx = verdict["per_context"]
    assert [r["context"] for r in ctx["rows"]] == [32, 64]
    # the ablation's trained models at their own context pair with its quality; the benchmark's random weights never
    assert all((r["weights"] == "trained") == (r["quality_context"] is not None) for r in ctx["rows"])
    assert ctx["answer"]["state"] in ("holds", "does not hold", "cannot be told")
    assert (out / "run" / "speed-context.png").is_file() and (out / "run" / "ablate-quick" / "ablate.md").is_file()
    assert "Decode speed against context" in (out / "run" / "hypothesis.md").read_text()


def test_depth_testbed_dry_run_on_cpu(smoke_run, tmp_path):
    """The testbed script at smoke sizes: the validation step's ablation with its AA - AAAA gap, then the
    comparison only if that gap was clear of the tolerance (and a sentence saying why not otherwise)."""
    run, out = tmp_path / "run", tmp_path / "out"
    shutil.copytree(smoke_run / "data", run / "data")
    env = os.environ | {"PRESET": "smoke", "SEEDS": "1,2", "STEPS_PER_RUN": "4", "OUT": str(out), "RUN": str(run),
                        "HG": f"{sys.executable} -m hybrid_gpt"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "depth_testbed.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    validate = json.loads((out / "validate" / "ablate.json").read_text())
    assert [v["spec"] for v in validate["variants"]] == ["AAAA", "AA"] and validate["seeds"] == [1, 2]
    (gap,) = [g for g in validate["gaps"] if (g["other"], g["base"]) == ("AA", "AAAA")]
    assert gap["points"] and all(p["tokens"] == p["step"] * 8 * 32 for p in gap["points"])  # smoke: 8 rows x 32
    assert "Differences against the training budget" in (out / "validate" / "ablate.md").read_text()
    (line,) = [p for p in validate["power"] if (p["other"], p["base"]) == ("AA", "AAAA")]
    clear = line["difference"]["ci95"][0] > line["tolerance"]
    assert (out / "compare" / "ablate.json").is_file() == clear
    assert clear or "cannot see depth" in proc.stdout
    assert "hybrid-gpt ablate --preset smoke" in (out / "validate" / "times.txt").read_text()
