"""Speculative decoding: where guesses come from, how the last node checks them (greedy
and speculative sampling, the latter tested statistically), how the relay keeps the caches
in step, and end to end that greedy output is exactly what it is without speculation."""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter

import pytest
import torch

from groove.consumer.client import Client
from groove.consumer.commands import fetch_status
from groove.drafting.length import LONGEST_PAUSE, DraftLength
from groove.drafting.ngram import NgramDrafter
from groove.launch import LocalCluster
from groove.node.sampling import end_of_turn, probabilities, verify
from groove.protocol import errors as E
from groove.protocol import messages as M
from groove.protocol.messages import Sampling

from .conftest import reference_generate, run_async
from .test_relay_core import Harness

# --- guesses ----------------------------------------------------------------------------


def test_ngram_drafts_continue_the_latest_occurrence_of_the_longest_ending():
    d = NgramDrafter(max_n=3)
    text = [1, 2, 3, 4, 9, 2, 3, 5, 7, 1, 2, 3]
    # "1 2 3" occurred at the start (then 4); "2 3" most recently before 5, but the longer match wins.
    assert d.propose(text, 3) == [4, 9, 2]
    assert d.propose(text + [8], 2) == []  # "3 8", "8": never seen
    assert d.propose([5, 6, 5, 6, 5], 5) == [6, 5, 6, 5, 6]  # copies its own guesses along a repeat
    assert d.propose([5, 6, 5, 6, 5], 0) == []


def test_ngram_index_is_incremental_and_equals_a_fresh_one():
    import random

    rng = random.Random(0)
    tokens: list[int] = []
    live = NgramDrafter()
    for _ in range(300):
        tokens.extend(rng.choices(range(6), k=rng.randint(1, 3)))
        assert live.propose(tokens, 4) == NgramDrafter().propose(tokens, 4)


def test_draft_length_grows_while_guesses_hold_and_pauses_when_they_fail():
    n = DraftLength()
    assert n.next() == 4
    n.observe(4, 4)
    assert n.next() == 6
    for _ in range(10):
        n.observe(n.next(), 0)
    assert n.k == 1 and n.pause > 0  # one guess kept failing: no guesses for a while
    pauses = []
    for _ in range(12):
        while n.next() == 0:
            pass
        pauses.append(n.backoff)
        n.observe(1, 0)
    assert pauses[-1] == LONGEST_PAUSE and pauses == sorted(pauses)
    n.observe(1, 1)  # one kept: back to guessing every step, and more
    assert n.next() == 3 and n.rate is not None
    untimed = DraftLength(timed=False)
    untimed.observe(0, 0, 0.5)
    untimed.observe(4, 1, 9.0)
    assert untimed.plain_s is None and untimed.extra_s is None and untimed.next() == 3
    fixed = DraftLength(fixed=5)
    fixed.observe(5, 0)
    assert fixed.next() == 5


def test_draft_length_weighs_what_a_guess_saves_against_what_it_costs():
    def settle(plain_s: float, per_guess_s: float, hold: float) -> DraftLength:
        n = DraftLength()
        for i in range(60):
            k = n.next()
            kept = 0
            while kept < k and (i * 7 + kept) % 10 < hold * 10:  # a fixed share of guesses holds
                kept += 1
            n.observe(k, kept, plain_s + k * per_guess_s)
        return n

    slow_link = settle(0.085, 0.002, 0.5)  # 80 ms of hops per step: guessing pays even at 50%
    assert slow_link.best() >= 4 and slow_link.drafted > 100
    local = settle(0.0065, 0.006, 0.3)  # a guess costs a decode step's time: not worth it at 30%
    assert local.best() == 0 and local.drafted < 40
    sure = settle(0.0065, 0.006, 1.0)  # but when guesses always hold it is
    assert sure.best() == sure.most


# --- verification on the last node ------------------------------------------------------


def test_greedy_verification_keeps_guesses_up_to_the_first_miss():
    logits = torch.full((4, 10), -1.0)
    for row, best in enumerate([3, 7, 2, 8]):
        logits[row, best] = 5.0
    greedy, g = Sampling(temperature=0), torch.Generator()
    assert verify(logits, [3, 7, 2], greedy, g) == [3, 7, 2, 8]  # all kept, plus the next one
    assert verify(logits, [3, 1, 2], greedy, g) == [3, 7]  # the miss is replaced by the model's token
    assert verify(logits, [0, 7, 2], greedy, g) == [3]


