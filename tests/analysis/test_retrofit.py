"""The retrofit study on a tiny random Llama-family model: the layer choices, healing, the arms' weights and
checkpoints, the written results, and the command's one-line errors."""

import json
import shlex

import pytest
import torch
import torch.nn.functional as F
from helpers import LLAMA, run_bad, smoke_model, write_jsonl

from hybrid_gpt.analysis import retrofit
from hybrid_gpt.analysis.distill import finetune, transplant
from hybrid_gpt.analysis.importance import attention_layers, attention_stats
from hybrid_gpt.analysis.retrofit import (
    RetrofitConfig,
    bpb_difference,
    choose_layers,
    command_line,
    plan_arms,
    run_retrofit,
    window_bpb,
)
from hybrid_gpt.analysis.retrofit_config import DEFAULTS
from hybrid_gpt.checkpoint import load_checkpoint, save_checkpoint
from hybrid_gpt.cli import build_parser, main
from hybrid_gpt.data.tokens import TokenData
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.options import values
from hybrid_gpt.present.retrofit import render_retrofit_markdown
from hybrid_gpt.train.evaluate import evaluate_lm, windows

PATTERN = "AAAAAA"
BLOCK = 256


def tiny_llama(vocab_size: int, seed: int = 0):
    """Six attention blocks of the Llama family with grouped-query attention, as SmolLM2's; the final norm's gain
    and the attention outputs are large, so that its next-token distributions are far from uniform and depend on
    its attention, as a trained model's do."""
    model = smoke_model(PATTERN, seed=seed, vocab_size=vocab_size, block_size=BLOCK, n_kv_head=1, **LLAMA)
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(20)
        for block in model.transformer.h:
            block.mixer.c_proj.weight.mul_(10)
    return model


@pytest.fixture(scope="module")
def teacher(smoke_run, tmp_path_factory):
    """A run directory holding the tiny model as an imported checkpoint (base/), its data and held-out chats."""
    run = tmp_path_factory.mktemp("retrofit-run")
    data = TokenData.open(smoke_run / "data")
    save_checkpoint(run / "base", tiny_llama(data.tokenizer.vocab_size), data.tokenizer,
                    {"stage": "import", "data_dir": str(smoke_run / "data")})
    lines = ["What light through yonder window breaks?", "It is the east.", "Parting is such sweet sorrow.",
             "What's in a name?", "Wilt thou be gone?"]
    (run / "chat").mkdir()
    write_jsonl(run / "chat" / "sft_val.jsonl", [{"messages": [{"role": "user", "content": lines[i % 5]},
                                                               {"role": "assistant", "content": lines[(i + 2) % 5]}]}
                                                 for i in range(12)])
    return run / "base"


# -- the parts ---------------------------------------------------------------------------------------------------

def test_the_modes_fill_only_what_was_not_given():
    quick, full = RetrofitConfig(quick=True).resolved(), RetrofitConfig().resolved()
    assert quick.ks == [0, 8, 16] and full.ks == [0, 4, 8, 12, 16, 20]
    assert (quick.passkey_contexts, full.passkey_contexts) == ([1024, 2048], [1024, 2048, 4096, 8192])
    assert all(getattr(quick, k) == v for k, v in DEFAULTS["quick"].items())
    assert RetrofitConfig(quick=True, heal_steps=3).resolved().heal_steps == 3


