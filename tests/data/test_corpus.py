import pytest

from hybrid_gpt.data.corpus import VALIDATION_PLAYS, load_user_corpus, parse_play, render_speeches
from hybrid_gpt.errors import HybridGPTError

MARKDOWN = """# A Play

## ACT I

### SCENE I. A room.

_Enter ROMEO and JULIET_

**ROMEO**  
But soft, what light  
through yonder window breaks?

**JULIET**  
[Aside]_  
Ay me!

_Exit ROMEO_

Wherefore art thou \\-- Romeo?

### SCENE II. A street.

Nobody speaks for a new scene.

**NURSE**  
Madam!
"""


def test_parse_play_keeps_speeches_and_drops_directions():
    speeches = parse_play(MARKDOWN)
    assert [(s.speaker, s.scene) for s in speeches] == [("ROMEO", 2), ("JULIET", 2), ("NURSE", 3)]
    assert speeches[0].text == "But soft, what light\nthrough yonder window breaks?"
    # The paragraph after a stage direction continues the speech; inline "[Aside]_" is dropped.
    assert speeches[1].text == "Ay me!\nWherefore art thou -- Romeo?"
    text = render_speeches(speeches)
    assert text.startswith("ROMEO:\nBut soft, what light\n")
    assert "Enter" not in text and "ACT" not in text and "_" not in text
    assert text.endswith("NURSE:\nMadam!\n\n")


def test_embedded_corpus_is_split_by_play(corpus):
    # The 37 plays of the canon plus Edward III.
    assert len(corpus.train) + len(corpus.val) == 38
    assert sorted(d.name for d in corpus.val) == sorted(VALIDATION_PLAYS)
    train_bytes = len(corpus.split_text("train").encode())
    val_bytes = len(corpus.split_text("val").encode())
    assert 0.06 < val_bytes / (train_bytes + val_bytes) < 0.10
    hamlet = next(d for d in corpus.val if d.name == "hamlet")
    assert hamlet.text.startswith("BERNARDO:\nWho's there?\n\nFRANCISCO:\n")
    assert "HAMLET:\nTo be, or not to be" in hamlet.text
    assert not any("Who's there?\n\nFRANCISCO" in d.text[:40] for d in corpus.train)
    assert len(corpus.sha256()) == 64


def test_user_corpus_single_file_is_split_at_a_line(tmp_path):
    f = tmp_path / "text.txt"
    f.write_text("".join(f"line {i}\n" for i in range(100)))
    c = load_user_corpus(f)
    assert c.split_text("train") + c.split_text("val") == f.read_text()
    assert c.split_text("val").startswith("line ")
    assert 0.05 < len(c.split_text("val")) / len(f.read_text()) < 0.15


def test_user_corpus_folder_is_split_by_file(tmp_path):
    for i in range(10):
        (tmp_path / f"{i:02d}.txt").write_text(f"document {i}\n" * 20)
    (tmp_path / "ignored.md").write_text("not text")
    c = load_user_corpus(tmp_path)
    assert [d.name for d in c.val] == ["09"]
    assert len(c.train) == 9


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"", "empty"),
    (b"  \n\n", "empty"),
    (b"caf\xe9 au lait\n", "not UTF-8"),
    (b"\x00\x01\x02binary\n", "binary"),
])
def test_bad_user_corpus(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(HybridGPTError, match=message):
        load_user_corpus(path)


def test_empty_corpus_folder(tmp_path):
    with pytest.raises(HybridGPTError, match="no .txt files"):
        load_user_corpus(tmp_path)


@pytest.mark.parametrize("line", ["_[To VIOLA]_", "__\\[Awaking]_", "[Within]_", "*[Reads.]*", "*Sound a horn.*"])
def test_stage_directions_inside_speeches_are_dropped(line):
    (speech,) = parse_play(f"**VIOLA**  \n{line}  \nPray God defend me!  \nAnd thanks; and ever _\\[ ]_\n")
    assert speech.text == "Pray God defend me!\nAnd thanks; and ever"


def test_embedded_corpus_has_no_markup_left(corpus):
    text = corpus.split_text("train") + corpus.split_text("val")
    assert not any(ch in text for ch in "*_[]\\")