def test_end_of_turn_cuts_at_a_stop_token_or_the_length():
    assert end_of_turn([4, 5, 6], {9}, 10) == ([4, 5, 6], "")
    assert end_of_turn([4, 9, 6], {9}, 10) == ([4, 9], "stop")
    assert end_of_turn([4, 5, 6], {9}, 2) == ([4, 5], "length")
    assert end_of_turn([4], set(), 1) == ([4], "length")


def chi_square_p(observed: list[int], expected: list[float]) -> float:
    """The p-value of Pearson's goodness-of-fit test (categories with expectation 0 must be
    empty, and are left out)."""
    stat, df = 0.0, -1
    for o, e in zip(observed, expected):
        if e == 0:
            assert o == 0
            continue
        stat += (o - e) ** 2 / e
        df += 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.parametrize("sampling", [Sampling(temperature=1.0, top_p=1.0), Sampling(temperature=0.8, top_p=0.9, top_k=5)],
                         ids=["plain", "top-k-top-p"])
def test_speculative_sampling_leaves_the_distribution_unchanged(sampling):
    """Over a tiny vocabulary, the first token of a verified step is distributed as the
    model's own sampling says whatever the guess (likely, unlikely, or one that sampling
    can never pick); after a kept guess, the next token follows the next position's. The
    generator is seeded, so the test is deterministic; the significance level (0.001)
    would also make a false alarm rare if it were not."""
    g = torch.Generator().manual_seed(1234)
    logits = torch.randn(2, 8, generator=g) * 1.5
    p0, p1 = probabilities(logits[0], sampling), probabilities(logits[1], sampling)
    order = torch.argsort(p0, descending=True).tolist()
    trials = 20000
    for guess in (order[0], order[3], order[-1]):
        first, second = Counter(), Counter()
        for _ in range(trials):
            out = verify(logits, [guess], sampling, g)
            first[out[0]] += 1
            if len(out) == 2:
                assert out[0] == guess
                second[out[1]] += 1
        assert chi_square_p([first[t] for t in range(8)], [trials * float(q) for q in p0]) > 1e-3
        kept = first[guess]
        assert abs(kept / trials - float(p0[guess])) < 5 * math.sqrt(0.25 / trials) + 1e-9
        if kept > 500:
            assert chi_square_p([second[t] for t in range(8)], [kept * float(q) for q in p1]) > 1e-3



@pytest.mark.parametrize("support", [8, 4], ids=["full", "truncated"])
def test_sampled_guesses_with_their_distribution_keep_the_model_distribution(support):
    """A draft model samples its guess from its own q and sends q along: the first token
    is still distributed as p, and the closer q is to p the more guesses are kept."""
    from groove.protocol.messages import DraftDist

    sampling = Sampling(temperature=1.0, top_p=1.0)
    g = torch.Generator().manual_seed(99)
    logits = torch.randn(2, 8, generator=g) * 1.5
    p0 = probabilities(logits[0], sampling)
    trials = 20000
    for name, draft_logits in (("near", logits[0] + 0.3 * torch.randn(8, generator=g)), ("far", torch.randn(8, generator=g))):
        q = probabilities(draft_logits, sampling)
        top = torch.topk(q, support)
        ids, probs = top.indices.tolist(), (top.values / top.values.sum()).tolist()
        dist = DraftDist(ids=ids, probs=probs)
        first, kept = Counter(), 0
        for _ in range(trials):
            guess = ids[int(torch.multinomial(torch.tensor(probs), 1, generator=g))]
            out = verify(logits, [guess], sampling, g, [dist])
            first[out[0]] += 1
            kept += len(out) == 2
        assert chi_square_p([first[t] for t in range(8)], [trials * float(x) for x in p0]) > 1e-3, name
        # Speculative sampling keeps a guess with probability sum(min(p, q)).
        qd = torch.zeros(8)
        qd[ids] = torch.tensor(probs)
        assert abs(kept / trials - float(torch.minimum(p0, qd).sum())) < 0.02, name