def test_layer_choices_on_a_constructed_case(smoke_run):
    """Blocks 2 and 4 (0-based 1 and 3) have attention whose output is zero: the residual stream passes them
    unturned (cosine exactly 1), so they are the least important; the deepest are the last ones."""
    data = TokenData.open(smoke_run / "data")
    model = tiny_llama(data.tokenizer.vocab_size)
    with torch.no_grad():
        for i in (1, 3):
            model.transformer.h[i].mixer.c_proj.weight.zero_()
    similarity = attention_stats(model, data.train, 256, context=64)[0]
    assert similarity[1] == pytest.approx(1.0) and similarity[3] == pytest.approx(1.0)
    assert max(s for i, s in enumerate(similarity) if i not in (1, 3)) < 1 - 1e-4
    attention = attention_layers(model)
    assert choose_layers("importance", 2, attention, similarity) == [1, 3]
    assert choose_layers("importance", 1, [0, 1, 2], [0.5, 0.9, 0.9]) == [1]  # a tie goes to the earlier layer
    assert choose_layers("importance", 2, [0, 2, 3], [0.9, None, 0.5, 0.7]) == [0, 3]  # attention layers only
    assert choose_layers("deepest", 2, attention, similarity) == [4, 5]
    assert choose_layers("deepest", 0, attention, similarity) == []
    arms = plan_arms(RetrofitConfig(ks=[0, 2], treatments=["drop", "heal"]).resolved(), attention, similarity)
    assert [(a.name, a.layers, a.pattern(PATTERN)) for a in arms] == [
        ("full", [], PATTERN), ("deepest-k2-drop", [4, 5], "AAAANN"), ("deepest-k2-drop-heal", [4, 5], "AAAANN"),
        ("importance-k2-drop", [1, 3], "ANANAA"), ("importance-k2-drop-heal", [1, 3], "ANANAA")]


def test_bits_per_byte_by_window_are_evaluate_lms_and_pair_by_window(smoke_run):
    data = TokenData.open(smoke_run / "data")
    full = tiny_llama(data.tokenizer.vocab_size)
    lengths = data.tokenizer.token_byte_lengths()
    ev = window_bpb(full, data.val, lengths, 300, 64)  # 4 whole windows of 64 fit in 300 tokens
    assert ev["windows"] == 4 and ev["tokens"] == 256
    assert ev["bpb"] == pytest.approx(evaluate_lm(full, data.val, lengths, 256, context=64)["bpb"], rel=1e-5)
    arm = window_bpb(transplant(full, "AAAANN"), data.val, lengths, 300, 64)
    d = bpb_difference(arm, ev)
    assert d["n"] == 4 and d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    assert d["values"] == pytest.approx([(a - f) / b for a, f, b in zip(arm["window_bits"], ev["window_bits"],
                                                                         ev["window_bytes"])])
    with pytest.raises(HybridGPTError, match="not one window of 1,024"):
        window_bpb(full, data.val[:1000], lengths, 4096, 1024)


def _kl(teacher, model, tokens) -> float:
    """Mean per-token KL(teacher || model) over held-out windows."""
    total = n = 0
    with torch.no_grad():
        for chunk in windows(tokens, 32, 512):
            x = chunk[:, :-1]
            t, m = F.log_softmax(teacher(x), -1), F.log_softmax(model(x), -1)
            total += (t.exp() * (t - m)).sum().item()
            n += x.numel()
    return total / n


def test_healing_lowers_the_kl_to_the_teacher(smoke_run):
    data = TokenData.open(smoke_run / "data")
    teacher = tiny_llama(data.tokenizer.vocab_size)
    arm = transplant(teacher, "AAANNN")
    before = _kl(teacher, arm, data.val)
    losses = finetune(arm, data, steps=15, lr=1e-3, batch_size=4, seed=0, progress=False, teacher=teacher,
                      context=32)
    after = _kl(teacher, arm, data.val)
    assert before > 0 and after < 0.7 * before, (before, after)
    assert len(losses) == 15 and min(losses[-3:]) < losses[0]


# -- the study, end to end ----------------------------------------------------------------------------------------

SMALL = dict(quick=True, ks=[0, 2, 4], distil_steps=30, heal_steps=4, rows=4, tokens_per_row=32, mse_tokens=512,
             similarity_tokens=512, eval_context=64, eval_tokens=256, agreement_tokens=256,
             passkey_contexts=[160, 256], passkey_trials=2, answer_ks=[2], answer_tokens=6, speed_contexts=[32, 64],
             batch_sizes=[1], dtypes=["float32"], speed_repeats=2, decode_tokens=4, device="cpu")


