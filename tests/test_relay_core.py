"""The relay's routing logic, driven frame by frame without sockets (it is Sans-I/O)."""

from __future__ import annotations

import pytest

from groove.protocol import decode, encode
from groove.protocol import errors as E
from groove.protocol import messages as M
from groove.relay.core import Relay
from groove.relay.planner import explain_gap, plan
from groove.relay.registry import NodeInfo, merge_ranges, missing_ranges


class Harness:
    def __init__(self):
        self.relay = Relay()

    def send(self, conn, msg, payload=b""):
        return [(s.conn, *decode(s.frame)) for s in self.relay.receive(conn, encode(msg, payload))]

    def raw(self, conn, frame):
        return [(s.conn, *decode(s.frame)) for s in self.relay.receive(conn, frame)]

    def node(self, conn, first, last, num_layers=4, model="m", fp="f"):
        self.relay.connect(conn)
        self.send(conn, M.Hello(role="node"))
        out = self.send(conn, M.NodeRegister(model=model, fingerprint=fp, num_layers=num_layers, layers=M.Range(first, last),
                                             device="cpu", dtype="float32", hidden_size=8, vocab_size=100))
        (c, reg, _), = out
        assert isinstance(reg, M.Registered)
        return reg.node_id

    def consumer(self, conn):
        self.relay.connect(conn)
        (c, welcome, _), = self.send(conn, M.Hello(role="consumer"))
        return welcome.peer_id

    def open(self, conn, model="m", **kw):
        out = self.send(conn, M.OpenSession(id=7, model=model, **kw))
        return out


def test_token_path_feeds_back_without_the_consumer():
    h = Harness()
    a = h.node("A", 0, 1)
    b = h.node("B", 2, 3)
    h.consumer("C")
    out = h.open("C")
    configs = [(c, m) for c, m, _ in out if isinstance(m, M.PipelineConfig)]
    assert [(c, m.position) for c, m in configs] == [("A", 0), ("B", 1)]
    opened = out[-1][1]
    assert isinstance(opened, M.SessionOpened) and opened.pipeline == [a, b] and opened.id == 7
    sid = opened.session

    (dst, fwd, _), = h.send("C", M.Generate(session=sid, tokens=[5, 6, 7], max_tokens=3))
    assert dst == "A" and fwd.tokens == [5, 6, 7] and fwd.start == 0 and fwd.remaining == 3

    hidden = M.Forward(session=sid, seq=fwd.seq, start=0, count=3, dtype="float32", shape=[1, 3, 8])
    frame = encode(hidden, b"\0" * 96)
    (routed,) = h.relay.receive("A", frame)
    assert routed.conn == "B" and routed.frame == frame  # forwarded byte for byte

    out = h.send("B", M.Result(session=sid, seq=fwd.seq, token=11))
    assert [(c, type(m).__name__) for c, m, _ in out] == [("C", "Result"), ("A", "Forward")]
    nxt = out[1][1]
    assert nxt.tokens == [11] and nxt.start == 3 and nxt.remaining == 2

    out = h.send("B", M.Result(session=sid, seq=nxt.seq, token=12, finish="stop"))
    assert [(c, type(m).__name__) for c, m, _ in out] == [("C", "Result"), ("A", "TurnEnd")]  # the first node stops expecting it
    assert out[0][1].token == 12 and out[1][1].session == sid
    assert h.relay.sessions.get(sid).tokens == [5, 6, 7, 11, 12]

    # Next turn: only the unprocessed reply token and the new tokens go out.
    (dst, fwd2, _), = h.send("C", M.Generate(session=sid, tokens=[9], max_tokens=1))
    assert fwd2.tokens == [12, 9] and fwd2.start == 4


def test_cancel_drops_the_in_flight_result_and_keeps_caches_in_step():
    h = Harness()
    h.node("A", 0, 3)
    h.consumer("C")
    sid = h.open("C")[-1][1].session
    (_, fwd, _), = h.send("C", M.Generate(session=sid, tokens=[1, 2], max_tokens=10))
    (c, ack, _), (to, end, _) = h.send("C", M.Cancel(id=3, session=sid))
    assert ack.finish == "cancelled" and ack.id == 3 and ack.token is None
    assert (to, type(end)) == ("A", M.TurnEnd)
    assert [type(m) for _, m, _ in h.send("C", M.Cancel(id=4, session=sid))] == [M.Result]  # no turn left to end
    assert h.send("A", M.Result(session=sid, seq=fwd.seq, token=50)) == []  # stale
    (_, fwd2, _), = h.send("C", M.Generate(session=sid, tokens=[3], max_tokens=1))
    assert fwd2.start == 2 and fwd2.tokens == [3]


