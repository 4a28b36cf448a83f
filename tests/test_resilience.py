"""Nodes die, links drop, relays restart: sessions fail over to replicas with identical
greedy output, or end with a clear error in bounded time, and everything else keeps going."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from groove.consumer.client import Client, GrooveError
from groove.launch import LocalCluster, spawn
from groove.protocol import decode, encode
from groove.protocol import errors as E
from groove.protocol import messages as M
from groove.protocol.messages import Sampling

from .conftest import reference_generate, run_async, wait_until
from .test_pipeline import generate, status
from .test_relay_core import Harness

PROMPT = [5, 17, 33, 100, 7, 9]


def token_ids(steps) -> list[int]:
    return [step.token for step in steps]


def node_pids(cluster: LocalCluster) -> dict[str, int]:
    out = {}
    for proc in cluster.nodes:
        for line in proc.lines:
            if line.startswith("registered as "):
                out[line.split()[2]] = proc.popen.pid
    return out


# --- Sans-I/O: the relay's failover logic frame by frame ----------------------------------


def test_failover_replays_the_session_onto_a_replica():
    h = Harness()
    a = h.node("A", 0, 1)
    h.node("B", 2, 3)
    h.node("B2", 2, 3)
    h.consumer("C")
    opened = h.open("C")[-1][1]
    sid, chain = opened.session, opened.pipeline
    lost_conn = "B" if h.relay.registry.nodes[chain[1]].conn == "B" else "B2"
    spare_conn = "B2" if lost_conn == "B" else "B"
    (_, fwd, _), = h.send("C", M.Generate(session=sid, tokens=[1, 2, 3], max_tokens=5))
    out = h.send("A", M.Forward(session=sid, seq=fwd.seq, start=0, count=3, dtype="float32", shape=[1, 3, 8]), b"\0" * 96)
    assert out[0][0] == lost_conn
    out = [(s.conn, *decode(s.frame)) for s in h.relay.disconnect(lost_conn)]
    kinds = [(c, type(m).__name__) for c, m, _ in out]
    assert ("A", "CloseSession") in kinds and ("A", "PipelineConfig") in kinds and (spare_conn, "PipelineConfig") in kinds
    replay = [m for c, m, _ in out if isinstance(m, M.Forward)]
    assert len(replay) == 1 and replay[0].start == 0 and replay[0].tokens == [1, 2, 3] and replay[0].remaining == 5
    assert not any(c == "C" for c, _, _ in out)  # the consumer sees a pause, not an error
    # A frame of the old chain that was still in flight is dropped.
    assert h.send("A", M.Forward(session=sid, seq=fwd.seq, start=0, count=3, dtype="float32", shape=[1, 3, 8]), b"\0" * 96) == []
    out = h.send("A", M.Forward(session=sid, seq=replay[0].seq, start=0, count=3, dtype="float32", shape=[1, 3, 8]), b"\0" * 96)
    assert out[0][0] == spare_conn
    assert h.relay.status()["relay"]["failovers"] == 1
    assert h.relay.sessions.get(sid).chain == [a, h.relay.registry.by_conn(spare_conn).id]


def test_silent_nodes_time_out_and_idle_sessions_expire():
    h = Harness()
    h.relay.node_timeout, h.relay.session_ttl = 5.0, 60.0
    h.node("A", 0, 3)
    h.consumer("C")
    sid = h.open("C")[-1][1].session
    now = time.monotonic()
    sends, dead = h.relay.tick(now + 1)
    assert sends == [] and dead == []
    sends, dead = h.relay.tick(now + 6)
    assert dead == ["A"]
    (err,) = [decode(s.frame)[0] for s in sends if s.conn == "C"]
    assert err.code == E.NODE_LOST and "0-3" in err.message and h.relay.sessions.get(sid) is None
    h.node("A2", 0, 3)
    sid = h.open("C")[-1][1].session
    h.relay.node_timeout = 1000  # only the session's idleness matters below
    sends, _ = h.relay.tick(time.monotonic() + 61)
    assert {type(decode(s.frame)[0]).__name__ for s in sends} >= {"Error", "CloseSession"}
    assert h.relay.sessions.get(sid) is None


# --- real processes ----------------------------------------------------------------------


@pytest.fixture
def replicated(model_paths):
    c = LocalCluster(model_paths["llama"], [(0, 2), (3, 5), (3, 5)])
    with c:
        yield c


@pytest.mark.parametrize("speculative", ["", "ngram"])
def test_kill_9_mid_generation_fails_over_with_identical_output(replicated, model_paths, speculative):
    """Also while speculating: the replacement chain replays the session without the
    guesses that were in flight, and the output is still transformers'."""
    n = 120
    prompt = PROMPT * (3 if speculative else 1)
    expected = reference_generate(model_paths["llama"], prompt, n)
    pids = node_pids(replicated)

    async def run():
        async with Client(replicated.address) as c:
            s = await c.open_session("llama", Sampling(temperature=0), wait=10)
            victim = s.pipeline[1]
            tokens, stamps = [], []
            async for step in c.generate(s, prompt, n, speculative=speculative):
                tokens.append(step.token)
                stamps.append(time.monotonic())
                if len(tokens) == 20:
                    os.kill(pids[victim], signal.SIGKILL)
                    killed_at = time.monotonic()
            return tokens, stamps, killed_at

    tokens, stamps, killed_at = run_async(run())
    assert tokens == expected
    after = [t for t in stamps if t > killed_at]
    gap = after[0] - killed_at
    print(f"\ntime from kill -9 to the next token: {gap * 1000:.0f} ms")
    assert gap < 10
    st = status(replicated.address)
    assert st["relay"]["failovers"] == 1 and len(st["nodes"]) == 2
    if speculative:
        assert st["relay"]["accepted_tokens"] > 0


