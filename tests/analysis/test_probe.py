import json

import numpy as np
import pytest
import torch
from helpers import smoke_model

from hybrid_gpt.analysis.probe import (
    EVAL_STREAM,
    PROBE_SETTINGS,
    RecallSpec,
    judge_seeds,
    learned_threshold,
    position_loss,
    probe_accuracy,
    recall_batch,
    run_probe,
    train_probe_model,
)
from hybrid_gpt.cli import main
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.present.probe import render_probe_markdown
from hybrid_gpt.train.evaluate import evaluate_lm


def _answers(seq: list[int], spec: RecallSpec) -> dict[int, tuple[int, int]]:
    """Parse one sequence: every query's (hops, answer), found by following the pairs from the query key."""
    pairs = dict(zip(seq[0:2 * spec.n_pairs:2], seq[1:2 * spec.n_pairs:2]))
    assert len(pairs) == spec.n_pairs, "the first token of every pair (a key) must be distinct"
    answers = {}
    for pos in range(2 * spec.n_pairs + 1, spec.seq_len, 2):
        marker, token = seq[pos - 1], seq[pos]
        hops = {spec.query_token: 1 if spec.task == "recall" else 2, spec.link_token: 1}[marker]
        for _ in range(hops):
            token = pairs[token]
        answers[pos] = (hops, token)
    return answers


@pytest.mark.parametrize("task,n_queries,n_links", [("recall", 3, 0), ("recall", 1, 0), ("two-hop", 2, 0),
                                                     ("two-hop", 3, 4)])
def test_recall_batch_targets_follow_the_pairs(task, n_queries, n_links):
    spec = RecallSpec(task, n_pairs=6, n_keys=10, n_values=8, n_queries=n_queries, n_links=n_links).validate()
    x, y = recall_batch(spec, rows=64, seed=3, step=5)
    assert x.shape == y.shape == (64, spec.seq_len)
    assert 0 <= int(x.min()) and int(x.max()) < spec.vocab_size
    for seq, target in zip(x.tolist(), y.tolist()):
        answers = _answers(seq, spec)
        assert [p for p, t in enumerate(target) if t >= 0] == sorted(answers)  # targets only at query keys
        assert len(answers) == n_queries + n_links
        assert all(target[p] == a for p, (_, a) in answers.items())
        scored = {p: a for p, (hops, a) in answers.items() if seq[p - 1] == spec.query_token}
        assert len(scored) == n_queries
        assert all(spec.n_keys <= a < spec.n_keys + spec.n_values for a in scored.values())  # answers are values
        queried = [seq[p] for p in scored]
        assert len(set(queried)) == n_queries
        links = [seq[p] for p, (hops, _) in answers.items() if seq[p - 1] == spec.link_token]
        assert len(links) == len(set(links)) == n_links
        if task == "two-hop":  # a query key starts a chain: it never appears as the second token of a pair
            assert not set(queried) & set(seq[1:2 * spec.n_pairs:2])
    assert torch.equal(x, recall_batch(spec, 64, 3, 5)[0]) and torch.equal(y, recall_batch(spec, 64, 3, 5)[1])
    for seed, step, stream in ((4, 5, 0), (3, 6, 0), (3, 5, EVAL_STREAM)):  # another seed, step, or stream
        assert not torch.equal(x, recall_batch(spec, 64, seed, step, stream)[0])


