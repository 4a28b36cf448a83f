"""``groove info``: layer sizes and balanced splits, from headers alone."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .checkpoint import EMBED_KEY, HEAD_KEY, LAYER_KEY, Checkpoint


@dataclass
class Shape:
    """What a node holds for layers ``first..last``: those layers, plus the embedding on
    the first node and the norm and LM head on the last. Splits, automatic placement and
    ``groove info`` all size ranges with ``cost``."""

    num_layers: int
    layer_bytes: list[int]
    embed_bytes: int
    head_bytes: int
    _prefix: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._prefix = [0]
        for b in self.layer_bytes:
            self._prefix.append(self._prefix[-1] + b)

    def cost(self, first: int, last: int) -> int:
        return (self._prefix[last + 1] - self._prefix[first] + (self.embed_bytes if first == 0 else 0)
                + (self.head_bytes if last == self.num_layers - 1 else 0))


def layer_bytes(ckpt: Checkpoint) -> list[int]:
    sizes = [0] * ckpt.num_layers
    for name, t in ckpt.tensors.items():
        m = LAYER_KEY.match(name)
        if m and int(m.group(1)) < len(sizes):
            sizes[int(m.group(1))] += t.nbytes
    return sizes


def edge_bytes(ckpt: Checkpoint) -> tuple[int, int]:
    """Bytes only the first node holds (embedding) and only the last node holds (norm and
    lm_head; with tied embeddings the last node loads the embedding matrix as its head)."""
    embed = ckpt.tensors[EMBED_KEY].nbytes if EMBED_KEY in ckpt.tensors else 0
    head = ckpt.tensors[HEAD_KEY].nbytes if HEAD_KEY in ckpt.tensors else embed
    other = sum(t.nbytes for n, t in ckpt.tensors.items() if not LAYER_KEY.match(n) and n not in (EMBED_KEY, HEAD_KEY))
    return embed, head + other


def balanced_split(sizes: list[int], first_extra: int, last_extra: int, parts: int) -> list[list[int]] | None:
    """Contiguous ranges minimising the largest node's bytes (exact DP; layer counts are small)."""
    n = len(sizes)
    if parts > n:
        return None
    shape = Shape(n, sizes, first_extra, last_extra)

    def cost(i: int, j: int) -> int:  # layers i..j-1 on one node
        return shape.cost(i, j - 1)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                c = max(best[k - 1][i], cost(i, j))
                if c < best[k][j]:
                    best[k][j], cut[k][j] = c, i
    ranges, j = [], n
    for k in range(parts, 0, -1):
        i = cut[k][j]
        ranges.append([i, j - 1])
        j = i
    return ranges[::-1]


def describe(ckpt: Checkpoint) -> dict:
    cfg = ckpt.config
    sizes = layer_bytes(ckpt)
    embed, head = edge_bytes(ckpt)
    splits = {}
    for parts in (2, 3, 4):
        split = balanced_split(sizes, embed, head, parts)
        if split is not None:
            splits[str(parts)] = split
    return {
        "model": ckpt.ref.name,
        "fingerprint": ckpt.fingerprint(),
        "architecture": (cfg.get("architectures") or [cfg.get("model_type", "unknown")])[0],
        "model_type": cfg.get("model_type", ""),
        "num_layers": ckpt.num_layers,
        "hidden_size": cfg.get("hidden_size"),
        "vocab_size": cfg.get("vocab_size"),
        "num_parameters": sum(math.prod(t.shape) for t in ckpt.tensors.values()),
        "total_bytes": sum(t.nbytes for t in ckpt.tensors.values()),
        "bytes_per_layer": max(sizes) if sizes else 0,
        "layer_bytes": sizes,
        "embedding_bytes": embed,
        "head_bytes": head,
        "tied_embeddings": ckpt.tied_embeddings,
        "splits": splits,
    }