def test_without_a_replica_the_error_is_clear_and_the_relay_keeps_serving(model_paths):
    with LocalCluster(model_paths["llama"], [(0, 2), (3, 5)]) as cluster:
        cluster.start_node(0, 3, extra=["--model-name", "other"])  # an unrelated pipeline
        cluster.start_node(4, 5, extra=["--model-name", "other"])
        pids = node_pids(cluster)

        async def run():
            async with Client(cluster.address) as c:
                s = await c.open_session("llama", Sampling(temperature=0), wait=10)
                got = []
                t_kill = None
                with pytest.raises(GrooveError) as info:
                    async for step in c.generate(s, PROMPT, 500):
                        got.append(step.token)
                        if len(got) == 5:
                            os.kill(pids[s.pipeline[1]], signal.SIGKILL)
                            t_kill = time.monotonic()
                return info.value, time.monotonic() - t_kill

        error, elapsed = run_async(run())
        assert error.code == E.NODE_LOST and "layers 3-5" in error.message and error.missing == [[3, 5]]
        assert elapsed < 10

        assert token_ids(run_async(generate(cluster.address, "other", PROMPT, 8))) == reference_generate(model_paths["llama"], PROMPT, 8)


def test_nodes_rejoin_a_restarted_relay(model_paths):
    with LocalCluster(model_paths["qwen2"], [(0, 1), (2, 3)]) as cluster:
        cluster.relay.stop()
        for node in cluster.nodes:
            node.wait_for("unreachable", 30)
        t0 = time.monotonic()
        cluster.relay = spawn("relay", ["relay", "--host", "127.0.0.1", "--port", str(cluster.port)])
        cluster.relay.wait_for("listening", 30)

        got = token_ids(run_async(generate(cluster.address, "qwen2", PROMPT, 8, wait=15)))
        assert got == reference_generate(model_paths["qwen2"], PROMPT, 8)
        assert time.monotonic() - t0 < 10
        assert all(node.popen.poll() is None for node in cluster.nodes)  # no node was restarted


def test_a_restarted_node_rejoins_and_serves_again(model_paths):
    with LocalCluster(model_paths["qwen2"], [(0, 1), (2, 3)]) as cluster:
        cluster.nodes[1].stop()
        cluster.start_node(2, 3)

        assert token_ids(run_async(generate(cluster.address, "qwen2", PROMPT, 8))) == reference_generate(model_paths["qwen2"], PROMPT, 8)


def test_consumer_disconnect_frees_every_nodes_cache(model_paths):
    with LocalCluster(model_paths["qwen2"], [(0, 1), (2, 3)]) as cluster:
        def node_sessions():  # as the nodes themselves count them (KV caches held), and as the relay does
            return [(n["cached_sessions"], n["sessions"]) for n in status(cluster.address)["nodes"]]

        async def open_and_vanish():
            c = Client(cluster.address)
            await c.connect()
            for _ in range(3):
                s = await c.open_session("qwen2", Sampling(temperature=0), wait=10)
                async for _ in c.generate(s, PROMPT, 2):
                    pass
            assert wait_until(lambda: node_sessions() == [(3, 3), (3, 3)], timeout=5), node_sessions()
            await c.close()  # no close_session: the relay must clean up

        run_async(open_and_vanish())
        assert wait_until(lambda: node_sessions() == [(0, 0), (0, 0)], timeout=5), node_sessions()


