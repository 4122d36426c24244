"""Regenerate docs/results/smollm2/replace/{replace.json,replace.md,plots} from the study's committed state.json
and the committed staticness map (static.json), with no model and no measurement: for when the map grows (its
R^2 columns and sentence are part of the study's page). tests/present/test_committed_pages.py checks the result.

Usage: uv run python scripts/refresh_replace_pages.py [RESULTS_DIR]   (default docs/results/smollm2)"""

import json
import sys
from pathlib import Path

from hybrid_gpt.analysis.replace import summarise
from hybrid_gpt.analysis.replace_config import ReplaceConfig
from hybrid_gpt.present.replace import write_outputs
from hybrid_gpt.present.static import map_sentence

root = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/smollm2")
committed = json.loads((root / "replace" / "replace.json").read_text())
state = json.loads((root / "replace" / "state.json").read_text())
static = json.loads((root / "static" / "static.json").read_text())
cfg = ReplaceConfig(**{k: v for k, v in state["options"].items() if k in ReplaceConfig.__dataclass_fields__})
sentence = map_sentence(static)
result = summarise(state, cfg, committed["windows"], committed["complete"]) | {
    "map_sentence": sentence, "map_r2": {str(r["layer"]): r["r2"] for r in static["layers"]},
    "out_dir": committed["out_dir"]}
print("wrote", ", ".join(write_outputs(result, root / "replace", sentence)), "and replace.json, replace.md")
