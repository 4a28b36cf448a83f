"""The relay's view of the nodes: what each serves, how loaded it is, when it last spoke."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class NodeInfo:
    id: str
    conn: str
    model: str
    fingerprint: str
    num_layers: int
    first: int
    last: int
    device: str
    dtype: str
    hidden_size: int
    vocab_size: int
    weights: str = ""
    kernels: list[str] = field(default_factory=list)
    load_s: float = 0.0
    rss_bytes: int = 0
    peak_rss_bytes: int = 0
    max_positions: int = 0
    machine: str = ""
    tokens_processed: int = 0
    cached_sessions: int = 0  # the node's own count of sessions holding a KV cache
    compute_s: float = 0.0
    steps: int = 0
    pieces: int = 0
    sessions: set[str] = field(default_factory=set)
    registered_at: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)

    def as_status(self) -> dict:
        return {
            "id": self.id,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "layers": [self.first, self.last],
            "device": self.device,
            "dtype": self.dtype,
            "weights": self.weights,
            "kernels": self.kernels,
            "sessions": len(self.sessions),
            "cached_sessions": self.cached_sessions,
            "tokens_processed": self.tokens_processed,
            "compute_s": round(self.compute_s, 4),
            "steps": self.steps,
            "pieces": self.pieces,
            "rss_bytes": self.rss_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
            "load_s": round(self.load_s, 3),
            "last_heartbeat_s": round(time.monotonic() - self.last_seen, 3),
        }


def merge_ranges(ranges: list[tuple[int, int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def missing_ranges(ranges: list[tuple[int, int]], num_layers: int) -> list[list[int]]:
    gaps, nxt = [], 0
    for a, b in merge_ranges(ranges):
        if a > nxt:
            gaps.append([nxt, a - 1])
        nxt = max(nxt, b + 1)
    if nxt < num_layers:
        gaps.append([nxt, num_layers - 1])
    return gaps


class Registry:
    def __init__(self) -> None:
        self.nodes: dict[str, NodeInfo] = {}

    def add(self, node: NodeInfo) -> None:
        self.nodes[node.id] = node

    def remove(self, node_id: str) -> NodeInfo | None:
        return self.nodes.pop(node_id, None)

    def by_conn(self, conn: str) -> NodeInfo | None:
        return next((n for n in self.nodes.values() if n.conn == conn), None)

    def serving(self, model: str, fingerprint: str | None = None) -> list[NodeInfo]:
        return [n for n in self.nodes.values() if n.model == model and (not fingerprint or n.fingerprint == fingerprint)]

    def groups(self) -> dict[tuple[str, str], list[NodeInfo]]:
        """Nodes by (model name, fingerprint): only nodes of one group are ever chained."""
        out: dict[tuple[str, str], list[NodeInfo]] = {}
        for n in self.nodes.values():
            out.setdefault((n.model, n.fingerprint), []).append(n)
        return out
