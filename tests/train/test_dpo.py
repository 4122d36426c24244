import json
import math

import pytest
import torch
from helpers import tiny_chat_files

from hybrid_gpt import load
from hybrid_gpt.data.template import render
from hybrid_gpt.data.tokenizer import Tokenizer
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.train import dpo
from hybrid_gpt.train.dpo import DPOTask, dpo_loss, encode_pair, run_dpo, sequence_logps
from hybrid_gpt.train.sft import run_sft

TRL_METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected"]


def test_sequence_logps_sums_response_tokens_only():
    logits = torch.randn(2, 5, 7)
    targets = torch.tensor([[-1, -1, 3, 4, -1], [1, -1, -1, -1, 6]])
    lp = torch.log_softmax(logits, -1)
    expected = torch.stack([lp[0, 2, 3] + lp[0, 3, 4], lp[1, 0, 1] + lp[1, 4, 6]])
    torch.testing.assert_close(sequence_logps(logits, targets), expected)


def test_loss_formula_and_metrics():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -20.0, -12.0, -18.0))
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # chosen reward 0.2, rejected -0.2: loss = -log sigmoid(0.4)
    assert loss.item() == torch.nn.functional.softplus(torch.tensor(-0.4)).item()
    assert m["rewards/accuracies"] == 1.0 and abs(m["rewards/margins"] - 0.4) < 1e-6


def test_loss_is_ln2_when_policy_equals_reference(pretrained, tmp_path):
    _, dpo_file = tiny_chat_files(tmp_path)
    from hybrid_gpt.data.chat_data import load_dpo

    model, tok = load(pretrained / "pretrain-standard")
    reference, _ = load(pretrained / "pretrain-standard")
    pairs = load_dpo(dpo_file)
    task = DPOTask(tok, reference, pairs, pairs, model.config.block_size, beta=0.1, seed=0, rows_global=8)
    loss, metrics = task.loss(model.train(), task.take(task.rows(0), 0, 8, "cpu"))
    assert abs(loss.item() - math.log(2)) < 1e-6
    assert metrics["rewards/margins"] == 0 and metrics["rewards/accuracies"] == 0


def test_chosen_and_rejected_keep_the_same_prompt_turns():
    tok = Tokenizer.train(["abc def ghi"] * 5, vocab_size=270)
    prompt = [{"role": "user", "content": "abc " * 6}, {"role": "assistant", "content": "def " * 6},
              {"role": "user", "content": "ghi"}]
    pair = {"prompt": prompt, "chosen": "abc", "rejected": "def " * 8}
    block = 24  # the short chosen reply fits with the last two prompt turns, the long rejected one with one
    assert [render(tok, prompt + [{"role": "assistant", "content": pair[k]}], block + 1).cropped_turns
            for k in ("chosen", "rejected")] == [1, 2]
    chosen, rejected = encode_pair(tok, pair, block)
    shared = render(tok, prompt[-1:], add_generation_prompt=True).ids  # <|bos|> the last user turn <|assistant|>
    assert chosen[0][:len(shared)] == shared == rejected[0][:len(shared)]
    assert chosen[1][len(shared) - 1] >= 0 and rejected[1][len(shared) - 1] >= 0  # both replies are targets


def test_chatml_pairs_share_the_prompt_and_learn_the_reply_and_im_end():
    """With ChatML and a default system message: cropping to the same prompt turns, the default system message
    opening both, and the targets each reply's content and its <|im_end|>."""
    from data.chatml import chatml_tokenizer

    tok = chatml_tokenizer()
    prompt = [{"role": "system", "content": "Speak as in the plays."}, {"role": "user", "content": "What light?"}]
    pair = {"prompt": prompt, "chosen": "It is the east.", "rejected": "Fish and chips, " * 4}
    whole = render(tok, prompt + [{"role": "assistant", "content": pair["rejected"]}]).ids
    chosen, rejected = encode_pair(tok, pair, len(whole) - 2)  # the rejected reply fits only without the system turn
    shared = render(tok, prompt[1:], add_generation_prompt=True).ids
    assert tok.decode(shared, skip_special=False).startswith("<|im_start|>system\nYou are a helpful AI assistant")
    for (x, y), reply in ((chosen, pair["chosen"]), (rejected, pair["rejected"])):
        assert x[:len(shared)] == shared
        assert tok.decode([t for t in y if t >= 0], skip_special=False) == reply + "<|im_end|>"


def test_validation_reference_is_right_for_sizes_that_do_not_divide(pretrained, tmp_path, monkeypatch):
    _, dpo_file = tiny_chat_files(tmp_path)
    from hybrid_gpt.data.chat_data import load_dpo

    policy, tok = load(pretrained / "pretrain-hybrid")
    pairs = load_dpo(dpo_file)

    def task():
        reference, _ = load(pretrained / "pretrain-standard")
        return DPOTask(tok, reference, pairs, pairs, policy.config.block_size, beta=0.1, seed=0, rows_global=8)

    monkeypatch.setattr(dpo, "EVAL_PAIRS", 6)
    monkeypatch.setattr(dpo, "EVAL_BATCH", 4, raising=False)  # 6, then all 24 pairs, in batches of 4
    cached = task()
    periodic = cached.evaluate(policy, final=False)
    assert periodic["pairs"] == 6
    close = dict(rtol=1e-6, atol=1e-6)  # batches of other padding may round differently
    torch.testing.assert_close(cached.evaluate(policy, final=True), task().evaluate(policy, final=True), **close)
    torch.testing.assert_close(cached.evaluate(policy, final=False), periodic, **close)


