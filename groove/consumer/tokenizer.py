"""The consumer's tokenizer: only the small tokenizer files, never the weights.

``PreTrainedTokenizerFast`` over ``tokenizer.json`` is the same tokenizer transformers'
AutoTokenizer builds for these checkpoints, without importing torch (about 2.5 s faster
to start); checkpoints without a ``tokenizer.json`` go through AutoTokenizer.
"""

from __future__ import annotations

from pathlib import Path

from ..models import checkpoint
from ..models.checkpoint import ModelError, ModelRef


def tokenizer_dir(ref: ModelRef) -> Path:
    if ref.local_dir is not None:
        return ref.local_dir
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref.source, allow_patterns=checkpoint.TOKENIZER_PATTERNS))
    except Exception as exc:  # the hub client raises many kinds of network errors
        raise ModelError(f"cannot fetch the tokenizer of {ref.source}: {exc}") from None


def load_tokenizer(ref: ModelRef):
    path = tokenizer_dir(ref)
    try:
        if (path / "tokenizer.json").is_file():
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(path))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {path}: {exc}") from None


class StreamDecoder:
    """Turns a growing list of token ids into text deltas, holding back incomplete
    multi-byte characters until the token that completes them arrives."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):
            return ""
        delta, self.emitted = text[self.emitted :], len(text)
        return delta

    def text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=self.skip)