def test_two_hop_answers_need_both_hops_and_have_no_positional_shortcut():
    spec = RecallSpec("two-hop", n_pairs=8, n_keys=16, n_values=16, n_queries=4, n_links=4).validate()
    x, y = recall_batch(spec, rows=4000, seed=1, step=0)
    n, m = spec.n_pairs, spec.value_pairs
    answer_pair, query_at, one_hop_hits, last_value_hits, scored = [], [], 0, 0, 0
    for seq, target in zip(x.tolist(), y.tolist()):
        firsts, seconds = seq[0:2 * n:2], seq[1:2 * n:2]
        pairs = dict(zip(firsts, seconds))
        in_context = [t for t in seconds if t >= spec.n_keys]
        assert len(in_context) == m  # one value per chain: every chain, asked or not, ends in a value
        for p in range(2 * n + 1, spec.seq_len, 2):
            if seq[p - 1] != spec.query_token:
                continue
            scored += 1
            one_hop_hits += pairs[seq[p]] == target[p]  # one lookup lands on a key, never the answer
            last_value_hits += in_context[-1] == target[p]
            answer_pair.append(seconds.index(target[p]))
            query_at.append(p)
    assert scored == 4000 * spec.n_queries and one_hop_hits == 0
    # The answered chain is any chain: the answer is the last value in context as often as guessing would be.
    assert last_value_hits / scored == pytest.approx(spec.in_context_chance, abs=0.02)
    # The answer's pair sits at every position equally often, and scored queries at every query slot.
    counts = np.bincount(answer_pair, minlength=n) / len(answer_pair)
    assert np.allclose(counts, 1 / n, atol=0.01), counts
    slots = np.bincount((np.array(query_at) - 2 * n - 1) // 2) / len(query_at)
    assert len(slots) == spec.n_queries + spec.n_links and np.allclose(slots, 1 / len(slots), atol=0.01), slots
    # Asked and unasked values are drawn alike: each value token is an answer as often as a distractor would be.
    answers = torch.tensor([t for row, seq in zip(y.tolist(), x.tolist()) for p, t in enumerate(row)
                            if t >= 0 and seq[p - 1] == spec.query_token])
    freq = torch.bincount(answers - spec.n_keys, minlength=spec.n_values).double() / len(answers)
    assert torch.allclose(freq, torch.full_like(freq, 1 / spec.n_values), atol=0.01), freq


def test_recall_spec_rejects_impossible_layouts():
    with pytest.raises(HybridGPTError, match="n_keys"):
        RecallSpec("recall", n_pairs=8, n_keys=4, n_values=8, n_queries=1).validate()
    with pytest.raises(HybridGPTError, match="n_queries"):
        RecallSpec("two-hop", n_pairs=4, n_keys=8, n_values=8, n_queries=3).validate()
    with pytest.raises(HybridGPTError, match="task"):
        RecallSpec("copy").validate()
    with pytest.raises(HybridGPTError, match="n_links"):
        RecallSpec("recall", n_pairs=4, n_links=1).validate()
    with pytest.raises(HybridGPTError, match="n_links"):
        RecallSpec("two-hop", n_pairs=4, n_queries=2, n_links=5).validate()


def test_the_judgement_is_three_way_from_a_fixed_threshold():
    assert learned_threshold(0.25) == pytest.approx(0.625)  # half way from guessing a value in context to 1
    assert judge_seeds([1.0, 1.0, 0.27], 0.25) == "unstable"  # seeds disagree: not "not above chance"
    assert judge_seeds([1.0, 0.98, 0.625], 0.25) == "learns"
    assert judge_seeds([0.27, 0.6, 0.25], 0.25) == "does not learn"
    assert judge_seeds([0.7], 0.5) == "does not learn" and judge_seeds([0.75], 0.5) == "learns"


def test_attention_beats_chance_and_no_mixing_does_not():
    s = PROBE_SETTINGS["smoke"]["recall"]
    spec = RecallSpec("recall", s["n_pairs"], s["n_keys"], s["n_values"], s["n_queries"]).validate()
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
                       seeds=(1, 2), progress=False)
    for name in ("probe.json", "probe.md", "probe-accuracy.png", "probe-position-loss.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "probe.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert list(saved["tasks"]) == ["recall", "two-hop"] == saved["settings"]["tasks"]
    # The top level is the one-hop control, with the keys it had before there were two tasks.
    recall = saved["tasks"]["recall"]
    assert saved["settings"]["task"] == "recall" and saved["patterns"] == recall["patterns"]
    assert saved["chance"] == recall["chance"] == pytest.approx(1 / PROBE_SETTINGS["smoke"]["recall"]["n_values"])
    two = saved["tasks"]["two-hop"]
    assert two["settings"]["spec"]["task"] == "two-hop" and two["settings"]["steps"] == 10
    assert two["in_context_chance"] == pytest.approx(2 / PROBE_SETTINGS["smoke"]["two-hop"]["n_pairs"])
    for block in saved["tasks"].values():
        assert [r["pattern"] for r in block["patterns"]] == ["AA", "MM"]
        for r in block["patterns"]:
            accuracies = [x["accuracy"] for x in r["runs"]]
            assert r["judgement"] == judge_seeds(accuracies, block["in_context_chance"])
            assert r["seeds_learned"] == sum(a >= block["learned_threshold"] for a in accuracies)
    assert all("link_accuracy" in x for r in two["patterns"] for x in r["runs"])
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
    assert "two-hop judgement" in md and "recall judgement" in md and "unstable" in md


def test_probe_command_runs_one_task(tmp_path, capsys):
    out = tmp_path / "probe"
    assert main(["probe", "--run-dir", str(tmp_path), "--preset", "smoke", "--steps", "3", "--seeds", "1",
                 "--patterns", "AA", "--task", "two-hop", "--out", str(out)]) == 0
    saved = json.loads((out / "probe.json").read_text())
    assert list(saved["tasks"]) == ["two-hop"] and saved["settings"]["task"] == "two-hop"
    assert saved["position_loss"] is None
    printed = capsys.readouterr().out
    assert "two-hop" in printed and "AA" in printed and "learned at" in printed


def test_run_probe_rejects_bad_patterns_before_training(tmp_path):
    with pytest.raises(HybridGPTError, match="letters"):
        run_probe(run_dir=tmp_path, patterns=("AAXX",), preset="smoke", progress=False)
    assert not (tmp_path / "probe").exists()