def test_status_shows_health_and_heartbeat_age(model_paths):
    with LocalCluster(model_paths["qwen2"], [(0, 3)]) as cluster:
        (node,) = status(cluster.address)["nodes"]
        assert node["healthy"] is True and 0 <= node["last_heartbeat_s"] < 2


# --- automatic placement -----------------------------------------------------------------

from groove.relay.placement import PlacementError, Shape, parse_size, place  # noqa: E402


def test_placement_fills_gaps_first_then_replicates_the_least_redundant_range():
    shape = Shape(num_layers=8, layer_bytes=[10] * 8, embed_bytes=20, head_bytes=20)
    assert place(shape, 60, []) == (0, 3)  # 20 + 4 x 10
    assert place(shape, 60, [(0, 3)]) == (4, 7)  # 4 x 10 + 20
    assert place(shape, 35, [(0, 3)]) == (4, 6)  # sized to the memory offered
    assert place(shape, 60, [(0, 3), (4, 7)]) in [(0, 3), (4, 7)]
    assert place(shape, 60, [(0, 3), (4, 7), (0, 3)]) == (4, 7)  # the range with fewer replicas
    assert place(shape, 1000, [(0, 3), (4, 7)]) == (0, 7)  # a whole replica when it fits
    with pytest.raises(PlacementError, match="layer 0 alone"):
        place(shape, 25, [])


def test_parse_size():
    assert parse_size("8GB") == 8 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size("1.5g") == 1.5e9
    with pytest.raises(ValueError):
        parse_size("lots")


def test_layers_auto_fills_two_halves_then_adds_a_replica(model_paths):
    from groove.models import checkpoint, info

    path = model_paths["llama"]
    ckpt = checkpoint.load(str(path))
    embed, head = info.edge_bytes(ckpt)
    shape = Shape(ckpt.num_layers, info.layer_bytes(ckpt), embed, head)
    budget = max(shape.cost(0, 2), shape.cost(3, 5))
    assert budget < min(shape.cost(0, 3), shape.cost(2, 5))
    with LocalCluster(path, []) as cluster:
        for _ in range(2):  # started together: the relay's reservations keep them apart
            node = spawn("node", ["node", "--model", str(path), "--layers", "auto", "--max-memory", str(budget), "--relay",
                                  cluster.address, "--dtype", "float32", "--device", "cpu"])
            cluster.nodes.append(node)
        for node in cluster.nodes:
            node.wait_for("registered as", 120)
        st = status(cluster.address)
        assert sorted(n["layers"] for n in st["nodes"]) == [[0, 2], [3, 5]]
        assert st["models"][0]["complete"] and st["models"][0]["redundancy"] == 1
        third = spawn("node", ["node", "--model", str(path), "--layers", "auto", "--max-memory", str(budget), "--relay",
                               cluster.address, "--dtype", "float32", "--device", "cpu"])
        cluster.nodes.append(third)
        line = third.wait_for("placed this node on layers", 60)
        third.wait_for("registered as", 120)
        assert "layers 0-2" in line or "layers 3-5" in line
        assert sorted(n["layers"] for n in status(cluster.address)["nodes"]) in ([[0, 2], [0, 2], [3, 5]], [[0, 2], [3, 5], [3, 5]])

        assert token_ids(run_async(generate(cluster.address, "llama", PROMPT, 8))) == reference_generate(path, PROMPT, 8)


def test_layers_auto_with_too_little_memory_is_refused(model_paths):
    with LocalCluster(model_paths["llama"], []) as cluster:
        node = spawn("node", ["node", "--model", str(model_paths["llama"]), "--layers", "auto", "--max-memory", "1KB",
                              "--relay", cluster.address, "--dtype", "float32"])
        try:
            node.wait_for("alone needs", 60)
            assert node.popen.wait(10) == 2
        finally:
            node.stop()


def test_info_shows_the_plan_on_a_relay(model_paths):
    import json

    from .conftest import groove_cli

    path = model_paths["llama"]
    with LocalCluster(path, [(0, 2)]) as cluster:
        proc = groove_cli("info", str(path), "--relay", cluster.address, "--max-memory", "10GB", "--json")
        assert proc.returncode == 0, proc.stderr
        net = json.loads(proc.stdout)["network"]
        assert net["coverage"] == [[0, 2]] and not net["complete"] and net["next_auto"] == [3, 5]
        human = groove_cli("info", str(path), "--relay", cluster.address, "--max-memory", "10GB")
        assert "would load layers 3-5" in human.stdout
