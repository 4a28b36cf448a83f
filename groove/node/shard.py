"""Run one step of one session through this node's slice.

Each session owns a transformers ``DynamicCache`` sized to the slice's own layers; a step
appends ``count`` positions starting at ``start`` and returns the hidden states for the
next node, or, on the last node, the logits of the final position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..protocol.messages import Sampling
from .loader import LoadedSlice
from .sampling import make_generator


class CacheMismatch(Exception):
    pass


@dataclass
class SessionState:
    sampling: Sampling
    cache: object
    generator: torch.Generator
    tokens_seen: int = 0


class Shard:
    def __init__(self, loaded: LoadedSlice):
        self.s = loaded
        self.body = loaded.model.model
        self.head = loaded.model.lm_head

    @property
    def is_first(self) -> bool:
        return self.s.is_first

    @property
    def is_last(self) -> bool:
        return self.s.is_last

    def new_session(self, sampling: Sampling) -> SessionState:
        from transformers import DynamicCache

        return SessionState(sampling=sampling, cache=DynamicCache(config=self.s.config), generator=make_generator(sampling))

    @torch.inference_mode()
    def step(self, state: SessionState, start: int, tokens: list[int] | None = None, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Returns hidden states [1, n, hidden] (not last) or float32 logits [vocab] (last)."""
        if start != state.tokens_seen:
            raise CacheMismatch(f"step starts at position {start} but this node's cache holds {state.tokens_seen} positions")
        dev = self.s.device
        if self.is_first:
            ids = torch.tensor([tokens], dtype=torch.long, device=dev)
            embeds = self.body.embed_tokens(ids)
        else:
            embeds = hidden.to(device=dev, dtype=self.s.dtype)
        n = embeds.shape[1]
        position_ids = torch.arange(start, start + n, device=dev).unsqueeze(0)
        # Positional: the cache argument's keyword changed name within transformers 5.x.
        out = self.body(None, None, position_ids, state.cache, inputs_embeds=embeds, use_cache=True)
        state.tokens_seen += n
        h = out.last_hidden_state
        if not self.is_last:
            return h
        return self.head(h[:, -1, :])[0].float()
