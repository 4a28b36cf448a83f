"""Which checkpoints a node can serve.

A node runs a slice of the model through transformers' own ``*Model.forward`` (masks,
rotary embeddings, sliding windows and all), built for a config cut down to the slice's
layers. That is only correct for architectures whose forward does nothing outside the
decoder layers except embed at the start and norm at the end; these are the ones checked
against single-process transformers in the test suite.
"""

from __future__ import annotations

from .checkpoint import ModelError

SUPPORTED = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def check_supported(config: dict) -> str:
    """Return the model_type, or raise a ModelError naming the unsupported architecture."""
    model_type = config.get("model_type", "")
    if model_type in SUPPORTED:
        return model_type
    arch = ", ".join(config.get("architectures") or []) or "unknown"
    names = ", ".join(sorted(SUPPORTED.values()))
    raise ModelError(f"unsupported architecture {arch} (model_type {model_type!r}); Groove supports {names}")
