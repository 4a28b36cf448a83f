"""The OpenAI-compatible API, driven by the official ``openai`` client against a live relay
and nodes: its greedy text is ``groove generate``'s and ``groove chat``'s, stop strings cut
where they should, usage counts are right, every error has its status, and a client that
goes away mid-stream stops the nodes' work."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import openai
import pytest

from groove.consumer.commands import fetch_status
from groove.demo import DEMO_MODEL
from groove.launch import LocalCluster, spawn
from groove.relay import auth

from .conftest import groove_cli, wait_until

MODEL = "demo-model"
QUESTION = "What does the import statement do?"


@pytest.fixture(scope="module")
def demo():
    with LocalCluster(DEMO_MODEL, [(0, 2), (3, 5)]) as cluster:
        yield cluster


def client(cluster, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{cluster.address}/v1", api_key=key or auth.local_token("consumer"), max_retries=0)


def generate_json(cluster, prompt: str, max_tokens: int, model=DEMO_MODEL) -> dict:
    proc = groove_cli("generate", "--relay", cluster.address, "--model", str(model), "--prompt", prompt,
                      "--max-tokens", str(max_tokens), "--temperature", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def stream_text(stream) -> tuple[str, str | None, object]:
    text, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            text.append(piece or "")
            finish = choice.finish_reason or finish
    return "".join(text), finish, usage


def test_chat_completion_is_groove_generate_and_groove_chat(demo):
    api = client(demo)
    messages = [{"role": "user", "content": QUESTION}]
    reply = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    text = reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("length", "stop") and reply.object == "chat.completion"
    assert len(text) > 20

    # The demo model has no chat template: both render it as "Role: text" lines.
    reference = generate_json(demo, f"User: {QUESTION}\nAssistant:", 24)
    assert text == reference["text"]
    assert reply.usage.prompt_tokens == reference["prompt_tokens"]
    assert reply.usage.completion_tokens == reference["completion_tokens"]
    assert reply.usage.total_tokens == reference["prompt_tokens"] + reference["completion_tokens"]

    chat = groove_cli("chat", "--relay", demo.address, "--model", str(DEMO_MODEL), "--temperature", "0", "--max-tokens", "24",
                      input=QUESTION + "\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.rstrip("\n") == text

    streamed, finish, usage = stream_text(api.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert streamed == text and finish == reply.choices[0].finish_reason
    assert (usage.prompt_tokens, usage.completion_tokens) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)


def test_completion_is_groove_generate(demo):
    api = client(demo)
    prompt = "The meaning of the with statement is"
    reference = generate_json(demo, prompt, 20)
    reply = api.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
    assert reply.choices[0].text == reference["text"] and reply.object == "text_completion"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (reference["prompt_tokens"], reference["completion_tokens"])
    streamed, finish, usage = stream_text(api.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stream=True))
    assert streamed == reference["text"] and finish == reply.choices[0].finish_reason and usage is None
    by_ids = api.completions.create(model=MODEL, prompt=reference["token_ids"][:5], max_tokens=3, temperature=0)
    assert by_ids.usage.prompt_tokens == 5


def test_stop_strings_cut_the_text(demo):
    api = client(demo)
    prompt = "A class definition"
    full = api.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    text = full.choices[0].text
    assert full.usage.completion_tokens == 40
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    expected = text[: text.find(stop)]
    cut = api.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=["\x00never", stop])
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 40
    streamed, finish, _ = stream_text(api.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=stop, stream=True))
    assert streamed == expected and finish == "stop"


def test_seeded_sampling_repeats(demo):
    api = client(demo)
    runs = [api.completions.create(model=MODEL, prompt="Lists are", max_tokens=12, temperature=0.9, top_p=0.95, seed=7).choices[0].text
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_models_lists_only_complete_pipelines_and_errors(demo, model_paths):
    api = client(demo)
    partial = spawn("partial node", ["node", "--model", str(model_paths["llama"]), "--layers", "0-2", "--relay", demo.address,
                                     "--device", "cpu", "--dtype", "float32"])
    try:
        partial.wait_for("registered as", 120)
        assert [m.id for m in api.models.list().data] == [MODEL]
        with pytest.raises(openai.APIStatusError) as info:  # a model with a gap: 503, naming the layers missing
            api.chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert info.value.status_code == 503 and "3-5" in info.value.message
    finally:
        partial.stop()

    with pytest.raises(openai.NotFoundError) as info:
        api.completions.create(model="no-such-model", prompt="x", max_tokens=3)
    assert "no-such-model" in info.value.message and info.value.code == "model_not_found"

    bad_requests = [
        dict(temperature=3), dict(n=2), dict(top_p=0), dict(max_tokens=0), dict(max_tokens=5000), dict(logprobs=True),
        dict(stop=["a", "b", "c", "d", "e"]), dict(extra_body={"frequency_penalty": 0.5}), dict(stream_options={"include_usage": True}),
    ]
    for kw in bad_requests:
        with pytest.raises(openai.BadRequestError) as info:
            api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], **{"max_tokens": 4, **kw})
        assert info.value.body["message"], kw
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model=MODEL, messages=[], max_tokens=4)
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert "image_url" in info.value.message

    request = urllib.request.Request(f"http://{demo.address}/v1/completions", data=b"{not json", method="POST",
                                     headers={"Authorization": f"Bearer {auth.local_token('consumer')}"})
    with pytest.raises(urllib.error.HTTPError) as http_info:
        urllib.request.urlopen(request, timeout=10)
    assert http_info.value.code == 400 and "JSON" in json.loads(http_info.value.read())["error"]["message"]

    for key in ("wrong", auth.local_token("node")):
        with pytest.raises(openai.AuthenticationError):
            client(demo, key).models.list()
        with pytest.raises(openai.AuthenticationError):
            client(demo, key).completions.create(model=MODEL, prompt="x", max_tokens=2)


def test_client_leaving_mid_stream_stops_the_nodes(demo):
    api = client(demo)
    stream = api.completions.create(model=MODEL, prompt="The", max_tokens=900, temperature=0, stream=True,
                                    extra_body={"ignore_eos": True})
    for _, _ in zip(stream, range(3)):
        pass
    stream.close()
    wait_until(lambda: fetch_status(demo.address)["relay"]["sessions"] == 0, timeout=10)
    time.sleep(1.5)  # node counters come with heartbeats
    before = [n["tokens_processed"] for n in fetch_status(demo.address)["nodes"]]
    time.sleep(1.5)
    after = [n["tokens_processed"] for n in fetch_status(demo.address)["nodes"]]
    assert before == after and max(after) < 500


def test_chat_uses_the_models_own_template(model_paths):
    from groove.consumer.tokenizer import load_tokenizer_from, render_chat

    tok = load_tokenizer_from(model_paths["qwen2"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<|im_start|>system")
    with LocalCluster(model_paths["qwen2"], [(0, 3)]) as cluster:
        reply = client(cluster).chat.completions.create(model="qwen2", messages=messages, max_tokens=8, temperature=0)
        reference = generate_json(cluster, rendered, 8, model=model_paths["qwen2"])
    assert reply.choices[0].message.content == reference["text"]
    assert reply.usage.prompt_tokens == reference["prompt_tokens"] == len(render_chat(tok, messages))


def test_requests_at_once_are_limited_per_address():
    # Two from 127.0.0.1: the node's connection and one request.
    with LocalCluster(DEMO_MODEL, [(0, 5)], relay_args=["--max-connections-per-address", "2"]) as cluster:
        api = client(cluster)
        stream = api.completions.create(model=MODEL, prompt="The", max_tokens=500, temperature=0, stream=True,
                                        extra_body={"ignore_eos": True})
        next(iter(stream))  # the first request is running
        with pytest.raises(openai.RateLimitError) as info:
            api.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert "more than 2" in info.value.message
        stream.close()
        wait_until(lambda: fetch_status(cluster.address)["relay"]["sessions"] == 0, timeout=10)
        assert api.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_speculation_through_the_api_keeps_the_text(model_paths):
    """The relay's --speculative ngram default, and a request's own choice: the greedy text
    is the same as without, streaming or not, with guesses really made and kept."""
    with LocalCluster(DEMO_MODEL, [(0, 2), (3, 5)], relay_args=["--speculative", "ngram"]) as cluster:
        api = client(cluster)
        prompt = "".join(f">>> print({i})\n{i}\n" for i in range(1, 12))
        ask = dict(model=MODEL, prompt=prompt, max_tokens=60, temperature=0, extra_body={"ignore_eos": True})
        plain = api.completions.create(**{**ask, "extra_body": {"ignore_eos": True, "speculative": "none"}})
        assert fetch_status(cluster.address)["relay"]["drafted_tokens"] == 0
        default = api.completions.create(**ask)
        streamed, _, _ = stream_text(api.completions.create(**ask, stream=True))
        relay = fetch_status(cluster.address)["relay"]
        assert default.choices[0].text == plain.choices[0].text == streamed
        assert default.usage.completion_tokens == 60
        assert relay["drafted_tokens"] > 0 and relay["accepted_tokens"] > 0
        with pytest.raises(openai.BadRequestError, match="speculative"):
            api.completions.create(**{**ask, "extra_body": {"speculative": "medusa"}})