def test_final_evaluation_records_each_pairs_margin_in_file_order(pretrained, tmp_path, monkeypatch):
    _, dpo_file = tiny_chat_files(tmp_path)
    from hybrid_gpt.data.chat_data import load_dpo

    policy, tok = load(pretrained / "pretrain-hybrid")
    reference, _ = load(pretrained / "pretrain-standard")
    pairs = load_dpo(dpo_file)[:5]
    unfit = {**pairs[0], "chosen": "a pair encode_pair leaves out"}
    real = dpo.encode_pair
    monkeypatch.setattr(dpo, "encode_pair", lambda tok, p, block: None if p is unfit else real(tok, p, block))
    val = pairs[:2] + [unfit] + pairs[2:]
    task = DPOTask(tok, reference, pairs, val, policy.config.block_size, beta=0.1, seed=0, rows_global=8)
    res = task.evaluate(policy, final=True)
    margins = res["pair_margins"]
    assert len(margins) == 6 and margins[2] is None and res["pairs"] == 5
    assert sum(m > 0 for m in margins if m is not None) / 5 == pytest.approx(res["rewards/accuracies"])
    assert sum(m for m in margins if m is not None) / 5 == pytest.approx(res["rewards/margins"], abs=1e-6)
    # pair by pair: each margin is the one the pair gets scored alone
    alone = DPOTask(tok, reference, pairs, [val[3]], policy.config.block_size, beta=0.1, seed=0, rows_global=8)
    assert alone.evaluate(policy, final=True)["pair_margins"] == [pytest.approx(margins[3], abs=1e-5)]
    assert "pair_margins" not in task.evaluate(policy, final=False)


def test_dpo_decreases_the_loss_on_a_tiny_dataset_with_trl_metric_names(pretrained, tmp_path):
    sft_file, dpo_file = tiny_chat_files(tmp_path)
    run_sft(run_dir=pretrained, preset="smoke", model_type="standard", sft_data=str(sft_file), out=tmp_path / "sft",
            overrides=dict(max_steps=4, progress=False))
    result = run_dpo(run_dir=pretrained, preset="smoke", init=str(tmp_path / "sft"), out=tmp_path / "dpo",
                     dpo_data=str(dpo_file), dpo_val_data=str(dpo_file),
                     overrides=dict(max_steps=30, lr=3e-3, warmup_steps=0, eval_interval=30, progress=False))
    assert result.step == 30
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert all(k in steps[0] for k in TRL_METRICS)
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-5  # the first batch is scored before any update
    assert sum(r["loss"] for r in steps[-5:]) / 5 < 0.5
    evals = [r for r in rows if "val_loss" in r]
    final = evals[-1]
    assert final["val_rewards/accuracies"] > 0.9 and final["val_rewards/margins"] > 0
    # The final evaluation records every pair's margin (the periodic ones do not, to keep them small).
    margins = final["val_pair_margins"]
    assert len(margins) == final["val_pairs"] and all("val_pair_margins" not in r for r in evals[:-1])
    assert sum(m > 0 for m in margins) / len(margins) == final["val_rewards/accuracies"]
    config = json.loads((tmp_path / "dpo" / "config.json").read_text())["training"]
    assert config["stage"] == "dpo" and config["beta"] == 0.1 and config["model_type"] == "standard"


def test_dpo_resume_matches_an_uninterrupted_run(pretrained, tmp_path):
    _, dpo_file = tiny_chat_files(tmp_path)
    common = dict(run_dir=pretrained, preset="smoke", init=str(pretrained / "pretrain-hybrid"),
                  dpo_data=str(dpo_file), overrides=dict(max_steps=8, eval_interval=4, progress=False))
    run_dpo(out=tmp_path / "full", **common)
    part = run_dpo(out=tmp_path / "part", **{**common, "overrides": {**common["overrides"], "stop_after": 3}})
    assert part.interrupted and part.step == 3
    run_dpo(out=tmp_path / "part", resume=True, **common)

    def rows(path):
        return [{k: v for k, v in json.loads(line).items() if k not in ("elapsed", "tokens_per_sec")}
                for line in (path / "metrics.jsonl").read_text().splitlines()]

    assert rows(tmp_path / "part") == rows(tmp_path / "full")


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), 1e300])
def test_beta_out_of_range_is_refused_before_anything_runs(tmp_path, beta):
    with pytest.raises(HybridGPTError, match="beta must be in"):
        run_dpo(run_dir=tmp_path, preset="smoke", model_type="hybrid", beta=beta)
