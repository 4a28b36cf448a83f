"""The API's request checking and stop-string filter, as pure code (no network)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from groove.consumer.tokenizer import StopFilter
from groove.relay.api_params import ApiError, parse

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_defaults_follow_openai():
    p = parse(CHAT, chat=True)
    assert (p.temperature, p.top_p, p.max_tokens, p.stop, p.stream, p.include_usage) == (1.0, 1.0, None, [], False, False)


def test_values_are_carried():
    p = parse({**CHAT, "temperature": 0, "top_p": 0.5, "seed": 3, "stop": "x", "max_completion_tokens": 9, "max_tokens": 2,
               "stream": True, "stream_options": {"include_usage": True}, "n": 1, "frequency_penalty": 0}, chat=True)
    assert (p.temperature, p.top_p, p.seed, p.stop, p.max_tokens, p.include_usage) == (0, 0.5, 3, ["x"], 9, True)
    messages = [{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None}]
    assert parse({"model": "m", "messages": messages}, chat=True).messages == [{"role": "system", "content": "ab"}, {"role": "assistant", "content": ""}]
    assert parse({"model": "m", "prompt": ["one"]}, chat=False).prompt == "one"
    assert parse({"model": "m", "prompt": [[1, 2]]}, chat=False).prompt == [1, 2]


@pytest.mark.parametrize("body, param", [
    ({"messages": CHAT["messages"]}, "model"),
    ({**CHAT, "temperature": True}, "temperature"),
    ({**CHAT, "temperature": -1}, "temperature"),
    ({**CHAT, "top_p": 1.5}, "top_p"),
    ({**CHAT, "max_tokens": 0}, "max_tokens"),
    ({**CHAT, "max_tokens": 2.5}, "max_tokens"),
    ({**CHAT, "n": 3}, "n"),
    ({**CHAT, "stop": ""}, "stop"),
    ({**CHAT, "stop": [1]}, "stop"),
    ({**CHAT, "stream": "yes"}, "stream"),
    ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ({**CHAT, "logprobs": True}, "logprobs"),
    ({**CHAT, "tools": [{"type": "function"}]}, "tools"),
    ({"model": "m", "messages": "hi"}, "messages"),
    ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ({"model": "m", "messages": [{"content": "x"}]}, "messages"),
])
def test_bad_chat_requests(body, param):
    with pytest.raises(ApiError) as info:
        parse(body, chat=True)
    assert info.value.status == 400 and info.value.param == param and info.value.body()["error"]["message"]


@pytest.mark.parametrize("prompt", [None, "", [], ["a", "b"], [1, -2], [1.5], [True]])
def test_bad_prompts(prompt):
    with pytest.raises(ApiError) as info:
        parse({"model": "m", "prompt": prompt}, chat=False)
    assert info.value.param == "prompt"


def test_body_must_be_an_object():
    with pytest.raises(ApiError):
        parse([1], chat=False)


def run_filter(stops, deltas):
    f = StopFilter(stops)
    out = "".join(f.push(d) for d in deltas)
    return out + f.flush(), f.stopped


@given(st.lists(st.text(alphabet="abc", max_size=4), max_size=12), st.lists(st.text(alphabet="abc", min_size=1, max_size=3), max_size=3))
def test_stop_filter_cuts_at_the_first_stop_however_the_text_is_split(deltas, stops):
    text = "".join(deltas)
    expected, hit = text, False
    for end in range(1, len(text) + 1):  # character by character: the first stop to complete
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            expected, hit = text[: end - max(map(len, done))], True
            break
    assert run_filter(stops, deltas) == (expected, hit)


def test_stop_filter_holds_back_only_possible_stop_starts():
    f = StopFilter(["END"])
    assert f.push("the E") == "the "
    assert f.push("x") == "Ex"
    assert f.push("EN") == ""
    assert f.push("D and more") == "" and f.stopped
