"""Published model shapes, built as randomly initialised checkpoints.

No weights can be downloaded here, but compute and memory traffic depend only on the
shapes: a random checkpoint with a model's exact configuration costs what the model costs.
"""

from __future__ import annotations

from pathlib import Path

from .. import cache_dir

SHAPES: dict[str, tuple[str, dict]] = {
    "qwen2.5-0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                                   num_kv_heads=2, tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                   max_position_embeddings=32768)),
    "qwen2.5-1.5b": ("qwen2", dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                                   num_kv_heads=2, tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                   max_position_embeddings=32768)),
    "llama-3.2-1b": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                                   num_kv_heads=8, tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=131072,
                                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8192})),
    # A tiny shape for quick runs and the test suite.
    "tiny": ("llama", dict(vocab_size=512, hidden_size=64, intermediate_size=192, num_layers=4, num_heads=4, num_kv_heads=2)),
}


def cache_root() -> Path:
    return cache_dir("synthetic")


def synthetic_checkpoint(name: str, dtype: str = "bfloat16") -> Path:
    """Build (once) and return a random checkpoint with the named model's configuration."""
    if name not in SHAPES:
        raise KeyError(f"unknown synthetic model {name!r}; choose from {', '.join(SHAPES)}")
    arch, shape = SHAPES[name]
    path = cache_root() / f"{name}-{dtype}"
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        from ..models.synthetic import build_checkpoint

        print(f"building synthetic {name} ({dtype}) in {path} (first use only)", flush=True)
        build_checkpoint(path, arch, dtype=dtype, initializer_range=0.02, **shape)
    return path
