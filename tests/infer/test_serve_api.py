"""The serve API's rules without a server: request checks, error shapes and the stop-string scan (infer/api.py)."""

import json
import subprocess
import sys

import pytest

from hybrid_gpt.infer import api
from hybrid_gpt.infer.api import APIError, StopScan, parse_body, parse_request

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _refused(raw: dict, kind: str = "chat") -> APIError:
    with pytest.raises(APIError) as e:
        parse_request(raw, kind)
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}
    return e.value


def test_a_plain_request_gets_openai_defaults():
    req = parse_request(CHAT, "chat")
    assert (req.temperature, req.top_p, req.max_tokens, req.stop, req.seed, req.stream) == (1.0, None, None, (), None,
                                                                                           False)
    req = parse_request({**CHAT, "stop": "\n", "top_p": 1, "max_completion_tokens": 5, "seed": -3, "n": 1,
                         "stream": True, "stream_options": {"include_usage": True}}, "chat")
    assert (req.stop, req.top_p, req.max_tokens, req.seed, req.include_usage) == (("\n",), None, 5, -3, True)


def test_content_parts_and_the_developer_role_become_the_templates():
    req = parse_request({"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}, "chat")
    assert req.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]


@pytest.mark.parametrize("change, param", [
    ({"messages": []}, "messages"), ({"messages": "hi"}, "messages"), ({"messages": [{"role": "robot",
                                                                                      "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"), ({"messages": [{"role": "user"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages.[0].content"),
    ({"messages": [{"role": "user", "content": "x"}] * (api.MAX_MESSAGES + 1)}, "messages"),
    ({"temperature": 2.5}, "temperature"), ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 1e-5}, "temperature"), ({"temperature": True}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": "9"}, "max_tokens"),
    ({"max_tokens": 2.0}, "max_tokens"), ({"max_tokens": 10**9}, "max_tokens"),
    ({"max_tokens": 3, "max_completion_tokens": 3}, "max_tokens"), ({"stop": 3}, "stop"), ({"stop": [""]}, "stop"),
    ({"stop": ["a"] * 5}, "stop"), ({"stop": "x" * 300}, "stop"), ({"seed": 1.5}, "seed"), ({"seed": 2**70}, "seed"),
    ({"stream": "yes"}, "stream"), ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"stream": True, "stream_options": {"x": 1}}, "stream_options"), ({"temprature": 1}, "temprature"),
    ({"n": 2}, "n"), ({"presence_penalty": 0.5}, "presence_penalty"), ({"logprobs": True}, "logprobs"),
    ({"model": 3}, "model"), ({"model": ""}, "model"), ({"user": 7}, "user"), ({"top_k": -1}, "top_k"),
])
def test_bad_fields_are_refused_naming_the_field(change, param):
    e = _refused({**CHAT, **change})
    assert e.status == 400 and e.param == param and e.type == "invalid_request_error", e.message
    assert len(e.message) < 600


def test_a_completion_takes_one_prompt():
    assert parse_request({"model": "m", "prompt": ["once"]}, "completion").prompt == "once"
    for prompt in (None, 5, ["a", "b"], [1, 2]):
        assert _refused({"model": "m", "prompt": prompt}, "completion").param == "prompt"
    assert _refused({"model": "m", "prompt": "x", "messages": []}, "completion").code == "unknown_parameter"
    assert _refused({"model": "m", "prompt": "x", "echo": True}, "completion").param == "echo"


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe", b'{"a": NaN}', b'{"a": Infinity}',
                                  b"[" * 100_000, b'{"a": 1' + b"0" * 5000 + b"}", b""])
def test_a_body_that_is_not_a_json_object_is_refused(body):
    with pytest.raises(APIError) as e:
        parse_body(body)
    assert e.value.status == 400 and e.value.code == "invalid_json"


def test_a_body_over_the_limit_is_413():
    with pytest.raises(APIError) as e:
        parse_body(b" " * (api.MAX_BODY_BYTES + 1))
    assert e.value.status == 413


def test_the_context_bounds_the_prompt_and_the_reply():
    assert api.context_error(32, 10, None) is None and api.context_error(32, 10, 22) is None
    assert api.context_error(32, 10, 23).code == "context_length_exceeded"
    e = api.context_error(32, 32, None)
    assert e.code == "context_length_exceeded" and "maximum context length is 32 tokens" in e.message


@pytest.mark.parametrize("stops, pieces, sent, hit", [
    (("\n\n",), ["ab", "\n", "\nc"], "ab", True),
    (("\n\n",), ["ab", "\n", "c"], "ab\nc", False),
    (("END", "x"), ["aE", "N", "D!"], "a", True),
    (("END",), ["aEN"], "aEN", False),  # held back until the end, then given
    (("abc",), ["xab", "abc"], "xab", True),
    ((), ["a", "b"], "ab", False),
])
def test_stop_strings_cut_the_text_and_nothing_after_them_is_sent(stops, pieces, sent, hit):
    scan = StopScan(stops)
    out = [scan.feed(p) for p in pieces]
    assert "".join(out) + scan.flush() == sent and scan.hit == hit
    # nothing sent is ever taken back: each output is a prefix of the final text
    assert all(sent.startswith("".join(out[:i + 1])) for i in range(len(out)))


def test_chunks_and_bodies_have_openai_shapes():
    req = parse_request({**CHAT, "stream": True, "stream_options": {"include_usage": True}}, "chat")
    first = api.chunk_body(req, "id", 1, role=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""} and first["usage"] is None
    last = api.chunk_body(req, "id", 1, counts=api.usage(3, 4))
    assert last["choices"] == [] and last["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert api.sse("[DONE]") == b"data: [DONE]\n\n"
    assert json.loads(api.sse(first)[6:]) == first


def test_the_api_module_is_torch_free():
    code = "import json, sys; import hybrid_gpt.infer.api; print(json.dumps('torch' in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "false", done.stderr[-2000:]
