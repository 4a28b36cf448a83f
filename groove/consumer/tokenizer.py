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
    return load_tokenizer_from(tokenizer_dir(ref))


def load_tokenizer_from(path: Path):
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

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        text = self.text()
        delta, self.emitted = text[self.emitted :], len(text)
        return delta


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation in the model's own chat template; models without one get
    plain "Role: text" lines. ``groove chat`` and the relay's chat API both render here."""
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False))
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return tokenizer.encode(text + ("Assistant:" if add_generation_prompt else ""))


class StopFilter:
    """Cuts a text stream before the first stop string to appear in it. Text that might be
    the start of a stop string is held back until the next delta shows whether it is."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        self.pending += delta
        # The stop string completed first wins (the longest, if several end together), so
        # the cut does not depend on how the text arrived in pieces.
        hits = [(i + len(s), -len(s), i) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)[2]], ""
            return out
        hold = max((k for s in self.stops for k in range(min(len(s) - 1, len(self.pending)), 0, -1)
                    if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