# --- the relay ---------------------------------------------------------------------------


def _open_two_nodes(h: Harness) -> str:
    h.node("A", 0, 1)
    h.node("B", 2, 3)
    h.consumer("C")
    return h.open("C")[-1][1].session


def test_relay_drafts_from_the_session_and_rewinds_to_the_kept_guesses():
    h = Harness()
    sid = _open_two_nodes(h)
    (dst, fwd, _), = h.send("C", M.Generate(session=sid, tokens=[5, 6, 7, 5, 6], max_tokens=20, speculative="ngram"))
    assert fwd.drafts == [] and fwd.count == 5  # the prompt goes through without guesses
    out = h.send("B", M.Result(session=sid, seq=fwd.seq, token=7))
    fwd = out[1][1]
    assert fwd.tokens == [7, 5, 6, 7, 5] and fwd.drafts == [5, 6, 7, 5] and fwd.start == 5 and fwd.count == 5
    # Two guesses kept, then the last node's own token: the next step starts after the kept ones.
    out = h.send("B", M.Result(session=sid, seq=fwd.seq, token=9, accepted=[5, 6]))
    assert out[0][0] == "C" and out[0][1].accepted == [5, 6]
    nxt = out[1][1]
    assert h.relay.sessions.get(sid).tokens == [5, 6, 7, 5, 6, 7, 5, 6, 9]
    assert nxt.start == 8 and nxt.tokens[0] == 9 and nxt.remaining == 20 - 4
    assert h.relay.drafted == 4 and h.relay.accepted == 2
    # A node claiming guesses that were not sent loses the session, with an error to the consumer.
    out = h.send("B", M.Result(session=sid, seq=nxt.seq, token=1, accepted=[4, 4]))
    assert any(c == "C" and isinstance(m, M.Error) and m.code == E.NODE_FAILED for c, m, _ in out)
    assert h.relay.sessions.get(sid) is None


def test_relay_never_guesses_past_the_turn_and_checks_requests():
    h = Harness()
    sid = _open_two_nodes(h)
    (_, fwd, _), = h.send("C", M.Generate(session=sid, tokens=[1, 2, 1, 2, 1], max_tokens=3, speculative="ngram", draft_tokens=8))
    out = h.send("B", M.Result(session=sid, seq=fwd.seq, token=2))
    assert out[1][1].drafts == [1]  # 2 tokens left in the turn: one guess and the token after it
    for bad, why in [(dict(speculative="ngram", want_logits=True), "want_logits"), (dict(drafts=[1], speculative="ngram"), "not both"),
                     (dict(speculative="ngram", draft_tokens=99), "at most"), (dict(drafts=[1000]), "outside the vocabulary")]:
        h2 = Harness()
        sid2 = _open_two_nodes(h2)
        (c, err, _), = h2.send("C", M.Generate(session=sid2, tokens=[1], max_tokens=3, **bad))
        assert isinstance(err, M.Error) and why in err.message
        assert h2.relay.sessions.get(sid2).tokens == []  # a refused request changes nothing


def test_relay_checks_the_distributions_of_sampled_guesses():
    from groove.protocol.messages import DraftDist

    good = DraftDist(ids=[4, 5], probs=[0.25, 0.75])
    for dists, why in [([good, good], "2 draft distributions for 1"), ([DraftDist(ids=[4, 4], probs=[0.5, 0.5])], "distinct"),
                       ([DraftDist(ids=[4, 5], probs=[0.5, 0.6])], "sum to 1"), ([DraftDist(ids=[5, 6], probs=[0.5, 0.5])], "positive"),
                       ([DraftDist(ids=[4, 500], probs=[0.5, 0.5])], "inside the vocabulary")]:
        h = Harness()
        sid = _open_two_nodes(h)
        (_, err, _), = h.send("C", M.Generate(session=sid, tokens=[1], drafts=[4], draft_dists=dists, max_tokens=3))
        assert isinstance(err, M.Error) and why in err.message, (why, err)
    h = Harness()
    sid = _open_two_nodes(h)
    (_, fwd, _), = h.send("C", M.Generate(session=sid, tokens=[1], drafts=[5], draft_dists=[good], max_tokens=3, one_step=True))
    assert fwd.draft_dists == [good] and fwd.drafts == [5]


