import json

import pytest
import torch
from helpers import tiny_chat_files

from hybrid_gpt.data.tokenizer import Tokenizer
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.train.finetune import pad_batch
from hybrid_gpt.train.sft import SFTTask, run_sft


def records(ckpt):
    return [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]


def test_pad_batch_pads_targets_with_ignore():
    x, y = pad_batch([([1, 2, 3], [2, 3, -1]), ([4], [5])], pad_id=9, device="cpu")
    assert x.tolist() == [[1, 2, 3], [4, 9, 9]] and y.tolist() == [[2, 3, -1], [5, -1, -1]]


def test_padding_does_not_change_the_loss(pretrained):
    from hybrid_gpt import load

    model, tok = load(pretrained / "pretrain-hybrid")
    convs = [[{"role": "user", "content": "Who's there?"}, {"role": "assistant", "content": "Nay, answer me."}],
             [{"role": "user", "content": "Long live the king!" * 3}, {"role": "assistant", "content": "Bernardo?"}]]
    task = SFTTask(tok, convs, convs, model.config.block_size, seed=0, rows_global=2)
    alone = [model(*pad_batch([ex], tok.end_id, "cpu"), loss_reduction="sum")[1] for ex in task.train]
    together = model(*pad_batch(task.train, tok.end_id, "cpu"), loss_reduction="sum")[1]
    torch.testing.assert_close(together, sum(alone))


def one_step(pretrained, tmp_path, monkeypatch, grad_accum: int):
    """(the gradient, the loss, the micro-batches (inputs, targets)) of the first step on the same 8 rows,
    split into ``grad_accum`` micro-batches by the training loop."""
    from hybrid_gpt import load
    from hybrid_gpt.data.chat_data import load_sft
    from hybrid_gpt.train.loop import TrainConfig, train

    model, tok = load(pretrained / "pretrain-hybrid")
    convs = load_sft(tiny_chat_files(tmp_path)[0])
    task = SFTTask(tok, convs, convs[:2], model.config.block_size, seed=0, rows_global=8)
    grads, micros = [], []
    clip, take = torch.nn.utils.clip_grad_norm_, task.take

    def capture(params, max_norm):
        params = list(params)
        grads.append(torch.cat([p.grad.flatten() for p in params]))
        return clip(params, max_norm)

    def record(*args):
        micro = take(*args)
        micros.append(micro[:2])
        return micro

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", capture)
    monkeypatch.setattr(task, "take", record)
    cfg = TrainConfig(max_steps=1, batch_size=8 // grad_accum, grad_accum=grad_accum, warmup_steps=0, progress=False)
    result = train(model, task, cfg, tmp_path / f"accum-{grad_accum}", tok, {"stage": "sft"}, torch.device("cpu"))
    return grads[0], result.metrics[0]["loss"], micros


def test_gradient_accumulation_does_not_change_the_step(pretrained, tmp_path, monkeypatch):
    from hybrid_gpt import load

    grad, loss, (whole,) = one_step(pretrained, tmp_path, monkeypatch, 1)
    for grad_accum in (2, 4):
        other, other_loss, micros = one_step(pretrained, tmp_path, monkeypatch, grad_accum)
        # Micro-batches of unequal target counts: a token mean per micro-batch would weight tokens unevenly.
        assert len(micros) == grad_accum and len({int((y >= 0).sum()) for _, y in micros}) > 1
        torch.testing.assert_close(other, grad, rtol=1e-5, atol=1e-6)
        assert abs(other_loss - loss) < 1e-6
    model, _ = load(pretrained / "pretrain-hybrid")
    _, mean = model.train()(*whole)  # the step's loss is the mean over all its target tokens
    assert abs(mean.item() - loss) < 1e-6


def test_sft_trains_on_user_jsonl_and_resumes(pretrained, tmp_path):
    sft_file, _ = tiny_chat_files(tmp_path)
    common = dict(run_dir=pretrained, preset="smoke", model_type="hybrid", sft_data=str(sft_file),
                  overrides=dict(max_steps=8, eval_interval=4, progress=False, lr=3e-3))
    run_sft(out=tmp_path / "full", **common)
    rows = records(tmp_path / "full")
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    train = [r["loss"] for r in rows if "loss" in r]
    assert len(train) == 8 and len(val) == 3 and val[-1] < val[0]  # a baseline at step 0, then steps 4 and 8
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["training"]["stage"] == "sft" and config["training"]["init"].endswith("pretrain-hybrid")
    assert config["training"]["val_examples"] == 1  # 5% of 24, at least one
    part = run_sft(out=tmp_path / "part", **{**common, "overrides": {**common["overrides"], "stop_after": 3}})
    assert part.interrupted
    run_sft(out=tmp_path / "part", resume=True, **common)
    assert [r["loss"] for r in records(tmp_path / "part") if "loss" in r] == train


def test_sft_needs_a_pretrained_checkpoint_and_data(pretrained, tmp_path):
    with pytest.raises(HybridGPTError, match="run `hybrid-gpt pretrain --layers AANN` first"):
        run_sft(run_dir=pretrained, preset="smoke", layers="AANN")
    with pytest.raises(HybridGPTError, match="run `hybrid-gpt prepare-chat` first"):
        run_sft(run_dir=pretrained, preset="smoke", model_type="hybrid")
    with pytest.raises(HybridGPTError, match="holds a hybrid model"):
        run_sft(run_dir=pretrained, preset="smoke", model_type="standard", init=str(pretrained / "pretrain-hybrid"))


def test_conversations_without_a_target_in_context_are_refused():
    tok = Tokenizer.train(["abc def"] * 5, vocab_size=270)
    # The assistant turn comes first, so cropping to the context drops it and leaves nothing to learn.
    convs = [[{"role": "assistant", "content": "ok"}, {"role": "user", "content": "x" * 50}]]
    with pytest.raises(HybridGPTError, match="keeps an assistant token"):
        SFTTask(tok, [[{"role": "assistant", "content": "ok"}]], convs, 8, 0, 1)


def test_chatml_examples_learn_assistant_content_and_im_end(tmp_path):
    """SFT on a checkpoint with the ChatML template: targets are each assistant turn's content and its <|im_end|>,
    batches are padded with <|im_end|>, and the fine-tuned checkpoint keeps the template."""
    from data.chatml import chatml_checkpoint

    from hybrid_gpt import load
    from hybrid_gpt.data.chat_data import load_sft

    tok = chatml_checkpoint(tmp_path / "imported")
    sft_file, _ = tiny_chat_files(tmp_path)
    convs = load_sft(sft_file)
    task = SFTTask(tok, convs, convs[:2], 256, seed=0, rows_global=2)
    assert task.pad_id == tok.special["<|im_end|>"]
    for conv, (x, y) in zip(convs[:2], task.val):
        assert tok.decode(x, skip_special=False).startswith("<|im_start|>system\nYou are a helpful AI assistant")
        assert tok.decode([t for t in y if t >= 0], skip_special=False) == conv[-1]["content"] + "<|im_end|>"
    run_sft(run_dir=tmp_path, preset="smoke", init=str(tmp_path / "imported"), sft_data=str(sft_file),
            out=tmp_path / "sft", overrides=dict(max_steps=2, eval_interval=2, progress=False))
    assert (tmp_path / "sft" / "chat_template.json").read_text() == (
        tmp_path / "imported" / "chat_template.json").read_text()
    assert load(tmp_path / "sft")[1].template == tok.template
