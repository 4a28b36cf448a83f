"""``groove generate``, ``groove chat`` and ``groove status``."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field

from ..models import checkpoint
from ..models.checkpoint import ModelError
from ..protocol.messages import Sampling
from .client import Client, GrooveError, SessionInfo
from .tokenizer import StreamDecoder, load_tokenizer, render_chat


@dataclass
class Completion:
    model: str
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    ttft_s: float = 0.0
    tokens_per_s: float = 0.0

    def as_json(self) -> dict:
        return {
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.token_ids),
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "ttft_s": round(self.ttft_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
        }


@dataclass
class Speculation:
    """How a turn guesses ahead: ``ngram`` (the relay drafts) or a local draft model."""

    kind: str = ""  # "", "ngram" or "model"
    draft_tokens: int = 0  # 0: adaptive
    drafter: object = None  # drafting.model.DraftModel for "model"
    sampling: Sampling | None = None  # the session's: a sampling session's draft model samples too


async def stream_turn(client: Client, session: SessionInfo, tokenizer, prompt_ids: list[int], max_tokens: int, on_text=None,
                      speculation: Speculation | None = None, history: list[int] | None = None) -> Completion:
    """Run one turn and collect its tokens, streaming text deltas to ``on_text``.
    ``history``: the session's earlier tokens (a draft model needs the whole text)."""
    result = Completion(model=session.model, prompt_tokens=len(prompt_ids))
    decoder = StreamDecoder(tokenizer)
    t0 = time.perf_counter()
    t_first = None
    spec = speculation or Speculation()
    if spec.kind == "model":
        steps = client.generate_drafted(session, prompt_ids, max_tokens, spec.drafter, history=history, draft_tokens=spec.draft_tokens,
                                        sampling=spec.sampling)
    else:
        steps = client.generate(session, prompt_ids, max_tokens, speculative=spec.kind, draft_tokens=spec.draft_tokens)
    async for step in steps:
        if step.token is None:
            result.finish_reason = step.finish
            break
        if t_first is None:
            t_first = time.perf_counter()
        result.token_ids.append(step.token)
        delta = decoder.push(step.token)
        if delta and on_text:
            on_text(delta)
        if step.finish:
            result.finish_reason = step.finish
    t_end = time.perf_counter()
    result.text = decoder.text()
    result.ttft_s = (t_first or t_end) - t0
    decode_tokens = len(result.token_ids) - 1
    decode_time = t_end - (t_first or t_end)
    result.tokens_per_s = decode_tokens / decode_time if decode_tokens > 0 and decode_time > 0 else 0.0
    return result


def sampling_from(args) -> Sampling:
    return Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def check_sampling(args) -> str | None:
    if args.temperature < 0 or args.temperature > 100:
        return f"--temperature must be between 0 and 100, got {args.temperature}"
    if not 0 < args.top_p <= 1:
        return f"--top-p must be in (0, 1], got {args.top_p}"
    if args.top_k < 0:
        return f"--top-k must be 0 (off) or positive, got {args.top_k}"
    if getattr(args, "max_tokens", 1) < 1:
        return f"--max-tokens must be at least 1, got {args.max_tokens}"
    return None


def check_speculation(args) -> str | None:
    from ..drafting.length import LIMIT

    if not 0 <= args.draft_tokens <= LIMIT:
        return f"--draft-tokens must be between 0 (adaptive) and {LIMIT}, got {args.draft_tokens}"
    if args.draft_model and args.speculative == "ngram":
        return "choose --speculative ngram or --draft-model, not both"
    return None


