"""Tokenizers for the relay's HTTP API, built from the files nodes sent (``TokenizerFiles``).

The relay has no checkpoint on disk, so the files go to a temporary directory for the
same transformers loader the consumer uses, then the directory is deleted. Building one
takes a while (a large ``tokenizer.json`` parses in about a second) and transformers is
imported only then, so a relay nobody calls through the API stays small.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from ..models.checkpoint import ModelError


class TokenizerCache:
    def __init__(self, files: dict[tuple[str, str], dict[str, bytes]]):
        self.files = files  # the relay core's table, shared: it drops entries with their last node
        self.built: dict[tuple[str, str], object] = {}
        self.lock = asyncio.Lock()

    async def get(self, model: str, fingerprint: str):
        """The tokenizer of a checkpoint, or None when no node has sent its files."""
        key = (model, fingerprint)
        files = self.files.get(key)
        if files is None:
            self.built.pop(key, None)
            return None
        async with self.lock:  # one build at a time, and never the same one twice
            if key not in self.built:
                self.built[key] = await asyncio.to_thread(build, files)
        return self.built[key]


def build(files: dict[str, bytes]):
    from ..consumer.tokenizer import load_tokenizer_from

    with tempfile.TemporaryDirectory(prefix="groove-tokenizer-") as tmp:
        for name, data in files.items():
            (Path(tmp) / Path(name).name).write_bytes(data)
        try:
            return load_tokenizer_from(Path(tmp))
        except ModelError as exc:
            raise ModelError(f"the tokenizer files the nodes sent do not load: {exc}") from None
