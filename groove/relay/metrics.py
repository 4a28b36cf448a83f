"""``GET /metrics``: the relay's state in Prometheus' text format.

Computed at scrape time from the relay's own tables (no second bookkeeping), with
prometheus_client's exposition format.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class TokenRate:
    """Tokens per second over a sliding window of recent generated tokens."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self.stamps: deque[float] = deque(maxlen=100_000)

    def add(self, now: float | None = None) -> None:
        self.stamps.append(time.monotonic() if now is None else now)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self.stamps and now - self.stamps[0] > self.window_s:
            self.stamps.popleft()
        return len(self.stamps) / self.window_s


class RelayCollector:
    def __init__(self, server):
        self.server = server

    def collect(self):
        relay = self.server.relay
        yield GaugeMetricFamily("groove_sessions", "Open sessions", value=len(relay.sessions.sessions))
        yield CounterMetricFamily("groove_sessions_opened", "Sessions opened since start", value=relay.sessions_opened)
        yield CounterMetricFamily("groove_tokens_generated", "Tokens generated since start", value=relay.tokens_generated)
        yield GaugeMetricFamily("groove_tokens_per_second", "Tokens generated per second, last 10 s", value=relay.token_rate.rate())
        yield CounterMetricFamily("groove_drafted_tokens", "Speculative guesses sent to be verified", value=relay.drafted)
        yield CounterMetricFamily("groove_accepted_tokens", "Speculative guesses the pipeline kept", value=relay.accepted)
        yield CounterMetricFamily("groove_failovers", "Sessions moved to another chain after losing a node", value=relay.failovers)
        yield GaugeMetricFamily("groove_connections", "Open WebSocket connections", value=len(self.server.sockets))
        yield GaugeMetricFamily("groove_queue_depth", "Frames waiting in the fullest outbound queue",
                                value=max((q.qsize() for q in self.server.queues.values()), default=0))
        nodes = sorted(relay.registry.nodes.values(), key=lambda n: (n.model, n.first, n.id))
        labels = ["node", "model", "layers"]
        healthy = GaugeMetricFamily("groove_node_healthy", "1 if the node's heartbeat is recent", labels=labels)
        sessions = GaugeMetricFamily("groove_node_sessions", "Sessions routed to the node", labels=labels)
        tokens = CounterMetricFamily("groove_node_tokens_processed", "Token positions the node has computed", labels=labels)
        compute = CounterMetricFamily("groove_node_compute_seconds", "Time the node spent computing steps", labels=labels)
        step = GaugeMetricFamily("groove_node_step_seconds", "Mean compute time per forward pass", labels=labels)
        batch = GaugeMetricFamily("groove_node_batch_size", "Mean session steps per forward pass", labels=labels)
        now = time.monotonic()
        for n in nodes:
            lv = [n.id, n.model, f"{n.first}-{n.last}"]
            healthy.add_metric(lv, 1.0 if now - n.last_seen <= relay.node_timeout else 0.0)
            sessions.add_metric(lv, len(n.sessions))
            tokens.add_metric(lv, n.tokens_processed)
            compute.add_metric(lv, n.compute_s)
            step.add_metric(lv, n.compute_s / n.steps if n.steps else 0.0)
            batch.add_metric(lv, n.pieces / n.steps if n.steps else 0.0)
        yield from (healthy, sessions, tokens, compute, step, batch)


def render(server) -> bytes:
    registry = CollectorRegistry()
    registry.register(RelayCollector(server))
    return generate_latest(registry)
