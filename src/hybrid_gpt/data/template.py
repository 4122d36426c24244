"""The chat template: one rendering used by SFT, DPO and chat alike.

    <|bos|> <|user|> text <|end|> <|assistant|> text <|end|> ...

The role token opens a turn and <|end|> closes it. Training learns assistant turns only: the loss
mask covers each assistant turn's content and its <|end|>, never role tokens or other turns.
A conversation longer than the context is cropped from the left at turn boundaries; only when the
final turn alone cannot fit is that turn itself cut, so a training example always keeps a target.
"""

from __future__ import annotations

from dataclasses import dataclass

from hybrid_gpt.data.tokenizer import ASSISTANT, SYSTEM, USER, Tokenizer
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import clip

ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


@dataclass
class Rendered:
    ids: list[int]
    mask: list[int]  # 1 where the token is a training target (assistant content and its <|end|>)
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


def _turns(tok: Tokenizer, messages: list[dict]) -> list[tuple[list[int], list[int]]]:
    turns = []
    for m in messages:
        content = tok.encode(m["content"])
        train = 1 if m["role"] == "assistant" else 0
        turns.append(([tok.special[ROLES[m["role"]]]] + content + [tok.end_id], [0] + [train] * (len(content) + 1)))
    return turns


def render(tok: Tokenizer, messages: list[dict], max_len: int | None = None,
           add_generation_prompt: bool = False) -> Rendered:
    """Token ids and loss mask of a conversation, at most ``max_len`` tokens long.

    With ``add_generation_prompt`` the sequence ends with <|assistant|>, ready for the model to reply;
    cropping then keeps the newest turns and cuts the oldest part of the last one if it must.
    """
    turns = _turns(tok, messages)
    tail = ([tok.special[ASSISTANT]], [0]) if add_generation_prompt else ([], [])
    head = ([tok.bos_id], [0])
    total = 1 + sum(len(t[0]) for t in turns) + len(tail[0])
    dropped = 0
    if max_len is not None:
        if max_len < 3:
            raise HybridGPTError(f"a context of {max_len} tokens is too short for a conversation")
        while total > max_len and len(turns) > 1:
            total -= len(turns[0][0])
            turns.pop(0)
            dropped += 1
    ids, mask = list(head[0]), list(head[1])
    for t_ids, t_mask in turns:
        ids += t_ids
        mask += t_mask
    ids += tail[0]
    mask += tail[1]
    cut = 0
    if max_len is not None and len(ids) > max_len:
        cut = len(ids) - max_len
        if add_generation_prompt:  # keep the end of the newest turn: the model replies to it
            ids = ids[:1] + ids[1 + cut:]
            mask = mask[:1] + mask[1 + cut:]
        else:  # keep the start of the final (assistant) turn: its first tokens are still targets
            ids, mask = ids[:max_len], mask[:max_len]
    return Rendered(ids=ids, mask=mask, cropped_turns=dropped, cut_tokens=cut)


def training_example(tok: Tokenizer, messages: list[dict], block_size: int) -> tuple[list[int], list[int]] | None:
    """(input ids, target ids with -1 where not trained) for a window of ``block_size``; None if no target."""
    r = render(tok, messages, max_len=block_size + 1)
    x = r.ids[:-1]
    y = [t if m else -1 for t, m in zip(r.ids[1:], r.mask[1:])]
    if all(t < 0 for t in y):
        return None
    return x, y
