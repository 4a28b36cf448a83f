"""One forward pass through this node's slice for a batch of pieces of different sessions.

Decoding is memory-bound: a pass for eight sessions reads the same weights as a pass for
one. So the pieces (a decode token, or a chunk of a prompt, or the hidden states of either)
are laid end to end as one sequence ``[1, total, hidden]``: every linear layer, norm and
MLP runs once over all of them, each token with its own session's position. Only attention
is per piece, against that session's own KV cache (a transformers ``DynamicCache`` sized to
the slice's layers, whose full-attention layers grow in place: ``kv_cache``), through
``attention.batched_attention``. A batch of one piece takes the same kernels with the same
shapes as transformers' own forward, so a session alone gets transformers' results bit for
bit; linear layers whose kernels round a one-row call differently (``linears.RowExact``)
keep decode steps in one-row calls, so a session's results do not depend on what else is
in its batch either.

A speculative step (a token and the guesses after it) runs each of its rows as a decode
step would: one-row calls in those linear layers and one attention call per row, against
the cache as it stands at that row. Its logits are then bit for bit those of decoding the
same tokens one by one, so verified guesses never change greedy output. A later step that
starts before the end of the cache (at the first rejected guess) drops the rest first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..protocol.messages import Sampling
from . import attention, kv_cache, linears
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
    # Positions from here on are guesses not yet verified: a step may start anywhere from
    # here to ``tokens_seen``, and the cache drops what lies past its start.
    settled: int = 0

    def can_start(self, start: int) -> bool:
        return self.settled <= start <= self.tokens_seen

    def rewind(self, start: int) -> None:
        if start < self.tokens_seen:
            self.cache.crop(start - self.tokens_seen)
            self.tokens_seen = start


@dataclass
class Piece:
    """``count`` positions of one session starting at ``start``: token ids on the first
    node, hidden states ``[1, count, hidden]`` on the others."""

    state: SessionState
    start: int
    tokens: list[int] | None = None
    hidden: torch.Tensor | None = None
    want_output: bool = True  # last node: logits of the piece's last position
    drafts: int = 0  # its last rows are guesses: each row runs as a decode step would

    @property
    def count(self) -> int:
        return len(self.tokens) if self.tokens is not None else self.hidden.shape[1]


class Shard:
    def __init__(self, loaded: LoadedSlice, batch_exact: bool = True, max_batch: int = 64):
        self.s = loaded
        self.body = loaded.model.model
        self.layers = list(self.body.layers[: loaded.config.num_hidden_layers])
        self.inner_attention = attention.use_batched(loaded.model.config)
        self.attend_kernel = None
        if self.inner_attention == "sdpa" and self.layers and loaded.dtype == torch.bfloat16 and loaded.device.type == "cpu":
            # Its check runs now, not in the first step.
            self.attend_kernel = attention.prepare_decode(self.layers[0].self_attn, loaded.config)
        self.exact = batch_exact
        # The head sees a row per piece that wants logits (and its guesses): it is probed up
        # to the node's batch size (``--max-batch``), not a prompt's, and its calls are
        # capped at the largest size probed.
        head_rows = max(max_batch, linears.SETTLED_FOR_PROBE)
        self.row_exact = (linears.make_row_exact(loaded.model, loaded.device, loaded.dtype, largest={"lm_head": head_rows})
                          if batch_exact else [])
        self.head = loaded.model.lm_head  # after make_row_exact, which may wrap it

    def kernels(self) -> list[str]:
        """groove's compiled kernels that this slice's decode steps run; torch runs the rest."""
        return linears.kernels_in_use(self.s.model) + (["attend.c"] if self.attend_kernel is not None else [])

    @property
    def is_first(self) -> bool:
        return self.s.is_first

    @property
    def is_last(self) -> bool:
        return self.s.is_last

    def new_session(self, sampling: Sampling) -> SessionState:
        return SessionState(sampling=sampling, cache=kv_cache.session_cache(self.s.config), generator=make_generator(sampling))

    def step(self, state: SessionState, start: int, tokens: list[int] | None = None, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """One piece alone: hidden states [1, n, hidden] (not last) or float32 logits [vocab] (last)."""
        return self.run([Piece(state, start, tokens, hidden)])[0]

    @torch.inference_mode()
    def run(self, pieces: list[Piece]) -> list[torch.Tensor | None]:
        """Hidden states ``[1, n, hidden]`` per piece (not last), or float32 logits
        ``[vocab]`` per piece that wants them (last node; None for the others); for a piece
        with guesses, logits ``[guesses + 1, vocab]``: after its last real token and after
        each guess."""
        for p in pieces:
            if not p.state.can_start(p.start):
                raise CacheMismatch(f"step starts at position {p.start} but this node's cache holds {p.state.tokens_seen} positions")
            p.state.rewind(p.start)
        if len({id(p.state) for p in pieces}) != len(pieces):
            raise ValueError("a batch holds at most one piece per session")
        dev = self.s.device
        if self.is_first:
            tokens = [t for p in pieces for t in p.tokens]
            if self.s.rows is not None:
                self.s.rows.fetch(tokens)
            ids = torch.tensor([tokens], dtype=torch.long, device=dev)
            h = self.body.embed_tokens(ids)
        else:
            parts = [p.hidden.to(device=dev, dtype=self.s.dtype) for p in pieces]
            h = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        position_ids = torch.cat([torch.arange(p.start, p.start + p.count, device=dev) for p in pieces]).unsqueeze(0)
        batch = attention.Batch(self.inner_attention)
        offsets, offset = [], 0
        for p in pieces:
            offsets.append(offset)
            if p.drafts and self.exact:
                for j in range(p.count):
                    batch.add(p.state.cache, p.start + j, offset + j, 1)
            else:
                batch.add(p.state.cache, p.start, offset, p.count)
            offset += p.count
        for p in pieces:
            kv_cache.reserve(p.state.cache, p.start + p.count, self.s.config, dev, self.s.dtype)
        position_embeddings = self.body.rotary_emb(h, position_ids=position_ids)
        # The batch is both the cache (it files each piece's keys and values in its own
        # session's cache) and the mask (it tells the attention function where pieces end).
        with linears.row_layout(batch.counts):
            for layer in self.layers:
                h = layer(h, attention_mask=batch, position_embeddings=position_embeddings, position_ids=position_ids,
                          cache=batch, use_cache=True)
            h = self.body.norm(h)
        for p in pieces:
            p.state.tokens_seen += p.count
            p.state.settled = p.state.tokens_seen - p.drafts
        if not self.is_last:
            return [h[:, a : a + p.count] for a, p in zip(offsets, pieces)]
        wanted = [(i, a + p.count - 1 - p.drafts, p.drafts + 1) for i, (a, p) in enumerate(zip(offsets, pieces)) if p.want_output]
        out: list[torch.Tensor | None] = [None] * len(pieces)
        if wanted:
            index = [first + j for _, first, n in wanted for j in range(n)]
            rows = h[:, index, :] if h.shape[1] != 1 else h
            with linears.row_layout([1] * len(index)):  # alone, each is a one-row call
                logits = self.head(rows)[0].float()
            row = 0
            for i, _, n in wanted:
                out[i] = logits[row] if not pieces[i].drafts else logits[row : row + n]
                row += n
        return out
