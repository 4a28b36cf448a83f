"""Wire Protocol v2 envelope headers.

Every frame carries one of these structs, msgpack-encoded, tagged by its ``type`` field.
msgspec validates each header against its schema while decoding, so a handler only ever
sees well-typed messages. Nothing here does I/O.
"""

from __future__ import annotations

from typing import Literal, Union

import msgspec

PROTOCOL_VERSION = 2


class Envelope(msgspec.Struct, tag_field="type", kw_only=True, forbid_unknown_fields=True):
    """Fields every message carries. ``session`` routes, ``seq`` orders steps in a session."""

    v: int = PROTOCOL_VERSION
    id: int = 0
    session: str = ""
    src: str = ""
    dst: str = ""
    seq: int = 0


class Sampling(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    seed: int | None = None


class Range(msgspec.Struct, array_like=True):
    first: int
    last: int


class DraftDist(msgspec.Struct, array_like=True):
    """The distribution a guess was drawn from (a draft model sampling), sparse: its
    support and their probabilities. Without one, a guess counts as certain (q one-hot)."""

    ids: list[int]
    probs: list[float]


# --- handshake ---------------------------------------------------------------------------


class Hello(Envelope, tag="hello"):
    role: Literal["node", "consumer"]
    token: str = ""
    software: str = ""


class Welcome(Envelope, tag="welcome"):
    peer_id: str
    relay_software: str = ""


class NodeRegister(Envelope, tag="node_register"):
    model: str
    fingerprint: str
    num_layers: int
    layers: Range
    device: str
    dtype: str
    hidden_size: int
    vocab_size: int
    weights: str = ""  # "packed", "int8" or "" (plain)
    kernels: list[str] = []  # groove's compiled kernels its decode steps run ("bf16.c", "q8.c", "attend.c")
    load_s: float = 0.0
    rss_bytes: int = 0
    peak_rss_bytes: int = 0
    max_positions: int = 0  # the model's context length (0: unknown)
    tokenizer_digest: str = ""  # sha256 of the tokenizer files this node can send ("" if none)
    machine: str = ""  # a hash identifying the machine: nodes with the same one share its processors


class PlacementRequest(Envelope, tag="placement_request"):
    """A node started with ``--layers auto`` asks which layers to load."""

    model: str
    fingerprint: str
    num_layers: int
    layer_bytes: list[int]
    embed_bytes: int
    head_bytes: int
    max_memory: int


class Placement(Envelope, tag="placement"):
    layers: Range


class Registered(Envelope, tag="registered"):
    node_id: str
    send_tokenizer: bool = False  # the relay has no tokenizer for this checkpoint yet


class TokenizerFiles(Envelope, tag="tokenizer_files"):
    """Node -> relay, once per checkpoint: the tokenizer files, so the relay's HTTP API can
    tokenize prompts and apply the chat template without the weights or torch."""

    model: str
    fingerprint: str
    files: dict[str, bytes]


class Heartbeat(Envelope, tag="heartbeat"):
    sessions: int = 0
    tokens_processed: int = 0
    steps: int = 0  # forward passes
    pieces: int = 0  # session steps (or prompt chunks) in them: pieces / steps is the mean batch
    compute_s: float = 0.0
    rss_bytes: int = 0
    peak_rss_bytes: int = 0


# --- sessions ----------------------------------------------------------------------------


class OpenSession(Envelope, tag="open_session"):
    model: str
    fingerprint: str = ""
    sampling: Sampling = msgspec.field(default_factory=Sampling)


class SessionOpened(Envelope, tag="session_opened"):
    model: str
    fingerprint: str
    pipeline: list[str]
    ranges: list[Range]


class PipelineConfig(Envelope, tag="pipeline_config"):
    """Relay -> node: this node serves ``session`` at ``position`` of a chain of ``length``."""

    position: int
    length: int
    sampling: Sampling
    # Machines among the chain's nodes: streaming sessions travel in this many groups, so
    # that each machine has a group to work on while the others work on theirs.
    groups: int = 0


class Generate(Envelope, tag="generate"):
    """Consumer -> relay: append ``tokens`` to the session and generate up to ``max_tokens``."""

    tokens: list[int]
    max_tokens: int
    want_logits: bool = False
    ignore_eos: bool = False  # benchmarks: always generate max_tokens
    # Speculative decoding. "ngram": the relay drafts each step's next tokens from n-grams
    # already in the session (prompt lookup), up to ``draft_tokens`` (0: adaptive). Or the
    # consumer drafts (a local draft model): ``drafts`` go after ``tokens`` in one step,
    # and with ``one_step`` the turn ends after that step, so the consumer can draft again.
    speculative: Literal["", "ngram"] = ""
    draft_tokens: int = 0
    drafts: list[int] = []
    draft_dists: list[DraftDist] = []  # one per draft when the consumer sampled them
    one_step: bool = False


class Forward(Envelope, tag="forward"):
    """One pipeline step. The first hop carries token ids; later hops carry hidden states
    as the payload (``dtype``/``shape``). ``start`` is the position of the first input token
    in the session, so every node can check its cache is in step."""

    start: int
    count: int
    tokens: list[int] | None = None
    dtype: str = ""
    shape: list[int] = []
    remaining: int = 1
    want_logits: bool = False
    ignore_eos: bool = False
    # False for all but the last chunk of a prompt a node splits up: the last node samples
    # only after the final one.
    final: bool = True
    # Speculative decoding: the step's last ``len(drafts)`` positions are these guesses (on
    # the first hop, also the end of ``tokens``; later hops carry them for the last node).
    # The last node samples after each position and keeps the guesses up to the first that
    # differs from its own token. A later step may start before the end of the caches (at
    # the first rejected guess): every node then drops its positions from ``start`` on.
    drafts: list[int] = []
    draft_dists: list[DraftDist] = []  # sampled guesses: what each was drawn from


class Result(Envelope, tag="result"):
    """Last node -> relay -> consumer: the sampled token (None after a cancel).
    ``finish`` is '' while generation continues, else 'stop', 'length' or 'cancelled'.
    With ``want_logits`` the payload holds the last position's float32 logits. After a
    step with drafts, ``accepted`` holds the drafts that were kept: the step produced
    ``accepted + [token]``."""

    token: int | None
    accepted: list[int] = []
    finish: str = ""
    dtype: str = ""
    shape: list[int] = []


class Cancel(Envelope, tag="cancel"):
    pass


class TurnEnd(Envelope, tag="turn_end"):
    """Relay -> first node of the chain: the session's turn ended (at a stop token, by a
    cancel), so no next step is coming; the node stops keeping a place for it in its
    groups. Other nodes do not wait for steps, so only the first node is told."""


class CloseSession(Envelope, tag="close_session"):
    pass


class Error(Envelope, tag="error"):
    code: str
    message: str
    missing: list[Range] = []
    fatal: bool = False


Message = Union[
    Hello,
    Welcome,
    NodeRegister,
    PlacementRequest,
    Placement,
    Registered,
    TokenizerFiles,
    Heartbeat,
    OpenSession,
    SessionOpened,
    PipelineConfig,
    Generate,
    Forward,
    Result,
    Cancel,
    TurnEnd,
    CloseSession,
    Error,
]
