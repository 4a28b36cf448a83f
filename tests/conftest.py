"""Shared fixtures: real checkpoints built from tiny configs, real local clusters, and the
single-process transformers reference every distributed result is compared with."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from groove.launch import LocalCluster

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
# Relays started by the tests keep their generated tokens here, where every node and
# consumer the tests start (on "the relay's machine") finds them: authentication stays on.
os.environ["GROOVE_CONFIG_DIR"] = tempfile.mkdtemp(prefix="groove-config-")
ROOT = Path(__file__).resolve().parent.parent

# Each architecture gets its own seed so no two test checkpoints share weights.
ARCHS = {"llama": 1, "qwen2": 2, "qwen3": 3, "mistral": 4}


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def model_paths(models_dir) -> dict[str, Path]:
    """One small checkpoint per supported architecture (llama has 6 layers, the rest 4)."""
    from groove.models.synthetic import build_checkpoint

    paths = {}
    for arch, seed in ARCHS.items():
        layers = 6 if arch == "llama" else 4
        paths[arch] = build_checkpoint(models_dir / arch, arch, num_layers=layers, seed=seed)
    return paths


@pytest.fixture
def cluster_factory():
    started: list[LocalCluster] = []

    def make(model, ranges, **kw) -> LocalCluster:
        c = LocalCluster(model, ranges, **kw)
        started.append(c)
        return c.__enter__()

    yield make
    for c in started:
        c.stop()


def reference_generate(path: Path, prompt_ids: list[int], max_new_tokens: int, dtype: str = "float32", **kw) -> list[int]:
    """Greedy (or seeded sampled) generation by transformers in this process."""
    import torch
    from transformers import AutoModelForCausalLM

    model = _reference_model(str(path), dtype)
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, **kw)
    return out[0, len(prompt_ids):].tolist()


_REFERENCE_CACHE: dict = {}


def _reference_model(path: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    key = (path, dtype)
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    return _REFERENCE_CACHE[key]


def reference_logits(path: Path, ids: list[int], dtype: str = "float32"):
    import torch

    with torch.inference_mode():
        return _reference_model(str(path), dtype)(torch.tensor([ids])).logits[0, -1].float()


def run_async(coro):
    return asyncio.run(coro)


def groove_cli(*args: str, timeout: float = 120, env: dict | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m groove ARGS`` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "groove", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, **(env or {})),
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
    )


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            return value
        time.sleep(interval)


def cpu_info() -> str:
    """/proc/cpuinfo (vendor, flags), or "" where there is none: what the kernel tests ask
    of the CPU."""
    path = Path("/proc/cpuinfo")
    return path.read_text() if path.is_file() else ""


def c_compiler_on_x86() -> bool:
    """Where groove's C kernels can be built at all: a C compiler on x86-64."""
    import platform
    import shutil

    return shutil.which("cc") is not None and platform.machine() == "x86_64"
