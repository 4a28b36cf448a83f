"""Pick the chain of nodes that serves a new session.

A chain covers layers 0..L-1 exactly: each node starts where the previous one ended. Of
all such chains, the planner takes the least loaded one (fewest sessions on its busiest
node, then fewest in total), which spreads sessions across replicas.
"""

from __future__ import annotations

from functools import lru_cache

from .registry import NodeInfo, merge_ranges, missing_ranges


def plan(nodes: list[NodeInfo], num_layers: int) -> list[NodeInfo] | None:
    by_first: dict[int, list[NodeInfo]] = {}
    for n in nodes:
        by_first.setdefault(n.first, []).append(n)

    @lru_cache(maxsize=None)
    def best(layer: int) -> tuple[tuple[int, int, int], tuple[str, ...]] | None:
        if layer == num_layers:
            return (0, 0, 0), ()
        options = []
        for n in by_first.get(layer, []):
            rest = best(n.last + 1)
            if rest is None:
                continue
            (peak, total, hops), chain = rest
            load = len(n.sessions)
            options.append(((max(peak, load), total + load, hops + 1), (n.id, *chain)))
        return min(options) if options else None

    found = best(0)
    if found is None:
        return None
    ids = {n.id: n for n in nodes}
    return [ids[i] for i in found[1]]


def explain_gap(nodes: list[NodeInfo], num_layers: int) -> tuple[str, list[list[int]]]:
    """Why no chain exists: the missing layers, or the overlap that prevents chaining."""
    ranges = [(n.first, n.last) for n in nodes]
    missing = missing_ranges(ranges, num_layers)
    if missing:
        text = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in missing)
        return f"layers {text} are not served by any node", missing
    served = ", ".join(f"{a}-{b}" for a, b in sorted(set(ranges)))
    return (
        f"every layer is served but no chain of nodes covers 0-{num_layers - 1} exactly "
        f"(node ranges {served} overlap without lining up)",
        [],
    )


def coverage(nodes: list[NodeInfo]) -> list[list[int]]:
    return merge_ranges([(n.first, n.last) for n in nodes])
