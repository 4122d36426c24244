"""The presentation layer is light: every present module imports without torch or numpy (so that a page can be
rendered again from its JSON anywhere), and it imports nothing that measures (test_imports.py checks the ranks)."""

import json
import pathlib
import subprocess
import sys

import hybrid_gpt

PRESENT = sorted(p.stem for p in (pathlib.Path(hybrid_gpt.__file__).parent / "present").glob("*.py")
                 if p.stem != "__init__")


def test_every_present_module_imports_without_torch_or_numpy():
    assert {"tables", "numbers", "plots", "static", "replace", "retrofit", "distill", "probe", "importance",
            "longcontext"} <= set(PRESENT)
    code = ("import importlib, json, sys\n"
            f"for name in {PRESENT!r}:\n"
            "    importlib.import_module('hybrid_gpt.present.' + name)\n"
            "print(json.dumps([m for m in ('torch', 'numpy') if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