def test_consumer_drafts_go_with_one_step_and_the_turn_ends_after_it():
    h = Harness()
    sid = _open_two_nodes(h)
    (_, fwd, _), = h.send("C", M.Generate(session=sid, tokens=[3, 4], max_tokens=10, one_step=True))
    out = h.send("B", M.Result(session=sid, seq=fwd.seq, token=8))
    assert [(c, type(m).__name__) for c, m, _ in out] == [("C", "Result"), ("A", "TurnEnd")]
    (_, fwd, _), = h.send("C", M.Generate(session=sid, tokens=[], drafts=[6, 7], max_tokens=9, one_step=True))
    assert fwd.tokens == [8, 6, 7] and fwd.drafts == [6, 7] and fwd.start == 2
    h.send("B", M.Result(session=sid, seq=fwd.seq, token=1, accepted=[6]))
    s = h.relay.sessions.get(sid)
    assert s.tokens == [3, 4, 8, 6, 1] and s.processed == 4 and s.turn is None


# --- end to end ---------------------------------------------------------------------------

REPEATING = [5, 17, 33, 100, 7, 9] * 4
PLAIN = list(range(40, 90))


async def _generate(address, prompt, n, *, speculative="", draft_tokens=0, sampling=None, model="llama"):
    async with Client(address) as c:
        s = await c.open_session(model, sampling or Sampling(temperature=0), wait=30)
        steps = [st async for st in c.generate(s, prompt, n, speculative=speculative, draft_tokens=draft_tokens)]
        await c.close_session(s)
    return steps


def test_greedy_output_with_ngram_speculation_is_exactly_transformers(model_paths):
    path = model_paths["llama"]
    with LocalCluster(path, [(0, 2), (3, 5)]) as cluster:
        for prompt in (REPEATING, PLAIN):
            expected = reference_generate(path, prompt, 40)
            for k in (0, 5):
                steps = run_async(_generate(cluster.address, prompt, 40, speculative="ngram", draft_tokens=k))
                assert [s.token for s in steps] == expected, (prompt[:4], k)
                assert steps[-1].finish and not any(s.finish for s in steps[:-1])
        relay = fetch_status(cluster.address)["relay"]
        # Guesses were kept (whole steps' worth of tokens saved) and rejected (caches rewound).
        assert 0 < relay["accepted_tokens"] < relay["drafted_tokens"]

        # Several turns, each speculating, with another session batched alongside.
        async def chat():
            async with Client(cluster.address) as c:
                s = await c.open_session("llama", Sampling(temperature=0), wait=10)
                history, replies = [], []
                for turn in ([5, 17, 33, 100, 7, 9] * 2, [7, 9, 5], [1, 2, 3, 1, 2]):
                    history += turn
                    reply = [st.token async for st in c.generate(s, turn, 12, speculative="ngram")]
                    replies.append((list(history), reply))
                    history += reply
                return replies

        async def both():
            return await asyncio.gather(chat(), _generate(cluster.address, PLAIN, 30))

        replies, plain = run_async(both())
    for history, reply in replies:
        assert reply == reference_generate(path, history, 12)[: len(reply)] and len(reply) >= 1
    assert [s.token for s in plain] == reference_generate(path, PLAIN, 30)


def test_bfloat16_speculation_gives_the_tokens_of_decoding_one_at_a_time(model_paths):
    """bfloat16 is where kernels round a one-row call unlike a many-row one: guessed rows
    must run as decode steps do, or a verified token could differ from the plain one."""
    path = model_paths["qwen2"]
    with LocalCluster(path, [(0, 1), (2, 3)], dtype="bfloat16") as cluster:
        for prompt in (REPEATING, PLAIN):
            plain = [s.token for s in run_async(_generate(cluster.address, prompt, 48, model="qwen2"))]
            fast = [s.token for s in run_async(_generate(cluster.address, prompt, 48, model="qwen2", speculative="ngram", draft_tokens=4))]
            assert fast == plain
        assert fetch_status(cluster.address)["relay"]["accepted_tokens"] > 0


