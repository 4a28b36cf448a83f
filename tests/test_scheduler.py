"""The node's batch scheduler, as pure code: what goes into each forward pass."""

from __future__ import annotations

import pytest

from groove.node.scheduler import MIN_PIECE, Arrivals, ChunkSizer, Scheduler, Work
from groove.protocol.messages import Forward


def work(session: str, count: int, start: int = 0) -> Work:
    return Work(Forward(session=session, start=start, count=count, tokens=list(range(count))))


def plan(batch) -> list[tuple[str, int, int]]:
    return [(s.work.session, s.offset, s.count) for s in batch]


def test_every_decode_goes_with_a_prompt_chunk():
    s = Scheduler()
    for w in (work("a", 1), work("p", 100), work("b", 1), work("q", 20)):
        s.add(w)
    batch = s.next_batch(chunk=32)
    assert plan(batch) == [("a", 0, 1), ("b", 0, 1), ("p", 0, 32)]
    s.finish(batch)
    assert plan(s.next_batch(chunk=90)) == [("p", 32, 68), ("q", 0, 20)]  # the oldest prompt first, then the next


def test_a_long_prompt_runs_in_chunks_and_leaves_when_done():
    s = Scheduler()
    s.add(work("p", 100))
    seen = []
    while s:
        batch = s.next_batch(chunk=40)
        seen += plan(batch)
        assert [x.ends_step for x in batch] == [seen[-1][1] + seen[-1][2] == 100]
        s.finish(batch)
    assert seen == [("p", 0, 40), ("p", 40, 40), ("p", 80, 20)]


def test_no_prompt_piece_is_shorter_than_the_minimum():
    s = Scheduler()
    s.add(work("p", 50))
    s.add(work("q", 5))
    batch = s.next_batch(chunk=4)
    assert plan(batch) == [("p", 0, MIN_PIECE)]  # over a tiny budget rather than a stub
    s.finish(batch)
    batch = s.next_batch(chunk=20)
    assert plan(batch) == [("p", 16, 34)]  # 20 would leave 14 rows: the rest goes now
    s.finish(batch)
    assert plan(s.next_batch(chunk=2)) == [("q", 0, 5)]  # a step shorter than the minimum goes whole


def test_one_piece_per_session_in_arrival_order():
    s = Scheduler()
    s.add(work("a", 40))  # chunks of one prompt arriving as separate steps
    s.add(work("a", 1, start=40))
    s.add(work("b", 1))
    batch = s.next_batch(chunk=20)
    assert plan(batch) == [("b", 0, 1), ("a", 0, 20)]  # a's later step waits for its first
    s.finish(batch)
    batch = s.next_batch(chunk=20)
    assert plan(batch) == [("a", 20, 20)]
    s.finish(batch)
    assert plan(s.next_batch(chunk=20)) == [("a", 0, 1)] and s.queue[0].msg.start == 40


def test_sessions_join_and_leave_between_passes():
    s = Scheduler(max_batch=3)
    for name in "abcd":
        s.add(work(name, 1))
    batch = s.next_batch(chunk=8)
    assert plan(batch) == [("a", 0, 1), ("b", 0, 1), ("c", 0, 1)]  # capped; d waits its turn
    s.finish(batch)
    s.drop("d")
    s.add(work("e", 1))
    assert plan(s.next_batch(chunk=8)) == [("e", 0, 1)]


def test_chunk_size_follows_the_measured_costs():
    fixed = ChunkSizer(fixed=48)
    assert fixed.size(alone=True) == fixed.size(alone=False) == 48
    auto = ChunkSizer(ratio=1.5)
    assert auto.size(alone=True) == auto.high  # nobody waits: the whole prompt at once
    assert auto.size(alone=False) == auto.initial  # nothing measured yet
    auto.observe(0.020, 0)  # a decode pass: 20 ms
    auto.observe(0.020 + 64 * 0.001, 64)  # each prompt token adds 1 ms
    assert auto.size(alone=False) == 30  # 1.5 x 20 ms of prompt tokens
    for _ in range(50):
        auto.observe(0.020 + 64 * 0.0001, 64)  # a faster machine: 0.1 ms per token
    assert 250 <= auto.size(alone=False) <= 300
    for _ in range(30):
        auto.observe(0.001, 0)  # decode passes got far cheaper than prompt tokens: the floor
    assert auto.size(alone=False) == MIN_PIECE


def test_arrivals_expect_streaming_sessions_back_until_overdue():
    a = Arrivals()
    a.left("s", now=0.0, more=True)
    assert a.expected(0.5) == ["s"] and a.due_in(0.5) is None  # no round trip measured yet
    assert a.expected(1.5) == []  # a second without news: probably ended elsewhere
    a.arrived("s", now=0.1)
    a.left("s", now=1.0, more=True)
    assert a.due_in(1.02) == pytest.approx(0.08)  # its round trip was 0.1 s
    assert a.expected(1.15) == ["s"] and a.expected(1.25) == []  # overdue past two round trips
    a.left("s", now=2.0, more=False)  # its turn ended: nothing to wait for
    assert a.expected(2.01) == [] and a.due_in(2.01) is None
    a.left("t", now=3.0, more=True)
    a.forget("t")
    assert a.expected(3.01) == []


def test_a_chunk_is_sized_to_end_before_a_streaming_step_is_due():
    sizer = ChunkSizer()
    assert sizer.fit(0.1) is None  # costs unknown
    sizer.observe(0.020, 0)
    sizer.observe(0.020 + 64 * 0.001, 64)
    assert sizer.fit(None) is None
    assert sizer.fit(0.060) in (39, 40)  # a 20 ms pass plus 40 tokens at 1 ms (give or take rounding)
    assert sizer.fit(0.030) == 0  # not even the shortest chunk ends in time
