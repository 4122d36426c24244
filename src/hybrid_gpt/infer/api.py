"""The OpenAI-compatible API of `hybrid-gpt serve`, torch-free: its limits, the checks of a request's JSON, the
shapes of its responses and errors, and the scan for stop strings.

Kept apart from the server (infer/serve.py) so that every rule about what a request may hold is plain Python,
tested without a model or a socket. A request that breaks a rule is an :class:`APIError`, which the server
answers with OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}`` and a 4xx status.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import math
from dataclasses import dataclass, fields, replace

from hybrid_gpt.data.template import ROLES, check_messages
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.infer.config import Sampling
from hybrid_gpt.options import Spec, check_value, shown, spec_of

SERVE_PACKAGES = ("starlette", "uvicorn")  # the `serve` extra of pyproject.toml

# Bounds on one request, each far beyond a chat's needs: a request past one is refused before any work.
MAX_BODY_BYTES = 1 << 20  # a request body; a prompt must fit the model's context anyway
MAX_DRAIN_BYTES = 8 << 20  # a body over MAX_BODY_BYTES is read (and dropped) this far, so that the 413 arrives
MAX_MESSAGES = 256  # messages of one conversation
MAX_STOPS = 4  # stop strings, as OpenAI's API
MAX_STOP_CHARS = 256  # characters of one stop string
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
DEFAULT_MAX_TOKENS = 512  # when a request does not say: at most this, and never past the context
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes (OpenAI's seed is an int64)
MAX_WAITING = 32  # requests queued for one model beyond those it is generating
MAX_ACTIVE = 4  # generations of one model stepped in turn, one token each
WINDOW = 16  # text pieces a generation may run ahead of its reader: a slow or gone client pauses it

_NUMBER, _INT, _BOOL, _TEXT = "a number", "an integer", "a boolean", "a string"
# The sampling options' own ranges and rules (the chat and sample commands'), temperature within OpenAI's range.
_SPEC = {f.name: spec_of(f) for f in fields(Sampling)}
_SPEC["temperature"] = replace(_SPEC["temperature"], hi=MAX_TEMPERATURE)


class APIError(Exception):
    """A request the server refuses: ``status`` (4xx, or 5xx for the server's own failures) and OpenAI's
    error fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def check_serve_extra() -> None:
    """HybridGPTError naming the `serve` extra when its packages are not installed: checked before the server
    module (which imports them) is."""
    missing = [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise HybridGPTError(f"`hybrid-gpt serve` needs the 'serve' extra ({', '.join(missing)} not installed): "
                             "pip install 'hybrid-gpt[serve]', or uv sync --extra serve")


def host_problem(host: str) -> str | None:
    """What is wrong with ``host`` as an address to listen on: an IP address or localhost, never a name to look
    up (the server reaches no network at run time)."""
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return "must be an IP address (127.0.0.1, ::1, 0.0.0.0) or localhost"
    return None


def is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_body(body: bytes) -> dict:
    """The JSON object of a request body; APIError 413 past MAX_BODY_BYTES, 400 if it is not a JSON object
    (NaN and Infinity are not JSON; nesting too deep for the parser is refused too)."""
    if len(body) > MAX_BODY_BYTES:
        raise body_too_large()
    try:
        raw = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8 text", code="invalid_json") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; so is too many digits
        raise APIError(400, f"the request body is not valid JSON ({str(e)[:200]})", code="invalid_json") from None
    if not isinstance(raw, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return raw


def body_too_large() -> APIError:
    return APIError(413, f"the request body is larger than {MAX_BODY_BYTES:,} bytes", code="request_too_large")


def _wrong(param: str, expected: str, value) -> APIError:
    return APIError(400, f"{param} must be {expected}, got {shown(_json_text(value))}", param=param,
                    code="invalid_type")


def _json_text(value) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)[:200]
    except (TypeError, ValueError):
        return str(value)[:200]


def _number(raw: dict, param: str, spec: Spec, kind: str = "float"):
    """``raw[param]`` checked as ``kind`` ("float" or "int") within ``spec``; None when absent or null."""
    value = raw.get(param)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int if kind == "int" else (int, float)):
        raise _wrong(param, _INT if kind == "int" else _NUMBER, value)
    if isinstance(value, float) and not math.isfinite(value):
        raise _wrong(param, "a finite number", value)
    problem = check_value(value, kind, spec)
    if problem:
        raise APIError(400, f"{param} {problem}, got {shown(value)}", param=param, code="invalid_value")
    return value


def _stops(raw: dict) -> tuple[str, ...]:
    stop = raw.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _wrong("stop", "a string or a list of strings", stop)
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"stop lists {len(stops)} strings; the limit is {MAX_STOPS}", param="stop",
                       code="invalid_value")
    for s in stops:
        if not s or len(s) > MAX_STOP_CHARS:
            raise APIError(400, f"each stop string must have 1 to {MAX_STOP_CHARS} characters, got {shown(s)}",
                           param="stop", code="invalid_value")
    return tuple(stops)