def test_sampled_output_keeps_its_distribution_end_to_end(models_dir):
    """Many seeded sessions through a real pipeline on a 12-token vocabulary: the tokens
    after verified steps are distributed as without speculation (a chi-square test of
    homogeneity at the 0.001 level)."""
    from groove.models.synthetic import build_checkpoint

    path = build_checkpoint(models_dir / "tiny-vocab", "llama", vocab_size=12, num_layers=2, seed=7, tokenizer=False)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    runs = 240

    async def many(speculative: str) -> list[list[int]]:
        async with Client(cluster.address) as c:
            async def one(seed: int) -> list[int]:
                s = await c.open_session("tiny-vocab", Sampling(temperature=1.0, top_p=1.0, seed=seed), wait=10)
                out = [st.token async for st in c.generate(s, prompt, 4, speculative=speculative, draft_tokens=3, ignore_eos=True)]
                await c.close_session(s)
                return out

            results = []
            for first in range(0, runs, 48):
                results += await asyncio.gather(*(one(seed) for seed in range(first, min(first + 48, runs))))
            return results

    with LocalCluster(path, [(0, 0), (1, 1)]) as cluster:
        base = run_async(many(""))
        spec = run_async(many("ngram"))
        relay = fetch_status(cluster.address)["relay"]
    assert relay["drafted_tokens"] > runs // 2 and relay["accepted_tokens"] > 0
    assert all(len(r) == 4 for r in base + spec)
    for position in (1, 2, 3):  # the first token comes from the prompt step, which has no guesses
        a = Counter(r[position] for r in base)
        b = Counter(r[position] for r in spec)
        cats = sorted(set(a) | set(b))
        total = [a[t] + b[t] for t in cats]
        stat = sum((x[t] - runs * n / (2 * runs)) ** 2 / (runs * n / (2 * runs)) for x in (a, b) for t, n in zip(cats, total))
        df = len(cats) - 1
        p = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))
        assert p > 1e-3, (position, a, b)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_guessed_rows_give_the_logits_of_decode_steps_bit_for_bit(model_paths, dtype):
    """In one process, on a whole model: the logits after each guess of a speculative step
    are exactly those of feeding the same tokens one decode step at a time, and a rejected
    guess's positions are dropped so the next step matches too."""
    from groove.models import checkpoint
    from groove.node.loader import load_slice
    from groove.node.shard import Shard

    ckpt = checkpoint.load(str(model_paths["qwen2"]))
    shard = Shard(load_slice(ckpt, 0, 3, torch.device("cpu"), getattr(torch, dtype)))
    prompt, guesses = [5, 17, 33, 100, 7, 9], [40, 41, 42, 43]
    one = shard.new_session(Sampling(temperature=0))
    shard.step(one, 0, tokens=prompt)
    stepwise = [shard.step(one, len(prompt) + i, tokens=[t]) for i, t in enumerate([9, *guesses])]
    spec = shard.new_session(Sampling(temperature=0))
    shard.step(spec, 0, tokens=prompt)
    from groove.node.shard import Piece

    rows = shard.run([Piece(spec, len(prompt), tokens=[9, *guesses], drafts=len(guesses))])[0]
    assert rows.shape[0] == len(guesses) + 1
    for i, want in enumerate(stepwise):
        assert torch.equal(rows[i], want), f"row {i}"
    # Keep two guesses: the next step starts after them, and matches decoding one at a time.
    after = shard.step(spec, len(prompt) + 3, tokens=[77])
    again = shard.new_session(Sampling(temperature=0))
    shard.step(again, 0, tokens=prompt)
    for i, t in enumerate([9, 40, 41]):
        shard.step(again, len(prompt) + i, tokens=[t])
    assert torch.equal(after, shard.step(again, len(prompt) + 3, tokens=[77]))
    with pytest.raises(Exception, match="cache holds"):
        shard.step(spec, 2, tokens=[1])  # only unverified positions can be dropped


