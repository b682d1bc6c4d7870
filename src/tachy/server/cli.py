"""``tachy serve``: the OpenAI-compatible server on uvicorn (needs the ``server`` extra)."""
from __future__ import annotations

import argparse
import sys
import threading

from ..cli import EXTRA_COMMANDS, add_model_args, load_engine
from ..errors import TachyError
from ..prefix_cache import DEFAULT_MB


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import create_app
    except ModuleNotFoundError as e:
        raise TachyError(f"the server needs {e.name}: pip install 'tachy[server]'") from None
    if args.max_queue < 0:
        raise TachyError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.max_batch < 1:
        raise TachyError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.compile_timeout <= 0 or args.stall_timeout <= 0:
        raise TachyError("--compile-timeout and --stall-timeout must be > 0 seconds")
    if args.prefix_cache_mb <= 0:
        raise TachyError(f"--prefix-cache-mb must be > 0, got {args.prefix_cache_mb} (--no-prefix-cache turns it off)")
    engine = load_engine(args)
    engine.set_prefix_cache(None if args.no_prefix_cache else args.prefix_cache_mb)
    app = create_app(engine, api_key=args.api_key, max_queue=args.max_queue, model_name=args.served_model_name,
                     max_batch=args.max_batch, compile_timeout_s=args.compile_timeout, stall_s=args.stall_timeout,
                     speculative_batching=args.batching == "speculative")
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=5))
    stop_serving = server.handle_exit

    def handle_exit(sig, frame) -> None:
        """SIGTERM/SIGINT: stop running generations at their next forward (their streams end with an error
        chunk) instead of waiting for them, so the process exits within seconds. In a thread: a signal handler
        must not take the scheduler's lock."""
        threading.Thread(target=app.state.scheduler.abort, daemon=True).start()
        stop_serving(sig, frame)

    server.handle_exit = handle_exit
    print(f"serving {engine.name} on http://{args.host}:{args.port} (web page at /, OpenAI API under /v1)",
          file=sys.stderr, flush=True)
    server.run()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a built-in chat page")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 endpoints")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get 429")
    p.add_argument("--max-batch", type=int, default=8,
                   help="overlapping requests decoded together, one forward per step (1: one at a time)")
    p.add_argument("--batching", default="speculative", choices=["speculative", "plain"],
                   help="speculative: every row drafts and joining prompts are prefilled in chunks beside the "
                        "running rows (with the C forward); plain: rows decode one token per step (as before)")
    p.add_argument("--compile-timeout", type=float, default=10.0,
                   help="seconds one response_format (regex/schema) may take to compile; over it a 400")
    p.add_argument("--stall-timeout", type=float, default=60.0,
                   help="/health answers 503 when the worker has been busy this long without progress")
    p.add_argument("--prefix-cache-mb", type=float, default=DEFAULT_MB,
                   help=f"memory for K/V of earlier requests' prefixes (default {DEFAULT_MB} MB)")
    p.add_argument("--no-prefix-cache", action="store_true", help="prefill every prompt from scratch")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: the model's name)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


EXTRA_COMMANDS.append(register)
