import io
import subprocess
import sys

import pytest

from hybrid_gpt import load
from hybrid_gpt.cli import main
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.infer.chat import MAX_INPUT_CHARS, ChatSession, clean_input


@pytest.fixture(scope="module")
def ckpt(pretrained):
    return pretrained / "pretrain-hybrid"


def test_clean_input_drops_control_characters():
    assert clean_input("\x00he\x07llo\x1b[31m \t🙂\n") == "hello[31m \t🙂"
    assert clean_input("\x01\x02  ") == ""


def test_session_keeps_history_and_resets(ckpt):
    model, tok = load(ckpt)
    s = ChatSession(model, tok, max_new_tokens=8, seed=0)
    first = "".join(s.reply("Who's there?"))
    assert s.history == [{"role": "user", "content": "Who's there?"}, {"role": "assistant", "content": first}]
    assert 0 <= s.last.tokens <= 8
    "".join(s.reply("Nay, answer me."))
    assert len(s.history) == 4
    s.reset()
    assert s.history == []


def test_long_history_is_cropped_to_the_context(ckpt):
    model, tok = load(ckpt)
    s = ChatSession(model, tok, max_new_tokens=8, seed=0)
    for _ in range(6):
        "".join(s.reply("Long live the king! " * 3))
    assert s.last.prompt_tokens <= model.config.block_size - min(8, model.config.block_size // 2)
    assert s.last.cropped_turns > 0 or s.last.cut_tokens > 0


def test_greedy_replies_are_deterministic(ckpt):
    model, tok = load(ckpt)
    replies = ["".join(ChatSession(model, tok, max_new_tokens=12, temperature=0).reply("Speak!")) for _ in range(2)]
    assert replies[0] == replies[1]


def run_chat(monkeypatch, capsys, ckpt, stdin_text, *extra):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin_text))
    code = main(["chat", str(ckpt), "--max-new-tokens", "6", "--seed", "1", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_chat_cli_through_stdin_with_odd_inputs(monkeypatch, capsys, ckpt):
    odd = ["What news from Verona?", "", "   ", "🙂🎭 ünïcödé 漢字", "\x00\x07\x1b[2J ring the bell",
           "x" * 100_000, "/reset", "after the reset", "/quit", "never read"]
    code, out, err = run_chat(monkeypatch, capsys, ckpt, "\n".join(odd) + "\n")
    assert code == 0
    assert out.count("bot> ") == 5  # one reply per real message, none for empty lines or commands
    assert err.count("(empty message") == 2 and "(history cleared)" in err
    assert err.count(" tokens/s") == 5
    assert "tokens of your message dropped to fit the context" in err  # the 100 KB message
    assert "Traceback" not in err


def test_chat_cli_ends_cleanly_on_eof(monkeypatch, capsys, ckpt):
    code, out, _ = run_chat(monkeypatch, capsys, ckpt, "Who's there?\n")
    assert code == 0 and out.count("bot> ") == 1


def test_chat_cli_one_shot(monkeypatch, capsys, ckpt):
    code, out, err = run_chat(monkeypatch, capsys, ckpt, "", "-p", "What news from Verona?")
    assert code == 0 and "you>" not in out and " tokens/s" in err
    code, _, err = run_chat(monkeypatch, capsys, ckpt, "", "-p", "\x00 ")
    assert code == 2 and "empty" in err


def test_chat_as_a_real_process(ckpt):
    proc = subprocess.run([sys.executable, "-m", "hybrid_gpt.cli", "chat", str(ckpt), "--max-new-tokens", "5"],
                          input="Good morrow!\n\x04\nAnd to you.\n/quit\n", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("bot> ") == 2 and "(empty message" in proc.stderr and "Traceback" not in proc.stderr


def test_session_refuses_bad_settings_and_messages_at_the_library_boundary(ckpt):
    model, tok = load(ckpt)
    for bad in ({"temperature": float("nan")}, {"top_p": 2.0}, {"seed": -1}, {"system": "\ud800"}):
        with pytest.raises(HybridGPTError):
            ChatSession(model, tok, **bad)
    s = ChatSession(model, tok, max_new_tokens=2, seed=0)
    for text in ("\ud800", "caf\udce9", " \x07 ", "x" * (MAX_INPUT_CHARS + 1)):
        with pytest.raises(HybridGPTError):
            "".join(s.reply(text))
    assert s.history == []


def test_repl_refuses_a_message_that_is_too_long_and_goes_on(monkeypatch, capsys, ckpt):
    code, out, err = run_chat(monkeypatch, capsys, ckpt, "x" * (MAX_INPUT_CHARS + 1) + "\nWho's there?\n")
    assert code == 0 and out.count("bot> ") == 1
    assert "1,000,001 characters long; the limit is 1,000,000; not sent" in err and len(err) < 2000


def test_chat_process_survives_bytes_that_are_not_utf8(ckpt):
    """Undecodable bytes piped into the REPL are refused line by line; the next message is answered."""
    proc = subprocess.run([sys.executable, "-m", "hybrid_gpt.cli", "chat", str(ckpt), "--max-new-tokens", "3"],
                          input=b"\xff\xfe caf\xe9\nGood morrow!\n\xc3\n/quit\n", capture_output=True, timeout=120)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, err
    assert proc.stdout.count(b"bot> ") == 1 and err.count("is not valid UTF-8 text; not sent") == 2
    assert "Traceback" not in err


# -- a checkpoint with its own template ---------------------------------------------------------------------------

def scripted(script: list[int], calls: list):
    """A stand-in for engine.generate that records its prompt and stop tokens and yields ``script``."""
    import torch

    def generate(model, idx, max_new_tokens, stop_tokens=None, **kw):
        calls.append((idx[0].tolist(), stop_tokens))
        for t in script[:max_new_tokens]:
            yield torch.tensor([[t]])
            if stop_tokens and t in stop_tokens:
                return
    return generate


def test_chatml_chat_stops_at_im_end(monkeypatch, capsys, tmp_path):
    """The prompt is the checkpoint's ChatML rendering (its default system message, the generation prompt),
    and the reply ends at <|im_end|>, in the session and in `chat -p`."""
    from data.chatml import chatml_checkpoint

    from hybrid_gpt.data.template import render

    tok = chatml_checkpoint(tmp_path / "imported", block_size=128)
    reply = tok.encode("Ay me!")
    calls = []
    monkeypatch.setattr("hybrid_gpt.infer.chat.generate", scripted(reply + [2] + tok.encode(" more"), calls))
    model, tok = load(tmp_path / "imported")
    s = ChatSession(model, tok, max_new_tokens=20, seed=0)
    assert "".join(s.reply("What light?")) == "Ay me!" and s.last.tokens == len(reply)
    prompt, stop = calls[0]
    assert prompt == render(tok, [{"role": "user", "content": "What light?"}], add_generation_prompt=True).ids
    assert tok.decode(prompt, skip_special=False).startswith("<|im_start|>system\nYou are a helpful")
    assert stop == {tok.special[t] for t in ("<|im_end|>", "<|im_start|>", "<|endoftext|>")}
    code, out, err = run_chat(monkeypatch, capsys, tmp_path / "imported", "", "-p", "What light?")
    assert code == 0 and out == "Ay me!\n" and f"[{len(reply)} tokens" in err


def test_sample_starts_with_the_templates_bos_if_it_has_one(monkeypatch, capsys, tmp_path, ckpt):
    from data.chatml import chatml_checkpoint

    chatml_checkpoint(tmp_path / "imported")
    for path in (ckpt, tmp_path / "imported"):
        model, tok = load(path)
        calls = []
        monkeypatch.setattr("hybrid_gpt.infer.engine.generate", scripted(tok.encode(" soft"), calls))
        assert main(["sample", str(path), "--prompt", "ROMEO:", "--max-new-tokens", "3"]) == 0
        assert capsys.readouterr().out == "ROMEO: soft\n"
        start = [tok.special["<|bos|>"]] if path == ckpt else []  # ours opens with <|bos|>, ChatML with nothing
        assert calls[0][0] == start + tok.encode("ROMEO:")