def test_a_local_draft_model_gives_the_same_greedy_tokens(model_paths, models_dir):
    """The consumer drafts with a small model of its own; whether it guesses well (the
    served model itself) or badly (another, smaller one), greedy output is transformers',
    across turns of a session too."""
    from groove.drafting.model import DraftModel
    from groove.models.synthetic import build_checkpoint

    path = model_paths["llama"]
    small = build_checkpoint(models_dir / "llama-draft", "llama", num_layers=2, seed=11)
    with LocalCluster(path, [(0, 2), (3, 5)]) as cluster:
        for draft_path in (path, small):
            drafter = DraftModel(draft_path)

            async def run():
                async with Client(cluster.address) as c:
                    s = await c.open_session("llama", Sampling(temperature=0), wait=10)
                    first = [st async for st in c.generate_drafted(s, REPEATING, 30, drafter)]
                    history = REPEATING + [st.token for st in first]
                    second = [st async for st in c.generate_drafted(s, [7, 9, 5], 20, drafter, history=history, ignore_eos=True)]
                    await c.close_session(s)
                    return first, history, second

            before = fetch_status(cluster.address)["relay"]
            first, history, second = run_async(run())
            after = fetch_status(cluster.address)["relay"]
            assert [st.token for st in first] == reference_generate(path, REPEATING, 30)
            assert [st.token for st in second] == reference_generate(path, history + [7, 9, 5], 20)
            assert first[-1].finish and second[-1].finish == "length" and len(second) == 20
            drafted, accepted = after["drafted_tokens"] - before["drafted_tokens"], after["accepted_tokens"] - before["accepted_tokens"]
            if draft_path == path:
                assert drafted > 0 and accepted == drafted  # the served model guesses itself right
            else:
                assert drafted > accepted


def test_a_sampling_draft_model_guesses_from_its_own_distribution(model_paths):
    """Sampling with the served model as its own draft model: q is p (up to rounding and
    the cut to 256 tokens; the test model is flat, so the temperature is low enough for
    those to hold nearly all of p), so nearly every guess is kept, where certain (greedy)
    guesses would be kept only with probability p(guess); and seeded runs repeat."""
    from groove.drafting.model import DraftModel

    path = model_paths["llama"]
    drafter = DraftModel(path)
    with LocalCluster(path, [(0, 2), (3, 5)]) as cluster:
        async def run(seed: int) -> list[int]:
            async with Client(cluster.address) as c:
                sampling = Sampling(temperature=0.3, top_p=1.0, seed=seed)
                s = await c.open_session("llama", sampling, wait=10)
                out = [st.token async for st in c.generate_drafted(s, REPEATING, 40, drafter, sampling=sampling, ignore_eos=True)]
                await c.close_session(s)
                return out

        first, again = run_async(run(3)), run_async(run(3))
        relay = fetch_status(cluster.address)["relay"]
        # Seeded n-gram speculation repeats too (its lengths then follow acceptance, not the clock).
        seeded = Sampling(temperature=0.8, top_p=0.95, seed=11)
        ngram = [[st.token for st in run_async(_generate(cluster.address, REPEATING, 40, speculative="ngram", sampling=seeded))]
                 for _ in range(2)]
    assert ngram[0] == ngram[1]
    assert first == again and len(first) == 40
    assert relay["drafted_tokens"] > 20 and relay["accepted_tokens"] / relay["drafted_tokens"] > 0.75


def test_generate_command_speculates_and_refuses_bad_choices(model_paths, tmp_path):
    from .conftest import groove_cli

    path = model_paths["llama"]
    with LocalCluster(path, [(0, 5)]) as cluster:
        args = ["generate", "--relay", cluster.address, "--model", str(path), "--prompt", "a b a b a b", "--temperature", "0",
                "--max-tokens", "16", "--json"]
        plain = groove_cli(*args)
        for extra in (["--speculative", "ngram"], ["--speculative", "ngram", "--draft-tokens", "6"], ["--draft-model", str(path)]):
            out = groove_cli(*args, *extra)
            assert out.returncode == 0, out.stderr
            assert json.loads(out.stdout)["token_ids"] == json.loads(plain.stdout)["token_ids"]
        for extra, why in ((["--speculative", "ngram", "--draft-model", str(path)], "not both"), (["--draft-tokens", "99"], "--draft-tokens"),
                           (["--draft-model", str(tmp_path / "nothing")], "--draft-model")):
            out = groove_cli(*args, *extra)
            assert out.returncode != 0 and why in out.stderr and "Traceback" not in out.stderr, out.stderr
