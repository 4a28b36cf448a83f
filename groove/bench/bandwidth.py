"""Memory read bandwidth, measured in the same run as the benchmark it normalises."""

from __future__ import annotations

import time


def read_bandwidth(gib: float = 1.0, repeat: int = 5) -> float:
    """Bytes per second for a streaming reduction over a buffer much larger than any cache."""
    import torch

    # float32: a vectorised sum is memory-bound in every torch build (bf16 sums can be
    # bound by the conversion instead).
    n = int(gib * 2**30) // 4
    buf = torch.ones(n, dtype=torch.float32)
    buf.sum()  # fault the pages in
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return n * 4 / best
