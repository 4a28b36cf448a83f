"""The relay is safe to expose: roles, TLS, limits, and garbage from the network."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import struct
import subprocess
import time
import urllib.error
import urllib.request

import aiohttp
import msgspec
import psutil
import pytest

from groove.consumer.client import Client, GrooveError
from groove.launch import LocalCluster, free_port, spawn
from groove.protocol import decode, encode
from groove.protocol import errors as E
from groove.protocol import messages as M
from groove.protocol.messages import Sampling
from groove.relay import auth

from .conftest import groove_cli, reference_generate, run_async
from .test_pipeline import status

PROMPT = [5, 17, 33, 100, 7, 9]


def tokens() -> auth.Tokens:
    return auth.read(auth.default_auth_file())


async def hello(address: str, role: str, token: str):
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"ws://{address}/ws") as ws:
            await ws.send_bytes(encode(M.Hello(id=1, role=role, token=token)))
            msg = await ws.receive(timeout=10)
            reply = decode(msg.data)[0]
            closed = (await ws.receive(timeout=10)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            return reply, closed


@pytest.fixture(scope="module")
def cluster(model_paths):
    with LocalCluster(model_paths["llama"], [(0, 2), (3, 5)]) as c:
        yield c


def test_roles_cannot_be_swapped_or_skipped(cluster):
    t = tokens()
    reply, closed = run_async(hello(cluster.address, "node", t.consumer[0]))
    assert reply.code == E.UNAUTHORIZED and "consumer token cannot connect as a node" in reply.message and closed
    reply, closed = run_async(hello(cluster.address, "consumer", t.node[0]))
    assert reply.code == E.UNAUTHORIZED and "node token cannot connect as a consumer" in reply.message and closed
    reply, closed = run_async(hello(cluster.address, "consumer", ""))
    assert reply.code == E.UNAUTHORIZED and "--token" in reply.message
    reply, closed = run_async(hello(cluster.address, "consumer", "x" * 32))
    assert reply.code == E.UNAUTHORIZED


def test_cli_commands_need_the_right_token(cluster, model_paths):
    bad = groove_cli("generate", "--relay", cluster.address, "--model", str(model_paths["llama"]), "--prompt", "hi",
                     "--token", "not-the-token-at-all", "--wait", "0")
    assert bad.returncode != 0 and "not authorized" in bad.stderr and "Traceback" not in bad.stderr
    st = groove_cli("status", "--relay", cluster.address, "--token", "nope")
    assert st.returncode != 0 and "refused the token" in st.stderr
    node = groove_cli("node", "--model", str(model_paths["llama"]), "--layers", "0-2", "--relay", cluster.address,
                      "--token", tokens().consumer[0])
    assert node.returncode == 2 and "consumer token cannot connect as a node" in node.stderr


def test_http_takes_a_bearer_token(cluster):
    url = f"http://{cluster.address}/status"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url, timeout=5)
    assert info.value.code == 401 and "Bearer" in json.loads(info.value.read())["error"]["message"]
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {tokens().consumer[0]}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200 and json.loads(r.read())["models"]


def test_relay_prints_the_join_command_and_keeps_its_tokens(tmp_path):
    env = {"GROOVE_CONFIG_DIR": str(tmp_path / "cfg")}
    relay = spawn("relay", ["relay", "--host", "127.0.0.1", "--port", str(free_port())], env)
    try:
        relay.wait_for("listening", 30)
    finally:
        relay.stop()
    path = tmp_path / "cfg" / "auth.json"
    saved = json.loads(path.read_text())
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    join = next(line for line in relay.lines if "groove node" in line)
    assert f"--token {saved['node'][0]}" in join and "--layers auto" in join
    again = spawn("relay", ["relay", "--host", "127.0.0.1", "--port", str(free_port())], env)
    try:
        again.wait_for("listening", 30)
    finally:
        again.stop()
    assert json.loads(path.read_text()) == saved  # generated once, then reused


def test_insecure_open_needs_no_token_and_warns(model_paths, tmp_path):
    c = LocalCluster(model_paths["qwen2"], [(0, 3)], relay_args=["--insecure-open"], env={"GROOVE_CONFIG_DIR": str(tmp_path)})
    with c:
        assert any("WARNING: --insecure-open" in line for line in c.relay.lines)

        async def run():
            async with Client(c.address, token="") as client:
                s = await client.open_session("qwen2", Sampling(temperature=0), wait=10)
                return [x.token async for x in client.generate(s, PROMPT, 4)]

        assert run_async(run()) == reference_generate(model_paths["qwen2"], PROMPT, 4)


def test_a_consumer_cannot_touch_another_consumers_session(cluster):
    # mallory's generate gets no stream for a session it does not own: the relay answers
    # with an error naming the session, routed to mallory alone.
    async def run_raw():
        async with Client(cluster.address) as alice:
            s = await alice.open_session("llama", Sampling(temperature=0), wait=10)
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(f"ws://{cluster.address}/ws") as ws:
                    await ws.send_bytes(encode(M.Hello(id=1, role="consumer", token=tokens().consumer[0])))
                    await ws.receive(timeout=10)
                    for msg in (M.Generate(id=2, session=s.id, tokens=[1], max_tokens=2), M.Cancel(id=3, session=s.id),
                                M.CloseSession(id=4, session=s.id)):
                        await ws.send_bytes(encode(msg))
                        reply = decode((await ws.receive(timeout=10)).data)[0]
                        assert reply.code == E.UNKNOWN_SESSION
            # alice's session is untouched
            return [x.token async for x in alice.generate(s, PROMPT, 4)]

    assert len(run_async(run_raw())) == 4


def test_limits_session_length_and_handshake(model_paths):
    c = LocalCluster(model_paths["qwen2"], [(0, 3)], relay_args=["--max-session-tokens", "64", "--handshake-timeout", "1",
                                                                 "--max-connections-per-address", "6"])
    with c:
        async def too_long():
            async with Client(c.address) as client:
                s = await client.open_session("qwen2", Sampling(temperature=0), wait=10)
                async for _ in client.generate(s, list(range(60)), 10):
                    pass

        with pytest.raises(GrooveError) as info:
            run_async(too_long())
        assert info.value.code == E.TOO_LARGE and "64" in info.value.message

        async def silent():
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(f"ws://{c.address}/ws") as ws:
                    t0 = time.monotonic()
                    msg = await ws.receive(timeout=10)
                    return msg.type, time.monotonic() - t0

        kind, waited = run_async(silent())
        assert kind in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED) and waited < 5

        async def many():
            async with aiohttp.ClientSession() as http:
                opened, refused = [], 0
                for _ in range(8):
                    try:
                        opened.append(await http.ws_connect(f"ws://{c.address}/ws"))
                    except aiohttp.WSServerHandshakeError as exc:
                        assert exc.status == 429
                        refused += 1
                for ws in opened:
                    await ws.close()
                return len(opened), refused

        opened, refused = run_async(many())
        assert refused >= 2 and opened <= 6  # one connection is the node's


def test_oversized_and_inconsistent_frames_get_errors_and_the_connection_lives(cluster, model_paths):
    async def run():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(f"ws://{cluster.address}/ws", max_msg_size=0) as ws:
                await ws.send_bytes(encode(M.Hello(id=1, role="consumer", token=tokens().consumer[0])))
                await ws.receive(timeout=10)
                await ws.send_bytes(encode(M.Cancel(session="s"), b"\0" * (257 << 20)))  # over the 256 MiB frame limit
                big = decode((await ws.receive(timeout=60)).data)[0]
                await ws.send_bytes(encode(M.OpenSession(id=5, model="llama", sampling=Sampling(temperature=0))))
                opened = decode((await ws.receive(timeout=10)).data)[0]
                await ws.send_bytes(encode(M.Generate(id=6, session=opened.session, tokens=[10**6], max_tokens=2)))
                vocab = decode((await ws.receive(timeout=10)).data)[0]
                await ws.send_bytes(encode(M.OpenSession(id=7, model="llama", sampling=Sampling(temperature=-3))))
                sampling = decode((await ws.receive(timeout=10)).data)[0]
                return big, opened, vocab, sampling

    big, opened, vocab, sampling = run_async(run())
    assert big.code == E.BAD_FRAME and "limit" in big.message
    assert isinstance(opened, M.SessionOpened)
    assert vocab.code == E.BAD_REQUEST and "vocabulary" in vocab.message
    assert sampling.code == E.BAD_REQUEST and "temperature" in sampling.message


def _garbage(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 64))
    if kind == 1:  # a length prefix that lies
        return struct.pack("<I", rng.randrange(1 << 32)) + rng.randbytes(rng.randrange(0, 32))
    if kind == 2:  # valid msgpack, wrong schema
        header = {rng.choice(["type", "v", "session", "tokens", "seq"]): rng.choice([1, "x", [1, 2], None, {"a": 1}]) for _ in range(3)}
        raw = msgspec.msgpack.encode(header)
        return struct.pack("<I", len(raw)) + raw
    if kind == 3:  # a real message, truncated
        frame = encode(M.Generate(session="s" * 22, tokens=[1, 2, 3], max_tokens=4))
        return frame[: rng.randrange(len(frame))]
    if kind == 4:  # messages a consumer may not send, or for sessions it does not have
        msg = rng.choice([M.Forward(session="x", start=0, count=1, tokens=[1]), M.Result(session="x", token=3),
                          M.Heartbeat(), M.Generate(session="nope", tokens=[1], max_tokens=1), M.Cancel(session="nope")])
        return encode(msg, rng.randbytes(rng.randrange(0, 16)))
    raw = msgspec.msgpack.encode({"type": "forward", "v": 2, "start": 0, "count": 2, "dtype": "float32", "shape": [1, 2, 64]})
    return struct.pack("<I", len(raw)) + raw + rng.randbytes(rng.randrange(0, 600))  # payload that disagrees


def test_a_flood_of_malformed_frames_leaves_the_relay_serving_correctly(cluster, model_paths):
    relay = psutil.Process(cluster.relay.popen.pid)
    rss_before = relay.memory_info().rss
    per_connection, connections = 1000, 4

    async def attacker(seed: int) -> int:
        rng = random.Random(seed)
        errors = 0
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(f"ws://{cluster.address}/ws") as ws:
                if seed % 2:
                    await ws.send_bytes(encode(M.Hello(role="consumer", token=tokens().consumer[0])))
                    await ws.receive(timeout=10)
                for _ in range(per_connection):
                    await ws.send_bytes(_garbage(rng))
                while True:
                    try:
                        msg = await ws.receive(timeout=2)
                    except asyncio.TimeoutError:
                        break
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        break
                    errors += isinstance(decode(msg.data)[0], M.Error)
        return errors

    async def flood():
        return await asyncio.gather(*(attacker(seed) for seed in range(connections)))

    answered = run_async(flood())
    assert all(n > per_connection * 0.9 for n in answered), answered  # nearly every frame got an ERROR back
    print(f"\n{per_connection * connections} malformed frames, {sum(answered)} answered with an error envelope")

    async def generate():
        async with Client(cluster.address) as c:
            s = await c.open_session("llama", Sampling(temperature=0), wait=10)
            return [x.token async for x in c.generate(s, PROMPT, 16)]

    assert run_async(generate()) == reference_generate(model_paths["llama"], PROMPT, 16)
    assert len(status(cluster.address)["nodes"]) == 2
    growth = relay.memory_info().rss - rss_before
    assert growth < 40 * 2**20, f"relay grew by {growth / 2**20:.1f} MiB"


def _openssl_cert(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def test_tls_with_a_self_made_certificate(model_paths, tmp_path):
    cert, key = _openssl_cert(tmp_path)
    port = free_port()
    relay = spawn("relay", ["relay", "--host", "127.0.0.1", "--port", str(port), "--tls-cert", str(cert), "--tls-key", str(key)])
    node = None
    try:
        assert "wss://" in relay.wait_for("listening", 30)
        address = f"wss://127.0.0.1:{port}"
        node = spawn("node", ["node", "--model", str(model_paths["qwen2"]), "--layers", "0-3", "--relay", address,
                              "--tls-ca", str(cert), "--dtype", "float32"])
        node.wait_for("registered as", 120)
        ok = groove_cli("generate", "--relay", address, "--tls-ca", str(cert), "--model", str(model_paths["qwen2"]),
                        "--prompt", "hi", "--max-tokens", "3", "--temperature", "0", "--json")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["completion_tokens"] == 3
        unverified = groove_cli("generate", "--relay", address, "--model", str(model_paths["qwen2"]), "--prompt", "hi", "--wait", "0")
        assert unverified.returncode != 0 and "certificate" in unverified.stderr.lower()
        st = groove_cli("status", "--relay", address, "--tls-ca", str(cert), "--json")
        assert st.returncode == 0 and json.loads(st.stdout)["nodes"]
        plain = groove_cli("status", "--relay", f"127.0.0.1:{port}")
        assert plain.returncode != 0
    finally:
        if node:
            node.stop()
        relay.stop()


def test_a_reader_that_falls_behind_is_dropped_not_buffered():
    """The outbound queue is bounded; when a connection's is full the relay drops that
    connection (and closes its sessions) instead of waiting on it or growing memory."""
    from groove.relay.server import RelayServer

    async def run():
        server = RelayServer(tokens=None, outbound_queue=2)
        relay = server.relay
        relay.connect("slow")
        relay.receive("slow", encode(M.Hello(role="consumer")))
        server.queues["slow"] = asyncio.Queue(2)
        frames = [encode(M.Result(session="s", token=i)) for i in range(3)]
        from groove.relay.core import Send

        await server.dispatch([Send("slow", f) for f in frames])
        return "slow" in relay.peers, server.queues["slow"].qsize()

    still_connected, queued = asyncio.run(run())
    assert not still_connected and queued == 2
