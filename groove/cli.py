"""The ``groove`` command. Each subcommand imports only what it needs, so commands that run
no model (relay, status, generate, chat) start without loading torch."""

from __future__ import annotations

import argparse
import sys

from . import __version__

DEFAULT_RELAY = "127.0.0.1:8770"


def _add_connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--relay", default=DEFAULT_RELAY, help="HOST:PORT, or ws(s)://, http(s):// for TLS")
    p.add_argument("--token", default=None, help="this role's token (default: $GROOVE_TOKEN, or the local relay's config)")
    p.add_argument("--tls-ca", default=None, help="CA certificate that signed the relay's (for a private CA)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local checkpoint directory or hub id")
    p.add_argument("--model-name", default=None, help="name on the network (default: hub id or directory name)")


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.7, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for a complete pipeline")
    p.add_argument("--speculative", default="none", choices=["none", "ngram"],
                   help="ngram: guess the next tokens from n-grams already in the text (the relay drafts; no extra model)")
    p.add_argument("--draft-model", default=None, metavar="MODEL",
                   help="a small model with the same tokenizer, run here, guesses the next tokens for the pipeline to verify")
    p.add_argument("--draft-tokens", type=int, default=0, metavar="K", help="guesses per step (default 0: adaptive, starting at 4)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="groove", description="Run one LLM across several machines, a slice of layers on each.")
    parser.add_argument("--version", action="version", version=f"groove {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("relay", help="run the relay (the one process that listens)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8770)
    p.add_argument("--node-timeout", type=float, default=5.0, help="seconds without a heartbeat before a node is dropped")
    p.add_argument("--session-ttl", type=float, default=600.0, help="seconds before an idle session is closed")
    p.add_argument("--auth-file", default=None, help='JSON {"node": [tokens], "consumer": [tokens]} (default: generated once in ~/.config/groove)')
    p.add_argument("--insecure-open", action="store_true", help="no authentication at all")
    p.add_argument("--tls-cert", default=None)
    p.add_argument("--tls-key", default=None)
    p.add_argument("--max-connections-per-address", type=int, default=64)
    p.add_argument("--max-session-tokens", type=int, default=32768, help="prompt plus generated tokens per session")
    p.add_argument("--max-sessions-per-consumer", type=int, default=64, help="open sessions per consumer connection")
    p.add_argument("--max-queued-frames", type=int, default=1024, help="frames waiting for a slow reader before it is dropped")
    p.add_argument("--handshake-timeout", type=float, default=10.0, help="seconds a new connection has to say hello")
    p.add_argument("--speculative", default="none", choices=["none", "ngram"],
                   help="the HTTP API's default: ngram drafts the next tokens from the text so far (a request's 'speculative' overrides it)")
    p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("node", help="serve a slice of a model's layers")
    _add_model_args(p)
    p.add_argument("--layers", required=True, help="first-last decoder layers, e.g. 0-11, or 'auto' to let the relay choose")
    p.add_argument("--max-memory", default=None, help="with --layers auto: memory for weights, e.g. 8GB (default: 80%% of free memory)")
    _add_connection_args(p)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quantize", default="none", choices=["none", "int8"], help="int8: weight-only, per-channel scales")
    p.add_argument("--no-pack", action="store_true", help="keep plain nn.Linear (no prepacked bfloat16 weights on CPU)")
    p.add_argument("--no-compile", action="store_true",
                   help="build and use none of groove's C kernels (bf16.c, q8.c, attend.c): torch's kernels only")
    p.add_argument("--fast-attention", action="store_true",
                   help="faster single-token attention for grouped-query models; rounds differently from transformers "
                        "(always on with --quantize int8)")
    p.add_argument("--prefill-chunk", type=_chunk, default=0, metavar="auto|N",
                   help="prompt tokens per forward pass while other sessions are streaming (default auto: a pass with a "
                        "chunk costs about half a decode pass more, measured on this node)")
    p.add_argument("--max-batch", type=_positive, default=64, help="sessions in one forward pass at most")
    p.add_argument("--wire-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8"],
                   help="hidden states sent to the next node: auto (the compute dtype), a float dtype, or int8 with a "
                        "scale per token (half of bfloat16's bytes, for slow links; rounds the activations)")
    p.add_argument("--no-batch-exact", action="store_true",
                   help="let batched decode steps share matmul calls whose one-row rounding differs (faster; a session's "
                        "output may then depend in the last bits on what else is in its batch)")
    p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("generate", help="generate text from a prompt")
    _add_connection_args(p)
    _add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-file")
    _add_sampling_args(p, 200)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")

    p = sub.add_parser("chat", help="multi-turn chat; the session's KV cache is kept between turns")
    _add_connection_args(p)
    _add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    _add_sampling_args(p, 256)

    p = sub.add_parser("status", help="show the relay's nodes and model coverage")
    _add_connection_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("info", help="layers, sizes and recommended splits of a model")
    p.add_argument("model")
    p.add_argument("--relay", default=None, help="also show which nodes serve it there, and where --layers auto would go")
    p.add_argument("--token", default=None)
    p.add_argument("--tls-ca", default=None)
    p.add_argument("--max-memory", default=None, help="with --relay: the memory of the next --layers auto node, e.g. 8GB")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bench", help="measure a local pipeline against single-process transformers")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local checkpoint directory or hub id")
    src.add_argument("--synthetic", help="a random checkpoint with a known model's shape: qwen2.5-0.5b, qwen2.5-1.5b, llama-3.2-1b, tiny")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantize", default="none", choices=["none", "int8"], help="quantize the nodes (the baseline stays in --dtype)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--node-arg", action="append", default=[], help="extra argument for every node (repeatable)")
    p.add_argument("--link-latency-ms", type=float, default=0.0,
                   help="delay every link to the relay by this much each way (a userspace TCP proxy per process)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="sessions at once; above 1, compares their aggregate rate with one session's on the same pipeline")
    p.add_argument("--interfere-prompt", type=int, default=0, metavar="TOKENS",
                   help="with --concurrency: also time a streaming session while a newcomer's prompt of this length prefills")
    p.add_argument("--speculative", default="none", choices=["none", "ngram"],
                   help="compare decoding with and without n-gram speculation on the same pipeline")
    p.add_argument("--draft-model", default=None, metavar="MODEL",
                   help="compare decoding with and without guesses from this local model (run in the benchmark's process)")
    p.add_argument("--draft-tokens", type=int, default=0, metavar="K", help="with --speculative: guesses per step (0: adaptive)")
    p.add_argument("--prompt-style", default="repetitive", choices=["repetitive", "random"],
                   help="with --speculative: code whose lines repeat (guesses often hold) or random tokens (they rarely do)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("demo", help="relay + 2 nodes + a generation on a small built-in model")
    p.add_argument("--prompt", default=None)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--model", default=None, help="checkpoint to demo (default: the built-in one)")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _chunk(text: str) -> int:
    return 0 if text == "auto" else _positive(text)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        return 130


def _dispatch(args) -> int:
    if args.command == "relay":
        return _relay(args)
    if args.command == "node":
        from .node.main import run

        return run(args)
    if args.command == "generate":
        from .consumer.commands import run_generate

        return run_generate(args)
    if args.command == "chat":
        from .consumer.commands import run_chat

        return run_chat(args)
    if args.command == "status":
        from .consumer.commands import run_status

        return run_status(args)
    if args.command == "info":
        return _info(args)
    if args.command == "bench":
        return _bench(args)
    if args.command == "demo":
        from .demo import run

        return run(args)
    raise AssertionError(args.command)


def _relay(args) -> int:
    import asyncio
    import logging

    from .relay.server import serve

    from .relay import auth
    from .relay.server import tls_context

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        tls = tls_context(args.tls_cert, args.tls_key)
        tokens = None
        if not args.insecure_open:
            from pathlib import Path

            tokens, path, created = auth.load_or_create(Path(args.auth_file) if args.auth_file else None)
            _print_join(args, tokens, path, created, tls is not None)
    except (ValueError, auth.AuthError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        asyncio.run(serve(args.host, args.port, tokens=tokens, tls=tls, node_timeout=args.node_timeout, session_ttl=args.session_ttl,
                          max_connections_per_address=args.max_connections_per_address,
                          max_session_tokens=args.max_session_tokens, handshake_timeout=args.handshake_timeout,
                          max_sessions_per_consumer=args.max_sessions_per_consumer, outbound_queue=args.max_queued_frames,
                          speculative="" if args.speculative == "none" else args.speculative))
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def _lan_address() -> str:
    """This machine's first non-loopback IPv4 address, for the join command (read from the
    interfaces, no packet sent)."""
    import socket

    import psutil

    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith(("127.", "169.254.")):
                return a.address
    return "THIS-HOST"


def _print_join(args, tokens, path, created: bool, tls: bool) -> None:
    host = args.host
    if host in ("0.0.0.0", "::", ""):
        host = _lan_address()
    relay = f"{'wss://' if tls else ''}{host}:{args.port}"
    print(f"{'created' if created else 'using'} access tokens in {path} (commands on this machine find them there)")
    print(f"  on another machine, join a node with:  groove node --model MODEL --layers auto --relay {relay} --token {tokens.node[0]}")
    print(f"  consumers elsewhere use:  --token {tokens.consumer[0]}   (HTTP: 'Authorization: Bearer {tokens.consumer[0]}')", flush=True)


def _info(args) -> int:
    import json

    from .models import checkpoint, info
    from .models.checkpoint import ModelError

    try:
        ckpt = checkpoint.load(args.model)
        desc = info.describe(ckpt)
        if args.relay:
            desc["network"] = _network_plan(args, ckpt, desc)
    except (ModelError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(desc))
        return 0
    from rich.console import Console
    from rich.table import Table

    mib = 2**20
    console = Console()
    console.print(f"[bold]{desc['model']}[/bold]: {desc['architecture']}, {desc['num_layers']} layers, hidden {desc['hidden_size']}, "
                  f"vocab {desc['vocab_size']}, {desc['num_parameters'] / 1e6:.1f}M parameters, {desc['total_bytes'] / mib:.1f} MiB")
    console.print(f"per layer {desc['bytes_per_layer'] / mib:.2f} MiB; embedding {desc['embedding_bytes'] / mib:.2f} MiB (first node); "
                  f"head and norm {desc['head_bytes'] / mib:.2f} MiB (last node){', tied' if desc['tied_embeddings'] else ''}")
    table = Table(title="recommended splits (balanced by bytes)")
    table.add_column("nodes")
    table.add_column("layers per node")
    table.add_column("MiB per node")
    shape = info.Shape(desc["num_layers"], desc["layer_bytes"], desc["embedding_bytes"], desc["head_bytes"])
    for n, ranges in desc["splits"].items():
        mibs = [f"{shape.cost(a, b) / mib:.1f}" for a, b in ranges]
        table.add_row(n, "  ".join(f"{a}-{b}" for a, b in ranges), "  ".join(mibs))
    console.print(table)
    net = desc.get("network")
    if net is not None:
        served = ", ".join(f"{n['id']} {n['layers'][0]}-{n['layers'][1]}" for n in net["nodes"]) or "no nodes"
        cov = ", ".join(f"{a}-{b}" for a, b in net["coverage"]) or "nothing"
        console.print(f"on relay {args.relay}: {served}; coverage {cov}; {'complete' if net['complete'] else 'incomplete'}")
        if net.get("next_auto") is not None:
            a, b = net["next_auto"]
            console.print(f"the next 'groove node --layers auto --max-memory {args.max_memory}' would load layers {a}-{b}")
        elif net.get("next_auto_error"):
            console.print(f"a 'groove node --layers auto --max-memory {args.max_memory}' would be refused: {net['next_auto_error']}")
    return 0


def _network_plan(args, ckpt, desc) -> dict:
    """The model as a relay serves it now, and where the placement rule would put the next node."""
    from .consumer.client import GrooveError
    from .consumer.commands import fetch_status
    from .models.info import Shape
    from .relay.placement import PlacementError, parse_size, place
    from .relay.registry import merge_ranges

    try:
        status = fetch_status(args.relay, token=args.token, tls_ca=args.tls_ca)
    except GrooveError as exc:
        raise ValueError(exc.message) from None
    nodes = [n for n in status["nodes"] if n["model"] == ckpt.ref.name and n["fingerprint"] == desc["fingerprint"]]
    model = next((m for m in status["models"] if m["model"] == ckpt.ref.name and m["fingerprint"] == desc["fingerprint"]), None)
    out = {"relay": args.relay, "nodes": [{"id": n["id"], "layers": n["layers"]} for n in nodes],
           "coverage": merge_ranges([tuple(n["layers"]) for n in nodes]), "complete": bool(model and model["complete"])}
    if args.max_memory:
        shape = Shape(desc["num_layers"], desc["layer_bytes"], desc["embedding_bytes"], desc["head_bytes"])
        try:
            out["next_auto"] = list(place(shape, parse_size(args.max_memory), [tuple(n["layers"]) for n in nodes]))
        except PlacementError as exc:
            out["next_auto"], out["next_auto_error"] = None, str(exc)
    return out


def _bench(args) -> int:
    import json
    from pathlib import Path

    from .bench import harness
    from .bench.shapes import SHAPES, synthetic_checkpoint
    from .models.checkpoint import ModelError, resolve

    if args.nodes < 1 or args.new_tokens < 2 or args.prompt_tokens < 1 or args.repeat < 1 or args.concurrency < 1 or args.interfere_prompt < 0:
        print("error: --nodes, --prompt-tokens, --repeat and --concurrency must be at least 1 and --new-tokens at least 2", file=sys.stderr)
        return 2
    if args.link_latency_ms < 0:
        print("error: --link-latency-ms cannot be negative", file=sys.stderr)
        return 2
    if args.interfere_prompt and args.concurrency < 2:
        print("error: --interfere-prompt goes with --concurrency N (N >= 2)", file=sys.stderr)
        return 2
    from .consumer.commands import check_speculation

    problem = check_speculation(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    speculating = args.speculative != "none" or args.draft_model
    if speculating and args.concurrency > 1:
        print("error: --speculative and --concurrency are separate benchmarks; choose one", file=sys.stderr)
        return 2
    try:
        if args.synthetic:
            if args.synthetic not in SHAPES:
                print(f"error: unknown --synthetic {args.synthetic!r}; choose from {', '.join(SHAPES)}", file=sys.stderr)
                return 2
            model = synthetic_checkpoint(args.synthetic, args.dtype)
        else:
            ref = resolve(args.model)
            if ref.local_dir is None:
                print("error: groove bench needs a local checkpoint directory", file=sys.stderr)
                return 2
            model = Path(ref.local_dir)
        workload = harness.Workload(model=model, nodes=args.nodes, dtype=args.dtype, prompt_tokens=args.prompt_tokens,
                                    new_tokens=args.new_tokens, repeat=args.repeat, quantize=args.quantize,
                                    node_args=["--quantize", args.quantize, *args.node_arg], link_latency_ms=args.link_latency_ms)
        if args.concurrency > 1:
            from .bench import concurrency as kind

            result = kind.run(workload, args.concurrency, args.interfere_prompt)
        elif speculating:
            from .bench import speculation as kind

            result = kind.run(workload, args.speculative, args.draft_tokens, args.prompt_style, args.draft_model or "")
        else:
            kind = harness
            result = harness.run(workload)
    except (ModelError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        kind.render(result)
    return 0
