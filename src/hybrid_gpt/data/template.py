"""Chat templates: how a conversation becomes token ids and a loss mask, one rendering used by SFT, DPO
and chat alike. A checkpoint brings its template (chat_template.json); one without it uses ours.

Ours (:data:`HYBRID_TEMPLATE`), whose five special tokens are reserved when our tokenizer is trained:

    <|bos|> <|user|> text <|end|> <|assistant|> text <|end|> ...

ChatML (:func:`chatml_template`: SmolLM2, Qwen), token for token what Hugging Face's jinja template renders:

    <|im_start|>system\\ntext<|im_end|>\\n<|im_start|>user\\ntext<|im_end|>\\n<|im_start|>assistant\\n

where a template with a default system message inserts it when the first message is not a system message.

A template is an optional opening token (``bos``) and, per message, ``turn_start`` ("{role}" standing for
the role's name), the content, ``turn_end`` and ``turn_sep``; the generation prompt is the assistant's
turn_start. Special tokens in these strings enter by id; all other text, the content included, is encoded
as ordinary text, so a typed "<|im_end|>" stays text. The text between two special tokens is encoded in one
piece, as a Hugging Face tokenizer encodes the rendered string, so the ids are the same as theirs (apart from
the cut of runs over MAX_RUN characters, see data/tokenizer.py).

Training learns assistant turns only: the loss mask covers each assistant turn's content and its turn_end
(<|end|>, <|im_end|>: the model learns to stop), never the opening, a role header ("<|im_start|>assistant\\n";
a token spanning the header's last byte and the content counts as content), the separator after turn_end
(ChatML's "\\n": generation stops at <|im_end|> before it), a default system message or other turns.

A conversation longer than the context is cropped from the left at turn boundaries, the kept turns rendered
as they would be alone (a default system message reappears when the first kept message is not a system
message); only when the final turn alone cannot fit is that turn itself cut, so a training example always
keeps a target.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import asdict, dataclass, fields

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import clip

BOS, SYSTEM, USER, ASSISTANT, END = "<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (BOS, SYSTEM, USER, ASSISTANT, END)
ROLES = ("system", "user", "assistant")
TEMPLATE_FORMAT = "hybrid-gpt-chat-template"
TEMPLATE_VERSION = 1
JINJA_LIMIT = 1 << 20  # characters of a jinja template we try to recognise


@dataclass(frozen=True)
class ChatTemplate:
    """How messages are laid out around their content (see the module docstring)."""

    name: str  # a label: "hybrid", "chatml"
    turn_start: str  # opens a message; "{role}" is replaced by the role's name; starts with a special token
    turn_end: str  # closes a message; trained in assistant turns; starts with a special token
    turn_sep: str = ""  # after turn_end, never trained
    bos: str | None = None  # special token opening every rendering and every sampled prompt
    stop: tuple[str, ...] = ()  # special tokens that end a reply (besides turn_end's, always one)
    doc_start: str | None = None  # special token starting each document in token files, if the tokenizer has it
    default_system: str | None = None  # system message inserted when the first message is not one

    def turn(self, role: str) -> str:
        return self.turn_start.replace("{role}", role)

    def with_default(self, messages: list[dict]) -> list[dict]:
        """``messages`` with the default system message first where the template inserts it."""
        if self.default_system is not None and messages and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.default_system}, *messages]
        return list(messages)

    def text(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The rendering as one string, as a Hugging Face chat template renders it."""
        out = [self.bos or ""]
        for m in self.with_default(messages):
            out += [self.turn(m["role"]), m["content"], self.turn_end, self.turn_sep]
        if add_generation_prompt:
            out.append(self.turn("assistant"))
        return "".join(out)

    def to_dict(self) -> dict:
        return {"format": TEMPLATE_FORMAT, "version": TEMPLATE_VERSION, **asdict(self), "stop": list(self.stop)}

    @classmethod
    def from_dict(cls, raw, where: str = "chat template") -> "ChatTemplate":
        """The template a :meth:`to_dict` wrote; anything else is a one-line error naming ``where``."""
        if not isinstance(raw, dict) or raw.get("format") != TEMPLATE_FORMAT:
            raise HybridGPTError(f"{where} is not a hybrid-gpt chat template (format {TEMPLATE_FORMAT!r})")
        if raw.get("version") != TEMPLATE_VERSION:
            raise HybridGPTError(f"{where} is of version {clip(repr(raw.get('version')))}; this hybrid-gpt reads "
                                 f"version {TEMPLATE_VERSION}")
        names = {f.name for f in fields(cls)}
        extra = sorted(set(raw) - names - {"format", "version"})
        if extra:
            raise HybridGPTError(f"{where} has unknown fields: {clip(', '.join(extra))}")
        values = {}
        for key in ("name", "turn_start", "turn_end"):  # required
            if not isinstance(raw.get(key), str) or not raw[key]:
                raise HybridGPTError(f"{where}: {key!r} must be a non-empty string")
            values[key] = raw[key]
        for key in ("bos", "doc_start", "default_system"):  # null when absent; a token is never empty
            if raw.get(key) is not None:
                if not isinstance(raw[key], str) or (not raw[key] and key != "default_system"):
                    kind = "string" if key == "default_system" else "non-empty string"
                    raise HybridGPTError(f"{where}: {key!r} must be null or a {kind}")
                values[key] = raw[key]
        values["turn_sep"] = raw.get("turn_sep", "")
        if not isinstance(values["turn_sep"], str):
            raise HybridGPTError(f"{where}: 'turn_sep' must be a string")
        stop = raw.get("stop", [])
        if not isinstance(stop, list) or not all(isinstance(t, str) and t for t in stop):
            raise HybridGPTError(f"{where}: 'stop' must be a list of token strings")
        values["stop"] = tuple(stop)
        return cls(**values)


