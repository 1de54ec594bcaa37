"""`moe-offload serve`: an OpenAI-compatible HTTP server over one offloaded model, batching concurrent
requests (see moe_offload/serve/)."""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

from ..errors import MoEOffloadError
from .argtypes import positive_int
from .common import add_model_args, add_plan_arg, load_tokenizer, offload_config, tokenizer_at


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``serve`` subcommand."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible server (completions, chat, streaming, metrics)")
    add_model_args(p)
    add_plan_arg(p)
    p.add_argument("--cache-policy", help="expert cache policy")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; 0.0.0.0 for all)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request but /health")
    p.add_argument("--max-batch", type=positive_int, default=16, help="sequences decoded together (default 16)")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests waiting to join the batch before new ones get 429 (default 64)")
    p.add_argument("--prefill-chunk", type=positive_int, default=512,
                   help="prompt tokens of one request prefilled per step, so a long prompt does not stall the "
                        "running requests (default 512); requests waiting at a step are prefilled together")
    p.add_argument("--served-model-name", help="the model name clients send (default: the --model name)")
    p.add_argument("--engine", choices=("process", "thread"), default="process",
                   help="where the model runs: its own process, so HTTP and streaming never take its interpreter "
                        "time (default), or a thread of the server process")
    p.set_defaults(func=main)


def _port(text: str) -> int:
    port = positive_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"must be at most 65535, got {port}")
    return port


def check_listen(host: str, port: int) -> None:
    """Fail before the model loads if ``host:port`` cannot be bound (in use, or not an address here)."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as err:
        raise MoEOffloadError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def main(args: argparse.Namespace) -> int:
    check_listen(args.host, args.port)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"[moe-offload] warning: listening on {args.host} without --api-key: anyone who can reach this "
              "port can use the model", file=sys.stderr)
    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as err:
        raise MoEOffloadError(f"`serve` needs the serve extra ({err.name} is missing): "
                              "pip install 'moe-offload[serve]'") from None
    served, engine, close = _load_engine(args)
    print(f"[moe-offload] serving {served.name} on http://{args.host}:{args.port}/v1 "
          f"(batch {args.max_batch}, queue {args.max_queue}, prefill chunk {args.prefill_chunk}, "
          f"engine in its own {args.engine})", flush=True)
    try:
        # Open streams get 5 s after SIGTERM/Ctrl-C, then the engine stops and the model closes.
        uvicorn.run(create_app(engine, served, args.api_key), host=args.host, port=args.port, log_level="warning",
                    timeout_graceful_shutdown=5)
    finally:
        close()
    return 0


def _load_engine(args: argparse.Namespace):
    """The served model, its engine (in a child process or a thread here) and what closes it."""
    from ..serve.openai_api import ServedModel

    config = offload_config(args, cache_policy=args.cache_policy)
    if args.engine == "process":
        from ..serve.engine_process import EngineProcess, EngineSpec

        engine = EngineProcess(EngineSpec(args.model, config, args.max_batch, args.max_queue, args.prefill_chunk))
        tokenizer, context_length, close = tokenizer_at(engine.info.directory), engine.info.context_length, engine.stop
    else:
        from ..loading.loader import from_pretrained
        from ..serve.engine import BatchEngine

        model = from_pretrained(args.model, config)
        tokenizer, context_length = load_tokenizer(model), model.config.max_position_embeddings
        close = model.offload.close
        engine = BatchEngine(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                             prefill_chunk=args.prefill_chunk)
    served = ServedModel(name=args.served_model_name or Path(args.model.rstrip("/")).name, tokenizer=tokenizer,
                         context_length=context_length, created=int(time.time()))
    return served, engine, close
