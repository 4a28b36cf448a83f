"""End to end through real processes: a relay and nodes on 127.0.0.1, compared token for
token with transformers running the same checkpoint in one process."""

from __future__ import annotations

import json
import time

import pytest
import torch

from groove.consumer.client import Client, GrooveError
from groove.protocol.messages import Sampling

from .conftest import reference_generate, reference_logits, run_async, wait_until

PROMPTS = [[5, 17, 33, 100, 7, 9], [300, 2, 2, 41], list(range(40, 90))]
LLAMA_SPLITS = {"one": [(0, 5)], "two": [(0, 2), (3, 5)], "three": [(0, 0), (1, 4), (5, 5)]}


async def generate(address, model, prompt, max_tokens, sampling=None, want_logits=False, wait=10.0):
    async with Client(address) as c:
        s = await c.open_session(model, sampling or Sampling(temperature=0), wait=wait)
        steps = [step async for step in c.generate(s, prompt, max_tokens, want_logits=want_logits)]
        await c.close_session(s)
    return steps


def status(address):
    from groove.consumer.commands import fetch_status

    return fetch_status(address)


@pytest.fixture(scope="module")
def llama_cluster(model_paths, request):
    from groove.launch import LocalCluster

    c = LocalCluster(model_paths["llama"], [])
    c.start_relay()
    try:
        for name, ranges in LLAMA_SPLITS.items():
            for a, b in ranges:
                c.start_node(a, b, extra=["--model-name", name], wait=False)
        for node in c.nodes:
            node.wait_for("registered as", 120)
        yield c
    finally:
        c.stop()


@pytest.mark.parametrize("split", list(LLAMA_SPLITS))
def test_greedy_equals_transformers_through_1_2_3_nodes(llama_cluster, model_paths, split):
    for prompt in PROMPTS:
        expected = reference_generate(model_paths["llama"], prompt, 24)
        steps = run_async(generate(llama_cluster.address, split, prompt, 24))
        assert [s.token for s in steps] == expected
        assert steps[-1].finish in ("length", "stop")
        assert all(not s.finish for s in steps[:-1])


def test_logits_match_transformers(llama_cluster, model_paths):
    prompt = PROMPTS[0]
    for split in LLAMA_SPLITS:
        (step,) = run_async(generate(llama_cluster.address, split, prompt, 1, want_logits=True))
        ref = reference_logits(model_paths["llama"], prompt)
        assert step.logits.shape == ref.shape
        assert torch.allclose(step.logits, ref, atol=1e-4, rtol=0), float((step.logits - ref).abs().max())


def test_seeded_sampling_is_the_same_whatever_the_split(llama_cluster, model_paths):
    prompt = PROMPTS[1]
    runs = {}
    for split in LLAMA_SPLITS:
        steps = run_async(generate(llama_cluster.address, split, prompt, 32, Sampling(temperature=1.0, top_p=0.95, top_k=50, seed=1234)))
        runs[split] = [s.token for s in steps]
    assert runs["one"] == runs["two"] == runs["three"]
    other = run_async(generate(llama_cluster.address, "two", prompt, 32, Sampling(temperature=1.0, top_p=0.95, top_k=50, seed=99)))
    assert [s.token for s in other] != runs["two"]  # the seed matters
    assert runs["one"] != reference_generate(model_paths["llama"], prompt, 32)  # and it really sampled


def test_multi_turn_reuses_the_cache(llama_cluster, model_paths):
    """Turn two equals a fresh single-process run on the whole conversation, and the nodes
    process only the new tokens."""
    p1, p2 = PROMPTS[0], [61, 62, 63, 64]

    def processed():
        nodes = [n for n in status(llama_cluster.address)["nodes"] if n["model"] == "three"]
        return {n["layers"][0]: n["tokens_processed"] for n in nodes}

    def settled():  # heartbeats report work within 0.25 s: wait until two reads agree
        last = processed()
        while True:
            time.sleep(0.6)
            now = processed()
            if now == last:
                return now
            last = now

    before = settled()

    async def two_turns():
        async with Client(llama_cluster.address) as c:
            s = await c.open_session("three", Sampling(temperature=0), wait=10)
            g1 = [x.token async for x in c.generate(s, p1, 10)]
            g2 = [x.token async for x in c.generate(s, p2, 10)]
            await c.close_session(s)
            return g1, g2

    g1, g2 = run_async(two_turns())
    assert g1 == reference_generate(model_paths["llama"], p1, 10)
    assert g2 == reference_generate(model_paths["llama"], p1 + g1 + p2, 10)
    # Every node saw each token once; the last sampled token is never fed back.
    expected = len(p1) + len(g1) + len(p2) + len(g2) - 1
    done = wait_until(lambda: all(processed()[k] - before[k] == expected for k in before), timeout=10)
    assert done, (processed(), before, expected)


