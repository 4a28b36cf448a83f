"""Groove: one causal LM served by a pipeline of machines, each holding a slice of its layers."""

__version__ = "0.1.0"


def cache_dir(*parts: str):
    """``$XDG_CACHE_HOME/groove/...`` (``~/.cache`` when unset): what Groove builds once
    and reuses (synthetic checkpoints, compiled kernels)."""
    import os
    from pathlib import Path

    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base, "groove", *parts)