HYBRID_TEMPLATE = ChatTemplate(name="hybrid", bos=BOS, turn_start="<|{role}|>", turn_end=END,
                               stop=(END, BOS, SYSTEM, USER, ASSISTANT), doc_start=BOS)


def chatml_template(default_system: str | None = None) -> ChatTemplate:
    """ChatML; a reply also ends when the model opens another turn or ends the document."""
    return ChatTemplate(name="chatml", turn_start="<|im_start|>{role}\n", turn_end="<|im_end|>", turn_sep="\n",
                        stop=("<|im_end|>", "<|im_start|>", "<|endoftext|>"), doc_start="<|endoftext|>",
                        default_system=default_system)


# -- recognising a Hugging Face jinja template -----------------------------------------------------------------

# Conversations the candidate must render exactly as the jinja template does; the spaces and newlines around
# contents catch templates that strip them, which ChatML does not.
_PROBES = (
    [{"role": "user", "content": "U1"}],
    [{"role": "system", "content": "S1"}, {"role": "user", "content": " U1\n"}],
    [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "\nA1 "},
     {"role": "user", "content": "U2"}, {"role": "assistant", "content": "A2"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"}],
)
_SENTINEL = "\x00not-a-token\x00"  # bos_token, eos_token: a template that uses them is not ChatML


def _jinja_renderer(text: str):
    """A render function of ``text`` as transformers renders chat templates, in a sandbox."""
    from jinja2 import ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(text)
    return lambda messages, gen: compiled.render(messages=messages, add_generation_prompt=gen, bos_token=_SENTINEL,
                                                 eos_token=_SENTINEL, tools=None, documents=None)


def template_from_jinja(text) -> ChatTemplate | None:
    """The ChatTemplate of a Hugging Face jinja chat template (tokenizer_config.json's, a GGUF's
    ``tokenizer.chat_template``), or None when we cannot represent it.

    Recognised by what it renders, not by its wording: rendered in jinja's sandbox, it must give exactly
    :func:`chatml_template`'s text for a set of probe conversations, with and without a generation prompt;
    its default system message, if any, is read from the rendering of a conversation without one.
    """
    if not isinstance(text, str) or len(text) > JINJA_LIMIT or "<|im_start|>" not in text:
        return None
    try:
        render_jinja = _jinja_renderer(text)
        plain = chatml_template()
        first = render_jinja(_PROBES[0], False)
        inserted = re.fullmatch(r"<\|im_start\|>system\n(.*)<\|im_end\|>\n" + re.escape(plain.text(_PROBES[0])),
                                first, re.DOTALL)
        candidate = chatml_template(inserted.group(1) if inserted else None)
        for messages in _PROBES:
            for gen in (False, True):
                if render_jinja(messages, gen) != candidate.text(messages, gen):
                    return None
    except Exception:  # a template that fails to compile or to render is not one we can represent
        return None
    return candidate


def _jinja_literal(text: str) -> str:
    """``text`` as a single-quoted Jinja string literal (backslash, quote and line breaks escaped), which jinja2
    (transformers) and llama.cpp's template engine both read back as ``text``."""
    for raw, escaped in (("\\", "\\\\"), ("'", "\\'"), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t")):
        text = text.replace(raw, escaped)
    return f"'{text}'"


def jinja_template(template: ChatTemplate) -> str:
    """The Jinja chat template that renders exactly what ``template`` renders (:meth:`ChatTemplate.text`, with and
    without a generation prompt): what an exported model carries (Hugging Face's chat_template, GGUF's
    tokenizer.chat_template), so that other tools lay chats out as the model was trained on. The inverse of
    :func:`template_from_jinja` for the templates that recognises (ChatML)."""
    q = _jinja_literal
    out = [f"{{{{ {q(template.bos)} }}}}"] if template.bos else []
    if template.default_system is not None:
        default = template.turn("system") + template.default_system + template.turn_end + template.turn_sep
        out.append(f"{{% if messages and messages[0]['role'] != 'system' %}}{{{{ {q(default)} }}}}{{% endif %}}")
    turn = " + message['role'] + ".join(q(part) for part in template.turn_start.split("{role}"))
    out.append(f"{{% for message in messages %}}{{{{ {turn} + message['content'] + "
               f"{q(template.turn_end + template.turn_sep)} }}}}{{% endfor %}}")
    out.append(f"{{% if add_generation_prompt %}}{{{{ {q(template.turn('assistant'))} }}}}{{% endif %}}")
    return "".join(out)


# -- rendering ----------------------------------------------------------------------------------------------


@dataclass
class Rendered:
    ids: list[int]
    mask: list[int]  # 1 where the token is a training target (assistant content and its turn_end)
    cropped_turns: int = 0  # turns dropped from the left to fit
    cut_tokens: int = 0  # tokens cut from within a turn that alone did not fit


def check_messages(messages, where: str = "conversation") -> list[dict]:
    """Validate a Hugging Face style message list: [{"role": ..., "content": str}, ...]."""
    if not isinstance(messages, list) or not messages:
        raise HybridGPTError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or "role" not in m or "content" not in m:
            raise HybridGPTError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if not isinstance(m["role"], str) or m["role"] not in ROLES:
            raise HybridGPTError(f"{where}: message {i} has role {clip(repr(m['role']))}; "
                                 "use system, user or assistant")
        if not isinstance(m["content"], str):
            raise HybridGPTError(f"{where}: message {i} content must be a string")
        if "name" in m and not isinstance(m["name"], str):
            raise HybridGPTError(f"{where}: message {i} name must be a string")
    return messages


def encode_parts(tok, parts: list[tuple[str, int, bool]]) -> tuple[list[int], list[int]]:
    """(ids, mask) of consecutive (text, trained, template) parts: in template text, special token strings
    become their ids; content is always ordinary text. The text between two special tokens is encoded in
    one piece; a token is trained when the last byte it stands for is (see the module docstring)."""
    ids, mask = [], []
    run: list[tuple[str, int]] = []

    def flush():
        run[:] = [(t, m) for t, m in run if t]
        if run:
            encoded = tok.encode("".join(t for t, _ in run))
            if len({m for _, m in run}) == 1:
                mask.extend([run[0][1]] * len(encoded))
            else:
                ends, total = [], 0
                for t, _ in run:
                    total += len(t.encode("utf-8"))
                    ends.append(total)
                lengths, pos = tok.token_byte_lengths(), 0
                for i in encoded:
                    pos += int(lengths[i])
                    mask.append(run[min(bisect.bisect_left(ends, pos), len(run) - 1)][1])
            ids.extend(encoded)
            run.clear()

    for text, trained, template in parts:
        for piece in (tok.split_special(text) if template else [text]):
            if isinstance(piece, int):
                flush()
                ids.append(piece)
                mask.append(trained)
            else:
                run.append((piece, trained))
    flush()
    return ids, mask


def _turn(tok, template: ChatTemplate, role: str, content: str, trained: int) -> tuple[list[int], list[int]]:
    return encode_parts(tok, [(template.turn(role), 0, True), (content, trained, False),
                              (template.turn_end, trained, True), (template.turn_sep, 0, True)])


def render(tok, messages: list[dict], max_len: int | None = None, add_generation_prompt: bool = False) -> Rendered:
    """Token ids and loss mask of a conversation in ``tok``'s template, at most ``max_len`` tokens long.

    With ``add_generation_prompt`` the sequence ends with the assistant's turn_start, ready for the model to
    reply; cropping then keeps the newest turns and cuts the oldest part of the last one if it must.
    """
    template = tok.chat_template()
    turns = [_turn(tok, template, m["role"], m["content"], int(m["role"] == "assistant")) for m in messages]
    bos = ([tok.special[template.bos]], [0]) if template.bos else ([], [])
    default = (_turn(tok, template, "system", template.default_system, 0) if template.default_system is not None
               else ([], []))
    prompt = encode_parts(tok, [(template.turn("assistant"), 0, True)])
    tail = prompt if add_generation_prompt else ([], [])

    def head(first: int) -> tuple[list[int], list[int]]:  # the opening when messages[first] comes first
        if template.default_system is not None and messages[first]["role"] != "system":
            return bos[0] + default[0], bos[1] + default[1]
        return bos

    dropped = 0
    if max_len is not None:
        least = len(bos[0]) + len(default[0]) + len(prompt[0]) + 1
        if max_len < least:
            raise HybridGPTError(f"a context of {max_len} tokens is too short for a conversation (the "
                                 f"{clip(template.name)} chat template needs at least {least})")
        while len(turns) - dropped > 1 and (len(head(dropped)[0]) + sum(len(t[0]) for t in turns[dropped:])
                                            + len(tail[0])) > max_len:
            dropped += 1
    ids, mask = head(dropped) if messages else bos
    ids, mask = list(ids), list(mask)
    for t_ids, t_mask in turns[dropped:]:
        ids += t_ids
        mask += t_mask
    ids += tail[0]
    mask += tail[1]
    cut = 0
    if max_len is not None and len(ids) > max_len:
        cut = len(ids) - max_len
        if add_generation_prompt:  # keep the end of the newest turn: the model replies to it
            keep = len(head(dropped)[0])
            ids = ids[:keep] + ids[keep + cut:]
            mask = mask[:keep] + mask[keep + cut:]
        else:  # keep the start of the final (assistant) turn: its first tokens are still targets
            ids, mask = ids[:max_len], mask[:max_len]
    return Rendered(ids=ids, mask=mask, cropped_turns=dropped, cut_tokens=cut)


def training_example(tok, messages: list[dict], block_size: int) -> tuple[list[int], list[int]] | None:
    """(input ids, target ids with -1 where not trained) for a window of ``block_size``; None if no target."""
    r = render(tok, messages, max_len=block_size + 1)
    x = r.ids[:-1]
    y = [t if m else -1 for t, m in zip(r.ids[1:], r.mask[1:])]
    if all(t < 0 for t in y):
        return None
    return x, y