def test_status_reports_models_and_nodes(llama_cluster):
    st = status(llama_cluster.address)
    models = {m["model"]: m for m in st["models"]}
    assert set(models) == {"one", "two", "three"}
    assert models["three"]["coverage"] == [[0, 5]] and models["three"]["complete"] is True
    assert models["three"]["num_layers"] == 6 and len(models["three"]["fingerprint"]) == 16
    assert len({m["fingerprint"] for m in st["models"]}) == 1  # the same checkpoint under three names
    layers = sorted(tuple(n["layers"]) for n in st["nodes"] if n["model"] == "three")
    assert layers == [(0, 0), (1, 4), (5, 5)]
    for n in st["nodes"]:
        assert {"id", "model", "layers", "device", "dtype", "sessions"} <= set(n)
        assert n["device"] == "cpu" and n["dtype"] == "float32"
        assert n["kernels"] == []  # groove's kernels serve bfloat16 and int8 only


def test_cancel_stops_generation_and_the_session_continues(llama_cluster, model_paths):
    prompt = PROMPTS[2]

    async def run():
        async with Client(llama_cluster.address) as c:
            s = await c.open_session("two", Sampling(temperature=0), wait=10)
            got = []
            async for step in c.generate(s, prompt, 500):
                got.append(step.token)
                if len(got) == 3:
                    break
            await c.cancel(s)
            # The session is still usable, and consistent: continue from what we kept.
            more = [x.token async for x in c.generate(s, [7], 5)]
            await c.close_session(s)
            return got, more

    got, more = run_async(run())
    assert got == reference_generate(model_paths["llama"], prompt, 3)
    assert more == reference_generate(model_paths["llama"], prompt + got + [7], 5)


def test_many_sessions_on_one_connection(llama_cluster, model_paths):
    import asyncio

    async def run():
        async with Client(llama_cluster.address) as c:
            sessions = [await c.open_session("two", Sampling(temperature=0), wait=10) for _ in PROMPTS]

            async def one(s, p):
                return [x.token async for x in c.generate(s, p, 12)]

            return await asyncio.gather(*(one(s, p) for s, p in zip(sessions, PROMPTS)))

    results = run_async(run())
    for prompt, got in zip(PROMPTS, results):
        assert got == reference_generate(model_paths["llama"], prompt, 12)


def test_unknown_model_and_missing_layers_errors(cluster_factory, model_paths):
    cluster = cluster_factory(model_paths["qwen2"], [(0, 1)])

    async def attempt(model):
        async with Client(cluster.address) as c:
            await c.open_session(model, wait=0.5)

    with pytest.raises(GrooveError) as info:
        run_async(attempt("qwen2"))
    assert info.value.code == "no_pipeline" and "layers 2-3" in info.value.message and info.value.missing == [[2, 3]]
    with pytest.raises(GrooveError) as info:
        run_async(attempt("nobody-serves-this"))
    assert info.value.code == "unknown_model"


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])
def test_other_architectures_match_transformers(cluster_factory, model_paths, arch):
    cluster = cluster_factory(model_paths[arch], [(0, 0), (1, 3)])  # uneven, with a tied or untied head
    for prompt in PROMPTS[:2]:
        steps = run_async(generate(cluster.address, arch, prompt, 16))
        assert [s.token for s in steps] == reference_generate(model_paths[arch], prompt, 16)
    (step,) = run_async(generate(cluster.address, arch, PROMPTS[0], 1, want_logits=True))
    assert torch.allclose(step.logits, reference_logits(model_paths[arch], PROMPTS[0]), atol=1e-4, rtol=0)


def test_bfloat16_pipeline_matches_transformers_in_bfloat16(cluster_factory, model_paths):
    path = model_paths["llama"]
    cluster = cluster_factory(path, [(0, 2), (3, 5)], dtype="bfloat16")
    prompt = PROMPTS[0]
    (step,) = run_async(generate(cluster.address, "llama", prompt, 1, want_logits=True))
    ref = reference_logits(path, prompt, dtype="bfloat16")
    assert torch.allclose(step.logits, ref, atol=2e-2, rtol=0), float((step.logits - ref).abs().max())
    assert status(cluster.address)["nodes"][0]["dtype"] == "bfloat16"


