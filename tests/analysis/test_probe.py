import json

import numpy as np
import pytest
import torch
from helpers import quiet, smoke_model

from hybrid_gpt.analysis.probe import (
    EVAL_STREAM,
    PROBE_SETTINGS,
    RecallSpec,
    position_loss,
    probe_accuracy,
    recall_batch,
    render_probe_markdown,
    run_probe,
    train_probe_model,
)
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.train.evaluate import evaluate_lm


def _answers(seq: list[int], spec: RecallSpec) -> dict[int, int]:
    """Parse one sequence: every query key's answer, found by following the pairs (one or two hops)."""
    pairs = dict(zip(seq[0:2 * spec.n_pairs:2], seq[1:2 * spec.n_pairs:2]))
    assert len(pairs) == spec.n_pairs, "the first token of every pair (a key) must be distinct"
    hops = 1 if spec.task == "recall" else 2
    answers = {}
    for pos in range(2 * spec.n_pairs + 1, spec.seq_len, 2):
        assert seq[pos - 1] == spec.query_token
        token = seq[pos]
        for _ in range(hops):
            token = pairs[token]
        answers[pos] = token
    return answers


@pytest.mark.parametrize("task,n_queries", [("recall", 3), ("recall", 1), ("two-hop", 2)])
def test_recall_batch_targets_follow_the_pairs(task, n_queries):
    spec = RecallSpec(task, n_pairs=6, n_keys=10, n_values=8, n_queries=n_queries).validate()
    x, y = recall_batch(spec, rows=64, seed=3, step=5)
    assert x.shape == y.shape == (64, spec.seq_len)
    assert 0 <= int(x.min()) and int(x.max()) < spec.vocab_size
    for seq, target in zip(x.tolist(), y.tolist()):
        answers = _answers(seq, spec)
        assert [p for p, t in enumerate(target) if t >= 0] == sorted(answers)  # targets only at query keys
        assert len(answers) == n_queries
        assert all(target[p] == a for p, a in answers.items())
        assert all(spec.n_keys <= a < spec.n_keys + spec.n_values for a in answers.values())  # answers are values
        queried = [seq[p] for p in answers]
        assert len(set(queried)) == n_queries
        if task == "two-hop":  # a query key starts a chain: it never appears as the second token of a pair
            assert not set(queried) & set(seq[1:2 * spec.n_pairs:2])
    assert torch.equal(x, recall_batch(spec, 64, 3, 5)[0]) and torch.equal(y, recall_batch(spec, 64, 3, 5)[1])
    for seed, step, stream in ((4, 5, 0), (3, 6, 0), (3, 5, EVAL_STREAM)):  # another seed, step, or stream
        assert not torch.equal(x, recall_batch(spec, 64, seed, step, stream)[0])


def test_recall_spec_rejects_impossible_layouts():
    with pytest.raises(HybridGPTError, match="n_keys"):
        RecallSpec("recall", n_pairs=8, n_keys=4, n_values=8, n_queries=1).validate()
    with pytest.raises(HybridGPTError, match="n_queries"):
        RecallSpec("two-hop", n_pairs=4, n_keys=8, n_values=8, n_queries=3).validate()
    with pytest.raises(HybridGPTError, match="task"):
        RecallSpec("copy").validate()


def test_attention_beats_chance_and_no_mixing_does_not():
    s = PROBE_SETTINGS["smoke"]
    spec = RecallSpec(s["task"], s["n_pairs"], s["n_keys"], s["n_values"], s["n_queries"]).validate()
    acc = {}
    for pattern in ("AA", "NN"):
        model, _ = train_probe_model(spec, pattern, "smoke", seed=1, steps=s["steps"], batch_size=s["batch_size"],
                                     lr=s["lr"])
        acc[pattern] = probe_accuracy(model, spec, s["eval_examples"])["accuracy"]
    # The answer is one of the values in context: attention can narrow it to those, a model that sees only
    # its own token cannot do better than chance.
    assert acc["AA"] > 3 * spec.chance, acc
    assert acc["NN"] < spec.chance + 0.06, acc


def test_position_loss_has_one_entry_per_position_and_averages_to_evaluate_lm():
    model = smoke_model("AAMM", vocab_size=97)
    T = model.config.block_size
    tokens = np.random.default_rng(0).integers(0, 97, size=10 * T + 7).astype(np.uint16)
    curve = position_loss(model, tokens, max_tokens=6 * T + 5, batch_size=4)  # two batches, one partial
    assert len(curve) == T
    reference = evaluate_lm(model, tokens, np.ones(97, dtype=np.int64), max_tokens=6 * T + 5)
    assert reference["tokens"] == 6 * T
    assert sum(curve) / T == pytest.approx(reference["loss"], rel=1e-5)
    with pytest.raises(HybridGPTError, match="validation tokens"):
        position_loss(model, tokens[:T], max_tokens=10 * T)


def test_run_probe_writes_json_markdown_and_plots(pretrained, tmp_path):
    out = tmp_path / "probe"
    result = run_probe(run_dir=pretrained, out_dir=out, patterns=("AA", "MM"), preset="smoke", steps=10,
                       seeds=(1,), log=quiet, progress=False)
    for name in ("probe.json", "probe.md", "probe-accuracy.png", "probe-position-loss.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "probe.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert [r["pattern"] for r in saved["patterns"]] == ["AA", "MM"]
    assert saved["chance"] == pytest.approx(1 / PROBE_SETTINGS["smoke"]["n_values"])
    models = saved["position_loss"]["models"]
    assert set(models) == {"standard", "hybrid"}
    assert all(len(m["curve"]) == m["block_size"] == 32 for m in models.values())
    gap = saved["position_loss"]["gaps"]["hybrid"]
    assert gap["vs"] == "standard"
    assert gap["curve"][5] == pytest.approx(models["hybrid"]["curve"][5] - models["standard"]["curve"][5])
    first, ci = gap["buckets"][0], gap["bucket_ci"][0]
    assert ci["mean"] == pytest.approx(first["loss"]) and ci["n"] == models["hybrid"]["windows"] == 4096 // 32
    assert ci["ci95"][0] < ci["mean"] < ci["ci95"][1]
    md = (out / "probe.md").read_text()
    assert md.startswith("## ") and md == render_probe_markdown(saved)
    assert "| AA |" in md and "probe-accuracy.png" in md and "probe-position-loss.png" in md


def test_run_probe_rejects_bad_patterns_before_training(tmp_path):
    with pytest.raises(HybridGPTError, match="letters"):
        run_probe(run_dir=tmp_path, patterns=("AAXX",), preset="smoke", log=quiet, progress=False)
    assert not (tmp_path / "probe").exists()