def test_generate_validation():
    h = Harness()
    h.node("A", 0, 3)
    h.consumer("C")
    sid = h.open("C")[-1][1].session
    (_, err, _), = h.send("C", M.Generate(session=sid, tokens=[1, 100], max_tokens=1))
    assert err.code == E.BAD_REQUEST and "100" in err.message and "vocabulary" in err.message
    (_, err, _), = h.send("C", M.Generate(session=sid, tokens=[1], max_tokens=0))
    assert err.code == E.BAD_REQUEST and "max_tokens" in err.message
    (_, err, _), = h.send("C", M.Generate(session="nope", tokens=[1], max_tokens=1))
    assert err.code == E.UNKNOWN_SESSION
    h.send("C", M.Generate(session=sid, tokens=[1], max_tokens=5))
    (_, err, _), = h.send("C", M.Generate(session=sid, tokens=[1], max_tokens=5))
    assert err.code == E.BUSY


def test_sessions_are_private_to_their_connection():
    h = Harness()
    h.node("A", 0, 3)
    h.consumer("C1")
    h.consumer("C2")
    sid = h.open("C1")[-1][1].session
    (_, err, _), = h.send("C2", M.Generate(session=sid, tokens=[1], max_tokens=1))
    assert err.code == E.UNKNOWN_SESSION
    (_, err, _), = h.send("C2", M.CloseSession(session=sid))
    assert err.code == E.UNKNOWN_SESSION


def test_roles_are_enforced():
    h = Harness()
    h.node("A", 0, 3)
    h.consumer("C")
    (_, err, _), = h.send("C", M.NodeRegister(model="m", fingerprint="f", num_layers=4, layers=M.Range(0, 3), device="cpu",
                                             dtype="float32", hidden_size=8, vocab_size=10))
    assert err.code == E.BAD_REQUEST and "consumer" in err.message
    (_, err, _), = h.send("A", M.OpenSession(model="m"))
    assert err.code == E.BAD_REQUEST
    h.relay.connect("X")
    (_, err, _), = h.send("X", M.OpenSession(model="m"))
    assert "hello" in err.message


def test_errors_name_missing_layers_overlap_and_unknown_models():
    h = Harness()
    h.node("A", 0, 1, num_layers=6)
    h.consumer("C")
    (_, err, _), = h.open("C")
    assert err.code == E.NO_PIPELINE and "layers 2-5" in err.message and [[r.first, r.last] for r in err.missing] == [[2, 5]]
    h.node("B", 1, 5, num_layers=6)
    (_, err, _), = h.open("C")
    assert err.code == E.NO_PIPELINE and "overlap" in err.message
    (_, err, _), = h.open("C", model="other")
    assert err.code == E.UNKNOWN_MODEL and "'other'" in err.message and "served: m" in err.message


def test_registration_outside_the_model_is_refused():
    h = Harness()
    h.relay.connect("A")
    h.send("A", M.Hello(role="node"))
    (_, err, _), = h.send("A", M.NodeRegister(model="m", fingerprint="f", num_layers=4, layers=M.Range(2, 9), device="cpu",
                                             dtype="float32", hidden_size=8, vocab_size=10))
    assert err.code == E.REJECTED and err.fatal


def test_fingerprints_never_mix():
    h = Harness()
    h.node("A", 0, 1, fp="f1")
    h.node("B", 2, 3, fp="f2")
    h.consumer("C")
    (_, err, _), = h.open("C")
    assert err.code == E.NO_PIPELINE
    h.node("B2", 2, 3, fp="f1")
    opened = h.open("C")[-1][1]
    assert isinstance(opened, M.SessionOpened) and opened.fingerprint == "f1"
    status = h.relay.status()
    assert {(m["fingerprint"], m["complete"]) for m in status["models"]} == {("f1", True), ("f2", False)}


def test_node_loss_errors_its_sessions_and_frees_the_others():
    h = Harness()
    h.node("A", 0, 1)
    h.node("B", 2, 3)
    h.consumer("C")
    sid = h.open("C")[-1][1].session
    out = [(s.conn, *decode(s.frame)) for s in h.relay.disconnect("B")]
    errors = [m for c, m, _ in out if c == "C"]
    assert errors[0].code == E.NODE_LOST and "2-3" in errors[0].message
    assert [(c, type(m).__name__) for c, m, _ in out if c == "A"] == [("A", "CloseSession")]
    assert h.relay.sessions.get(sid) is None


def test_consumer_disconnect_closes_its_sessions_on_every_node():
    h = Harness()
    h.node("A", 0, 1)
    h.node("B", 2, 3)
    h.consumer("C")
    sid = h.open("C")[-1][1].session
    out = [(s.conn, *decode(s.frame)) for s in h.relay.disconnect("C")]
    assert sorted((c, m.session) for c, m, _ in out) == [("A", sid), ("B", sid)]
    assert all(not n.sessions for n in h.relay.registry.nodes.values())


def test_garbage_gets_an_error_and_the_session_survives():
    h = Harness()
    h.node("A", 0, 3)
    h.consumer("C")
    sid = h.open("C")[-1][1].session
    (_, err, _), = h.raw("C", b"\xff\xff\xff\xffjunk")
    assert err.code == E.BAD_FRAME
    (dst, fwd, _), = h.send("C", M.Generate(session=sid, tokens=[1], max_tokens=1))
    assert dst == "A"