def speculation_from(args, ref, tokenizer) -> Speculation:
    """The turn's speculation from the command line; loads the draft model (and checks it
    tokenizes as the served model does, or its guesses would be other tokens' ids)."""
    if args.draft_model:
        from ..drafting.model import DraftModel, DraftModelError

        try:
            draft_ref = checkpoint.resolve(args.draft_model)
        except ModelError as exc:
            raise ModelError(f"--draft-model: {exc}") from None
        try:
            draft_tok = load_tokenizer(draft_ref)
        except ModelError:
            draft_tok = None
        if draft_tok is not None and draft_tok.get_vocab() != tokenizer.get_vocab():
            raise ModelError(f"the draft model {args.draft_model} has another tokenizer than {ref.name}: its guesses would be other words")
        try:
            return Speculation("model", args.draft_tokens, DraftModel(draft_ref.local_dir or args.draft_model), sampling_from(args))
        except DraftModelError as exc:
            raise ModelError(str(exc)) from None
    return Speculation("" if args.speculative == "none" else args.speculative, args.draft_tokens)


def local_fingerprint(ref) -> str:
    """The checkpoint's fingerprint when the weights are on this machine (headers only), so
    the relay pairs this consumer's tokenizer with exactly that checkpoint; '' otherwise."""
    if not ref.is_local:
        return ""
    try:
        return checkpoint.Checkpoint(ref, checkpoint.read_config(ref), checkpoint.read_tensor_index(ref)).fingerprint()
    except ModelError:
        return ""


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def run_generate(args) -> int:
    problem = check_sampling(args) or check_speculation(args)
    if problem:
        return _fail(problem)
    if args.prompt_file:
        try:
            prompt = open(args.prompt_file, encoding="utf-8").read()
        except OSError as exc:
            return _fail(f"cannot read --prompt-file: {exc}")
    else:
        prompt = args.prompt
    try:
        ref = checkpoint.resolve(args.model, args.model_name)
        tokenizer = load_tokenizer(ref)
        speculation = speculation_from(args, ref, tokenizer)
    except ModelError as exc:
        return _fail(str(exc))
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        return _fail("the prompt is empty")

    async def main() -> Completion:
        async with Client(args.relay, args.token, args.tls_ca) as client:
            session = await client.open_session(ref.name, sampling_from(args), fingerprint=local_fingerprint(ref), wait=args.wait)
            try:
                on_text = None if args.json else (lambda t: (sys.stdout.write(t), sys.stdout.flush()))
                return await stream_turn(client, session, tokenizer, prompt_ids, args.max_tokens, on_text, speculation)
            finally:
                await client.close_session(session)

    try:
        result = asyncio.run(main())
    except GrooveError as exc:
        return _fail(exc.message)
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(result.as_json()))
    else:
        print()
        print(f"[{len(result.token_ids)} tokens, {result.tokens_per_s:.1f} tok/s, first token {result.ttft_s * 1000:.0f} ms, "
              f"finish: {result.finish_reason}]", file=sys.stderr)
    return 0


class Conversation:
    """Multi-turn state: only the tokens the session has not seen go out each turn."""

    def __init__(self, tokenizer, system: str | None = None):
        self.tok = tokenizer
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.sent: list[int] = []  # every token the session holds, prompts and replies

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        return render_chat(self.tok, messages, add_generation_prompt)

    def next_input(self, user_text: str) -> list[int]:
        self.messages.append({"role": "user", "content": user_text})
        full = self._render(self.messages, add_generation_prompt=True)
        if full[: len(self.sent)] == self.sent:
            return full[len(self.sent) :]
        # The reply tokenizes differently when re-rendered: send the new turn's text alone.
        before = self._render(self.messages[:-1], add_generation_prompt=False)
        return full[len(before) :] if full[: len(before)] == before else self._render(self.messages[-1:], add_generation_prompt=True)

    def record(self, sent: list[int], reply: Completion) -> None:
        self.sent += sent + reply.token_ids
        self.messages.append({"role": "assistant", "content": reply.text})


