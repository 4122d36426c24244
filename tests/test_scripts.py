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