# Fields every generation request may hold (OpenAI's, and top_k), and those of each endpoint; any other field is
# refused, as OpenAI's API refuses it, so that a misspelt "temprature" is not silently ignored.
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream", "stream_options", "n",
           "user", "presence_penalty", "frequency_penalty", "logit_bias"}
_FIELDS = {"chat": _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format"},
           "completion": _COMMON | {"prompt", "logprobs", "echo", "suffix", "best_of"}}
# Accepted only at the value that means "not used": the features we do not implement.
_NEUTRAL = {"n": (1,), "best_of": (1,), "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},),
            "logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,), "suffix": ("",),
            "response_format": ({"type": "text"},)}


@dataclass
class GenerationRequest:
    """A checked request of either endpoint: ``kind`` "chat" (``messages``) or "completion" (``prompt``)."""

    kind: str
    model: str
    messages: list[dict] | None = None
    prompt: str | None = None
    max_tokens: int | None = None  # None: as many as fit, at most DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


def _messages(raw) -> list[dict]:
    """OpenAI's messages as the chat template's: content parts of type "text" joined, "developer" (OpenAI's
    newer name for system) as system, then :func:`check_messages`'s rules."""
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "messages must be a non-empty list of messages", param="messages",
                       code="invalid_value" if isinstance(raw, list) else "invalid_type")
    if len(raw) > MAX_MESSAGES:
        raise APIError(400, f"messages lists {len(raw):,} messages; the limit is {MAX_MESSAGES}", param="messages",
                       code="invalid_value")
    out = []
    for i, m in enumerate(raw):
        if isinstance(m, dict):
            m = dict(m)
            if m.get("role") == "developer":
                m["role"] = "system"
            content = m.get("content")
            if isinstance(content, list):
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           and set(p) == {"type", "text"} for p in content):
                    raise APIError(400, f"message {i}: content parts must be text parts "
                                        '({"type": "text", "text": ...}); other kinds are not supported',
                                   param=f"messages.[{i}].content", code="invalid_value")
                m["content"] = "".join(p["text"] for p in content)
        out.append(m)
    try:
        return check_messages(out, "messages")
    except HybridGPTError as e:
        raise APIError(400, f"{e}" + ("" if "role" not in str(e) else f" (roles: {', '.join(ROLES)}, developer)"),
                       param="messages", code="invalid_value") from None


def parse_request(raw: dict, kind: str) -> GenerationRequest:
    """``raw``, a request body of the chat ("chat") or completions ("completion") endpoint, checked against
    OpenAI's rules and our bounds; APIError 400 naming the first field that breaks one."""
    _check_fields(raw, kind)
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "model is required: the name of a loaded model (GET /v1/models lists them)",
                       param="model", code="invalid_value" if model is None or isinstance(model, str) else
                       "invalid_type")
    req = GenerationRequest(kind=kind, model=model)
    _read_input(raw, req)
    for name in ("max_tokens", "max_completion_tokens"):
        n = _number(raw, name, _SPEC["max_new_tokens"], "int")
        req.max_tokens = n if n is not None else req.max_tokens
    temperature = _number(raw, "temperature", _SPEC["temperature"])
    req.temperature = 1.0 if temperature is None else float(temperature)
    top_p = _number(raw, "top_p", _SPEC["top_p"])
    req.top_p = None if top_p is None or top_p == 1 else float(top_p)
    req.top_k = _number(raw, "top_k", _SPEC["top_k"], "int") or None
    req.stop = _stops(raw)
    req.seed = _request_seed(raw)
    _read_stream(raw, req)
    if raw.get("user") is not None and not isinstance(raw["user"], str):
        raise _wrong("user", _TEXT, raw["user"])
    return req


