"""Shared test helpers (fixtures live in conftest.py): tiny models of the smoke preset's width and small data files."""

import torch

from hybrid_gpt.model.gpt import GPT, GPTConfig
from hybrid_gpt.presets import get_preset

SMOKE = get_preset("smoke")


def smoke_config(layers: str = "AAMM", vocab_size: int = 97, **kw) -> GPTConfig:
    """A model of the smoke preset's width, with any layer pattern."""
    base = dict(vocab_size=vocab_size, block_size=SMOKE["block_size"], n_embd=SMOKE["n_embd"],
                n_head=SMOKE["n_head"], layers=layers)
    base.update(kw)
    return GPTConfig(**base)


# GPTConfig.llama's family fields, for tiny Llama-family models: smoke_model("AM", **LLAMA).
LLAMA = dict(norm="rmsnorm", positions="rope", ffn="swiglu", bias=False)


def smoke_model(layers: str = "AAMM", seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    model = GPT(smoke_config(layers, **kw))
    # Random non-zero biases and LayerNorm parameters, so that no test passes by a zero-initialised accident.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(mean=1.0 if "ln" in name and name.endswith("weight") else 0.0, std=0.1)
    return model.eval()


def write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_chat_files(tmp_path):
    """Small SFT and DPO JSONL files in the ecosystem's formats (fast to train on)."""
    lines = ["But soft, what light through yonder window breaks?", "It is the east, and Juliet is the sun.",
             "Good night, good night! Parting is such sweet sorrow.", "What's in a name?", "Ay me!",
             "O Romeo, Romeo! wherefore art thou Romeo?", "Wilt thou be gone? It is not yet near day."]
    sft = [{"messages": [{"role": "user", "content": lines[i % 7]},
                         {"role": "assistant", "content": lines[(i + 1) % 7]}]} for i in range(24)]
    dpo = [{"prompt": lines[i % 7], "chosen": lines[(i + 1) % 7], "rejected": "Fish and chips, " * (1 + i % 3)}
           for i in range(24)]
    return write_jsonl(tmp_path / "sft.jsonl", sft), write_jsonl(tmp_path / "dpo.jsonl", dpo)


def run_bad(argv, capsys):
    """Exit status and stderr of one CLI call; argparse's own errors arrive as SystemExit."""
    from hybrid_gpt.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


SERVE_CONTEXT = 128  # the served test models' context (tests/infer/conftest.py): room for a long stream


def slowed(model, delay: float):
    """``model`` whose every forward pass first sleeps ``delay`` seconds: tokens that arrive one by one, as a larger
    model's would (a served stream long enough to leave mid-way, figures that are not all transport)."""
    import time

    forward = model.forward

    def slow(*args, **kwargs):
        time.sleep(delay)
        return forward(*args, **kwargs)

    model.forward = slow
    return model


def rerun_tests(files: list[str], env: dict[str, str], still_true: str, timeout: int = 600) -> None:
    """Run the test ``files`` again in a fresh process with ``env`` added to the environment (a fallback path
    switched on at start-up), failing unless they pass there and the Python expression ``still_true`` (it may use
    ``compat`` and ``kernels``) holds afterwards: that the process really took the path asked for."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = ("import sys, pytest; from hybrid_gpt import compat; from hybrid_gpt.model import kernels; "
              f"rc = pytest.main(['-q', '-x', '-p', 'no:cacheprovider', '-n', '0', *{files!r}]); "
              f"sys.exit(rc or (0 if ({still_true}) else 3))")
    run = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
