"""Where a node started with ``--layers auto`` should go.

Uncovered layers come first: the node takes the first gap from its start, as many layers
as its memory allows, so every range it is given lines up with its neighbours and chains.
When every layer is served, the node replicates the existing range with the least
redundancy that fits its memory, preferring the largest such range.
"""

from __future__ import annotations

from ..models.info import Shape

__all__ = ["PlacementError", "Shape", "parse_size", "place"]


class PlacementError(Exception):
    pass


def place(shape: Shape, budget: int, served: list[tuple[int, int]]) -> tuple[int, int]:
    cover = [0] * shape.num_layers
    for a, b in served:
        for layer in range(a, b + 1):
            cover[layer] += 1
    if 0 in cover:
        first = cover.index(0)
        if shape.cost(first, first) > budget:
            raise PlacementError(f"layer {first} alone needs {shape.cost(first, first) / 1e6:.0f} MB, more than the "
                                 f"{budget / 1e6:.0f} MB this node offers")
        last = first
        while last + 1 < shape.num_layers and cover[last + 1] == 0 and shape.cost(first, last + 1) <= budget:
            last += 1
        return first, last
    candidates = sorted(set(served) | {(0, shape.num_layers - 1)})
    fitting = [(min(cover[a : b + 1]), -(b - a), a, b) for a, b in candidates if shape.cost(a, b) <= budget]
    if not fitting:
        smallest = min(shape.cost(a, b) for a, b in candidates)
        raise PlacementError(f"every layer is served and the smallest range to replicate needs {smallest / 1e6:.0f} MB, "
                             f"more than the {budget / 1e6:.0f} MB this node offers")
    _, _, a, b = min(fitting)
    return a, b


def parse_size(text: str) -> int:
    """'8GB', '512MiB', '1.5G' or a plain byte count."""
    units = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "KIB": 2**10, "M": 10**6, "MB": 10**6, "MIB": 2**20,
             "G": 10**9, "GB": 10**9, "GIB": 2**30, "T": 10**12, "TB": 10**12, "TIB": 2**40}
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"{text!r} is not a size like 8GB or 512MiB") from None
    if unit not in units or value <= 0:
        raise ValueError(f"{text!r} is not a size like 8GB or 512MiB")
    return int(value * units[unit])