def _n(i, first, last, sessions=0):
    return NodeInfo(id=i, conn=i, model="m", fingerprint="f", num_layers=6, first=first, last=last, device="cpu", dtype="f",
                    hidden_size=8, vocab_size=10, sessions={f"s{k}" for k in range(sessions)})


def test_planner_prefers_the_least_loaded_chain():
    nodes = [_n("a", 0, 2, sessions=3), _n("b", 0, 2, sessions=1), _n("c", 3, 5, sessions=0), _n("d", 0, 5, sessions=2)]
    assert [n.id for n in plan(nodes, 6)] == ["b", "c"]
    nodes[1].sessions = {"x", "y", "z", "w"}
    assert [n.id for n in plan(nodes, 6)] == ["d"]


def test_planner_needs_exact_cover():
    assert plan([_n("a", 0, 2), _n("b", 2, 5)], 6) is None
    text, missing = explain_gap([_n("a", 0, 1), _n("b", 4, 4)], 6)
    assert missing == [[2, 3], [5, 5]] and "2-3, 5" in text


@pytest.mark.parametrize("ranges,n,gaps", [([(0, 1), (2, 3)], 4, []), ([(1, 2)], 4, [[0, 0], [3, 3]]), ([], 2, [[0, 1]]), ([(0, 3), (1, 1)], 4, [])])
def test_missing_ranges(ranges, n, gaps):
    assert missing_ranges(ranges, n) == gaps


def test_merge_ranges():
    assert merge_ranges([(4, 5), (0, 1), (2, 2), (1, 3)]) == [[0, 5]]


def test_sessions_per_consumer_are_limited():
    h = Harness()
    h.relay.max_sessions_per_consumer = 2
    h.node("A", 0, 3)
    h.consumer("C")
    h.consumer("D")
    assert isinstance(h.open("C")[-1][1], M.SessionOpened)
    assert isinstance(h.open("C")[-1][1], M.SessionOpened)
    (_, err, _), = h.open("C")
    assert err.code == E.BUSY and "2 open sessions" in err.message
    assert isinstance(h.open("D")[-1][1], M.SessionOpened)  # other consumers are unaffected


def test_tokenizer_files_are_asked_for_once_per_checkpoint_and_dropped_with_its_last_node():
    h = Harness()
    files = {"tokenizer.json": b"{}", "tokenizer_config.json": b"{}"}

    def register(conn, fp="f"):
        h.relay.connect(conn)
        h.send(conn, M.Hello(role="node"))
        (_, reg, _), = h.send(conn, M.NodeRegister(model="m", fingerprint=fp, num_layers=4, layers=M.Range(0, 3), device="cpu",
                                                   dtype="float32", hidden_size=8, vocab_size=100, tokenizer_digest="d1"))
        return reg

    assert register("A").send_tokenizer
    (_, err, _), = h.send("A", M.TokenizerFiles(model="m", fingerprint="f", files={"../../etc/passwd": b"x"}))
    assert err.code == E.BAD_REQUEST and "passwd" in err.message
    (_, err, _), = h.send("A", M.TokenizerFiles(model="other", fingerprint="f", files=files))
    assert err.code == E.BAD_REQUEST
    assert h.send("A", M.TokenizerFiles(model="m", fingerprint="f", files=files)) == []
    assert h.relay.tokenizer_files[("m", "f")] == files
    assert not register("B").send_tokenizer  # the relay already has them
    assert register("C", fp="g").send_tokenizer  # another checkpoint under the same name
    h.relay.disconnect("A")
    assert ("m", "f") in h.relay.tokenizer_files  # B still serves it
    h.relay.disconnect("B")
    assert ("m", "f") not in h.relay.tokenizer_files


def test_local_consumer_uses_the_same_session_path():
    h = Harness()
    h.node("A", 0, 3)
    h.relay.connect_local("api-1")
    out = h.send("api-1", M.OpenSession(id=1, model="m"))
    assert isinstance(out[-1][1], M.SessionOpened) and out[-1][0] == "api-1"
    assert h.relay.sessions.of_consumer("api-1")
    closes = h.relay.disconnect("api-1")
    assert [decode(s.frame)[0].__class__ for s in closes] == [M.CloseSession] and not h.relay.sessions.sessions


def test_pipeline_config_counts_the_machines_of_a_chain():
    h = Harness()
    for conn, first, last, machine in (("A", 0, 1, "m1"), ("B", 2, 2, "m1"), ("C", 3, 3, "m2")):
        h.relay.connect(conn)
        h.send(conn, M.Hello(role="node"))
        h.send(conn, M.NodeRegister(model="m", fingerprint="f", num_layers=4, layers=M.Range(first, last), device="cpu",
                                    dtype="float32", hidden_size=8, vocab_size=100, machine=machine))
    h.consumer("X")
    configs = [m for _, m, _ in h.open("X") if isinstance(m, M.PipelineConfig)]
    assert [(c.position, c.length, c.groups) for c in configs] == [(0, 3, 2), (1, 3, 2), (2, 3, 2)]