def _check_fields(raw: dict, kind: str) -> None:
    """No field we do not know, and the features we do not implement only at their "off" values."""
    unknown = sorted(set(raw) - _FIELDS[kind])
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {shown(unknown[0])}", param=unknown[0],
                       code="unknown_parameter")
    for name, neutral in _NEUTRAL.items():
        if name in raw and raw[name] is not None and not any(raw[name] == v and type(raw[name]) is type(v)
                                                             for v in neutral):
            raise APIError(400, f"{name} {shown(_json_text(raw[name]))} is not supported by this server (only "
                                f"{' or '.join(_json_text(v) for v in neutral)})", param=name, code="unsupported_value")


def _read_input(raw: dict, req: GenerationRequest) -> None:
    """The chat endpoint's messages, or the completions endpoint's prompt, into ``req``."""
    if req.kind == "chat":
        req.messages = _messages(raw.get("messages"))
        if raw.get("max_tokens") is not None and raw.get("max_completion_tokens") is not None:
            raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens",
                           code="invalid_value")
        return
    prompt = raw.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _wrong("prompt", "a string (or a list of one string)", prompt)
    req.prompt = prompt


def _request_seed(raw: dict) -> int | None:
    seed = raw.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _wrong("seed", _INT, seed)
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise APIError(400, f"seed must be in [-2^63, 2^64 - 1], got {shown(seed)}", param="seed",
                       code="invalid_value")
    return seed


def _read_stream(raw: dict, req: GenerationRequest) -> None:
    """``stream`` and ``stream_options`` (only with stream: whether the last chunk carries the usage)."""
    stream = raw.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _wrong("stream", _BOOL, stream)
    req.stream = bool(stream)
    options = raw.get("stream_options")
    if options is None:
        return
    if not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options",
                       code="invalid_value")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise _wrong("stream_options", 'an object {"include_usage": true or false}', options)
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise _wrong("stream_options.include_usage", _BOOL, include)
    req.include_usage = include


def context_error(context: int, prompt_tokens: int, max_tokens: int | None) -> APIError | None:
    """The error for a prompt of ``prompt_tokens`` and ``max_tokens`` more that do not fit a model's ``context``
    (OpenAI's wording and code), or None: a reply is generated within the context, never past it."""
    if prompt_tokens < context and (max_tokens is None or prompt_tokens + max_tokens <= context):
        return None
    asked = prompt_tokens + (max_tokens or 1)
    return APIError(400, f"This model's maximum context length is {context} tokens. However, you requested {asked} "
                         f"tokens ({prompt_tokens} in the prompt, {max_tokens or 1} for the completion). Please "
                         "reduce the prompt or the completion length.", param="messages" if max_tokens is None
                    else "max_tokens", code="context_length_exceeded")


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model {shown(name)} does not exist; GET /v1/models lists the loaded ones",
                    param="model", code="model_not_found")


# -- responses --------------------------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(req: GenerationRequest, rid: str, created: int, text: str, finish: str, counts: dict) -> dict:
    """The whole response of a request that did not stream."""
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion" if req.kind == "chat" else "text_completion", "created": created,
            "model": req.model, "choices": [choice], "usage": counts}


def chunk_body(req: GenerationRequest, rid: str, created: int, text: str | None = None, finish: str | None = None,
               role: bool = False, counts: dict | None = None) -> dict:
    """One chunk of a stream: a piece of text, the first (the role, for chat), the last (``finish``), or, with
    ``counts``, the usage chunk that follows the last when the request asked for it (no choices)."""
    if counts is not None:
        choices = []
    elif req.kind == "chat":
        delta = ({"role": "assistant", "content": ""} if role else {} if text is None else {"content": text})
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    body = {"id": rid, "object": "chat.completion.chunk" if req.kind == "chat" else "text_completion",
            "created": created, "model": req.model, "choices": choices}
    if req.include_usage:
        body["usage"] = counts
    return body


def sse(data: dict | str) -> bytes:
    """One server-sent event: ``data: <json>`` (or ``data: [DONE]``) and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


# -- stop strings -----------------------------------------------------------------------------------------------

class StopScan:
    """Text pieces in, the text before the first stop string out: a tail that could still begin a stop string is
    held back until the next piece shows it does not (or :meth:`flush`, at the end), so that a stream never
    sends text a stop string later takes back."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.held, self.hit = stops, "", False

    def feed(self, piece: str) -> str:
        """The text now safe to send; once a stop string is seen, ``hit`` is set and nothing more comes."""
        if self.hit:
            return ""
        text = self.held + piece
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit, self.held = True, ""
            return text[:min(found)]
        keep = max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        text, self.held = self.held, ""
        return "" if self.hit else text