def run_chat(args) -> int:
    problem = check_sampling(args) or check_speculation(args)
    if problem:
        return _fail(problem)
    try:
        ref = checkpoint.resolve(args.model, args.model_name)
        tokenizer = load_tokenizer(ref)
        speculation = speculation_from(args, ref, tokenizer)
    except ModelError as exc:
        return _fail(str(exc))
    conv = Conversation(tokenizer, args.system)
    interactive = sys.stdin.isatty()

    async def main() -> None:
        async with Client(args.relay, args.token, args.tls_ca) as client:
            session = await client.open_session(ref.name, sampling_from(args), fingerprint=local_fingerprint(ref), wait=args.wait)
            if interactive:
                print(f"chatting with {ref.name} through {len(session.pipeline)} node(s); Ctrl-D to quit", file=sys.stderr)
            loop = asyncio.get_running_loop()
            while True:
                if interactive:
                    print("> ", end="", flush=True, file=sys.stderr)
                line = await loop.run_in_executor(None, sys.stdin.readline)
                if not line:
                    break
                if not line.strip():
                    continue
                ids = conv.next_input(line.rstrip("\n"))
                reply = await stream_turn(client, session, tokenizer, ids, args.max_tokens,
                                          lambda t: (sys.stdout.write(t), sys.stdout.flush()), speculation, conv.sent)
                conv.record(ids, reply)
                print(flush=True)
                print(f"[{len(reply.token_ids)} tokens, {reply.tokens_per_s:.1f} tok/s]", file=sys.stderr)
            await client.close_session(session)

    try:
        asyncio.run(main())
    except GrooveError as exc:
        return _fail(exc.message)
    except KeyboardInterrupt:
        return 130
    return 0


def fetch_status(relay: str, timeout: float = 5.0, token: str | None = None, tls_ca: str | None = None) -> dict:
    """GET /status (blocking, so it works inside and outside an event loop)."""
    import urllib.error
    import urllib.request

    from ..protocol.address import client_ssl, http_url
    from ..relay.auth import local_token

    request = urllib.request.Request(http_url(relay, "/status"), headers={"Authorization": f"Bearer {local_token('consumer', token)}"})
    tls = client_ssl(relay, tls_ca)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=None if tls is True else tls) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise GrooveError("unauthorized", f"relay {relay} refused the token (pass --token)") from None
        raise GrooveError("http", f"relay {relay} answered {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise GrooveError("unreachable", f"relay {relay} is unreachable: {reason}") from None


def run_status(args) -> int:
    try:
        status = fetch_status(args.relay, token=args.token, tls_ca=args.tls_ca)
    except GrooveError as exc:
        return _fail(exc.message)
    if args.json:
        print(json.dumps(status))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    relay = status.get("relay", {})
    console.print(f"relay {args.relay}: groove {relay.get('version')}, up {relay.get('uptime_s')} s, {relay.get('sessions')} open sessions")
    models = Table(title="models")
    for col in ("model", "fingerprint", "layers", "coverage", "complete"):
        models.add_column(col)
    for m in status["models"]:
        cov = ", ".join(f"{a}-{b}" for a, b in m["coverage"])
        models.add_row(m["model"], m["fingerprint"], str(m["num_layers"]), cov, "yes" if m["complete"] else "[red]no[/red]")
    nodes = Table(title="nodes")
    for col in ("id", "model", "layers", "device", "dtype", "kernels", "sessions", "tokens", "memory", "heartbeat"):
        nodes.add_column(col)
    for n in status["nodes"]:
        kernels = ", ".join(n.get("kernels") or []) or "torch"
        nodes.add_row(n["id"], n["model"], f"{n['layers'][0]}-{n['layers'][1]}", n["device"], n["dtype"], kernels, str(n["sessions"]),
                      str(n["tokens_processed"]), f"{n['rss_bytes'] / 2**20:.0f} MiB", f"{n['last_heartbeat_s']:.1f} s ago")
    console.print(models)
    console.print(nodes)
    if not status["nodes"]:
        console.print("no nodes are registered")
    return 0