def test_bfloat16_packed_nodes_give_transformers_greedy_tokens(cluster_factory, model_paths):
    path = model_paths["qwen2"]
    cluster = cluster_factory(path, [(0, 1), (2, 3)], dtype="bfloat16")
    assert all(n["weights"] in ("packed", "") for n in status(cluster.address)["nodes"])
    for prompt in PROMPTS:
        steps = run_async(generate(cluster.address, "qwen2", prompt, 16))
        assert [s.token for s in steps] == reference_generate(path, prompt, 16, dtype="bfloat16")


@pytest.mark.parametrize("compiled", [True, False], ids=["default", "no-compile"])
def test_a_node_reports_its_start_up_and_kernels(cluster_factory, model_paths, compiled):
    """Each node prints its load in quarters of the slice's bytes, then which of groove's
    compiled kernels serve it: attend.c exactly where this machine's check admits it, and
    none at all with --no-compile, whose torch kernels still give transformers' tokens."""
    import re

    from groove.node import attention

    path = model_paths["qwen2"]
    cluster = cluster_factory(path, [(0, 1), (2, 3)], dtype="bfloat16", node_args=[] if compiled else ["--no-compile"])
    config = json.loads((path / "config.json").read_text())
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    admitted = attention.decode_kernel(config["num_attention_heads"], config["num_key_value_heads"], dim, dim**-0.5) is not None
    for node, (first, last) in zip(cluster.nodes, [(0, 1), (2, 3)]):
        out = "\n".join(node.lines)
        assert f"loading layers {first}-{last} of qwen2 on cpu in bfloat16" in out
        quarters = [int(q) for q in re.findall(r"^  (\d+)% of \d+ MB loaded, [\d.]+s$", out, re.M)]
        assert quarters and quarters == sorted(set(quarters)) and quarters[-1] == 100, out
        assert out.index("100% of") < out.index("checking kernels") < out.index("registered as")
        registered = next(line for line in node.lines if line.startswith("registered as"))
        if compiled:
            assert ("attend.c" in registered) == admitted, registered
        else:
            assert registered.endswith("torch kernels only"), registered
        # The relay's status (and so `groove status`) carries the same list.
        (listed,) = [n["kernels"] for n in status(cluster.address)["nodes"] if n["layers"] == [first, last]]
        assert registered.endswith(f"groove kernels {', '.join(listed)}" if listed else "torch kernels only"), (registered, listed)
    prompt = PROMPTS[2]
    steps = run_async(generate(cluster.address, "qwen2", prompt, 12))
    assert [s.token for s in steps] == reference_generate(path, prompt, 12, dtype="bfloat16")


def test_int8_nodes_stay_close_to_full_precision(cluster_factory, model_paths):
    path = model_paths["llama"]
    cluster = cluster_factory(path, [(0, 2), (3, 5)], node_args=["--quantize", "int8"])
    assert [n["weights"] for n in status(cluster.address)["nodes"]] == ["int8", "int8"]
    (step,) = run_async(generate(cluster.address, "llama", PROMPTS[0], 1, want_logits=True))
    ref = reference_logits(path, PROMPTS[0])
    rel = float((step.logits - ref).norm() / ref.norm())
    assert rel < 0.05, rel


@pytest.mark.parametrize("quantize,attention", [("none", "sdpa"), ("int8", "groove_packed_gqa")])
def test_int8_slices_take_the_packed_gqa_attention(model_paths, quantize, attention):
    """int8 rounds far more than the packed-GQA attention: it takes it without --fast-attention."""
    from groove.models import checkpoint
    from groove.node.loader import load_slice

    ckpt = checkpoint.load(str(model_paths["llama"]))
    loaded = load_slice(ckpt, 0, 2, torch.device("cpu"), torch.float32, quantize=quantize)
    assert loaded.config._attn_implementation == attention


def test_fast_attention_stays_close_to_transformers(cluster_factory, model_paths):
    """--fast-attention rounds differently, so it is checked to float32 tolerance, not bit for bit."""
    path = model_paths["llama"]  # grouped-query: 4 heads share 2 key/value heads
    cluster = cluster_factory(path, [(0, 2), (3, 5)], node_args=["--fast-attention"])
    prompt = PROMPTS[0]
    steps = run_async(generate(cluster.address, "llama", prompt, 12, want_logits=True))
    assert [s.token for s in steps] == reference_generate(path, prompt, 12)
    # the last step's logits: every earlier token went through single-token decode steps
    ids = prompt + [s.token for s in steps[:-1]]
    assert torch.allclose(steps[-1].logits, reference_logits(path, ids), atol=1e-4, rtol=0)