def _replaced(name: str, blocks: list[int]) -> bool:
    return any(name.startswith((f"transformer.h.{b - 1}.ln_1", f"transformer.h.{b - 1}.mixer")) for b in blocks)


def test_the_study_end_to_end(teacher, tmp_path, monkeypatch, capsys):
    seen = []

    def spy(model, tokens, *args, **kw):
        seen.append(len(tokens))
        return attention_stats(model, tokens, *args, **kw)

    monkeypatch.setattr(retrofit, "attention_stats", spy)
    out = tmp_path / "retrofit"
    result = run_retrofit(teacher, RetrofitConfig(out_dir=out, **SMALL), progress=False)
    split = json.loads((teacher / "config.json").read_text())["training"]["data_dir"]
    assert seen == [len(TokenData.open(split).train)]  # the choice reads the training split, not the held-out one

    # The files: parseable JSON of every figure, the markdown from it alone, a Pareto plot per speed context.
    saved = json.loads((out / "retrofit.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert (out / "retrofit.md").read_text() == render_retrofit_markdown(saved)
    assert f"`{saved['command']}`" in (out / "retrofit.md").read_text()
    assert saved["command"].startswith(f"hybrid-gpt retrofit {teacher} --quick ") and " --ks 0,2,4 " in saved["command"]
    for c in (32, 64):
        assert (out / f"retrofit-pareto-{c}.png").stat().st_size > 0
    arms = saved["arms"]
    kinds = ("drop", "distil", "drop-heal", "distil-heal")
    assert set(arms) == {"full"} | {f"{c}-k{k}-{t}" for c in ("deepest", "importance") for k in (2, 4) for t in kinds}

    # Distillation ran once, on the union of the distil arms' layers, and lowered every layer's held-out MSE.
    d = saved["distillation"]
    union = sorted({b for a in arms.values() if a["kind"].startswith("distil") for b in a["replaced"]})
    assert d["blocks"] == union and d["teacher_forwards"] == 30
    assert all(r["mse_after"] < r["mse_before"] for r in d["layers"]), d["layers"]

    # Weights: un-healed arms keep every tensor of the teacher outside their replaced blocks, bit for bit; every
    # distil arm holds the same students for a block; healing changes the model.
    theirs = load_checkpoint(teacher)[0].state_dict()
    students = {}
    for name, a in arms.items():
        if name == "full" or a.get("same_as"):
            continue
        model = load_checkpoint(a["checkpoint"])[0]
        assert model.config.layers == a["layers"]
        state = model.state_dict()
        kept = {k: v for k, v in state.items() if not _replaced(k, a["replaced"])}
        same = all(torch.equal(v, theirs[k]) for k, v in kept.items())
        assert same == (a["kind"] in ("drop", "distil")), name
        if a["kind"] == "distil":
            for k, v in state.items():
                if _replaced(k, a["replaced"]):
                    block = int(k.split(".")[2])
                    assert torch.equal(students.setdefault((block, k), v), v), (name, k)

    # Compute: the same healing budget for both healed arms (the fair control), the distillation shared.
    per_step = 4 * 32
    for c in ("deepest", "importance"):
        for k in (2, 4):
            a = {t: arms[f"{c}-k{k}-{t}"]["compute"] for t in kinds}
            assert a["drop"]["tokens"] == 0 and a["drop"]["teacher_forwards"] == 0
            assert a["distil"]["tokens"] == 30 * per_step and a["distil"]["teacher_forwards"] == 30
            assert a["drop-heal"]["tokens"] == a["distil-heal"]["tokens"] - a["distil"]["tokens"] == 4 * per_step
            assert a["distil"]["phases"][0]["share"] == k / len(union)

    # Quality, passkey, answers and speed for every arm; the verdict's groups and one answer.
    full = arms["full"]
    assert full["agreement"]["top1_agreement"] == 1.0 and full["agreement"]["kl"] == pytest.approx(0, abs=1e-6)
    assert full["delta_bpb"]["mean"] == 0 and len(full["eval"]["window_bits"]) == 4
    for name, a in arms.items():
        assert [p["context"] for p in a["passkey"]] == [160, 256] and all(p["n"] == 2 for p in a["passkey"])
        assert [s["context"] for s in a["speed"]] == [32, 64] and all(s["ratio"] > 0 for s in a["speed"])
        assert ("answers" in a) == (a["k"] in (0, 2)), name
        assert a["delta_bpb"]["ci95"] is not None or name == "full"
    assert set(saved["speed"]["shapes"]) == {"full", "k2-M", "k2-N", "k4-M", "k4-N"}
    assert saved["speed"]["shapes"]["k4-N"]["layers"] == "AANNNN"
    assert saved["speed"]["shapes"]["k4-N"]["rows"][0]["kv_cache_bytes"] < saved["speed"]["shapes"]["full"]["rows"][
        0]["kv_cache_bytes"]
    v = saved["verdict"]
    assert len(v["groups"]) == 8 and v["answer"] and all(g["text"] for g in v["groups"])
    assert {s["quality"] for g in v["groups"] for s in g["states"]} <= {"holds", "does not hold", "cannot be told"}

    # Each arm's checkpoint chats: one reply through the chat command's one-shot path.
    for name in ("deepest-k2-distil-heal", "importance-k4-drop"):
        path = arms[name].get("checkpoint")
        assert main(["chat", path, "--prompt", "Who goes there?", "--max-new-tokens", "4", "--seed", "1"]) == 0
        assert "tokens/s" in capsys.readouterr().err

    # The output directory is ours: an earlier result is not replaced without --overwrite.
    with pytest.raises(HybridGPTError, match="already exists"):
        run_retrofit(teacher, RetrofitConfig(out_dir=out, **SMALL), progress=False)


def test_the_recorded_command_runs_the_same_study():
    for cfg in (RetrofitConfig(**SMALL, out_dir="o", save_arms=False, choices=["importance"], distil_lr=0.5, seed=3),
                RetrofitConfig(ks=[0, 30], treatments=["drop", "heal"], overwrite=True)):
        cfg = cfg.resolved()
        args = build_parser().parse_args(shlex.split(command_line("runs/x/base", cfg))[1:])
        assert args.checkpoint == "runs/x/base"
        assert RetrofitConfig(**values(args, RetrofitConfig, skip_none=True)).resolved() == cfg


# Flags that fit the tiny model (later flags win).
FITTING = ["--quick", "--ks", "0,2", "--eval-context", "64", "--eval-tokens", "256", "--passkey-contexts", "160",
           "--speed-contexts", "32", "--tokens-per-row", "32"]


@pytest.mark.parametrize("extra, message", [
    (["--ks", "-1"], "--ks: has -1, which must not be negative"),
    (["--ks", "0,7"], "k = 7: the model has 6 attention layers"),
    (["--choices", "random"], "--choices: has 'random', which must be one of deepest, importance"),
    (["--treatments", "drop,prune"], "--treatments: has 'prune', which must be one of drop, distil, heal"),
    (["--treatments", "heal"], "heal fine-tunes the drop and distil arms"),
    (["--passkey-contexts", "1024"], "passkey_contexts: 1,024 exceeds the model's context of 256"),
    (["--speed-contexts", "16", "--decode-tokens", "16"], "speed context 16 must exceed decode_tokens 16"),
])
def test_bad_input_is_one_line_and_exit_2(teacher, extra, message, capsys):
    code, err = run_bad(["retrofit", teacher, *FITTING, *extra], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_folder_that_is_not_a_retrofit_output_is_refused(teacher, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    code, err = run_bad(["retrofit", teacher, *FITTING, "--out", tmp_path], capsys)
    assert code == 2 and "is not a retrofit output" in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    code, err = run_bad(["retrofit", teacher, *FITTING, "--chat-data", tmp_path, "--out", tmp_path / "r"], capsys)
    assert code == 2 and "no held-out chat transcripts" in err, err
