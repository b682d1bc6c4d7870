"""``tachy serve``: the OpenAI-compatible server on uvicorn (needs the ``server`` extra)."""
from __future__ import annotations

import argparse
import sys
import threading
from typing import TYPE_CHECKING

from ..cli import EXTRA_COMMANDS, add_model_args, load_engine
from ..errors import TachyError
from ..prefix_cache import DEFAULT_MB

if TYPE_CHECKING:
    from .http_guard import ConnectionLimits


def app_options(args: argparse.Namespace) -> dict:
    """``create_app``'s keyword arguments from the command line (one process or each Ray replica alike)."""
    if not 0 <= args.port <= 65535:
        raise TachyError(f"--port must be in 0-65535, got {args.port}")
    if args.max_queue < 0:
        raise TachyError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.max_batch < 1:
        raise TachyError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.preempt_after < 0:
        raise TachyError(f"--preempt-after must be >= 0 tokens, got {args.preempt_after}")
    if args.whole_prompt_tokens < 0 or args.min_prompt_chunk < 1:
        raise TachyError("--whole-prompt-tokens must be >= 0 and --min-prompt-chunk >= 1")
    if not 0 < args.prefill_share < float("inf"):
        raise TachyError(f"--prefill-share must be > 0 and finite, got {args.prefill_share}")
    if args.compile_timeout <= 0 or args.stall_timeout <= 0:
        raise TachyError("--compile-timeout and --stall-timeout must be > 0 seconds")
    return dict(api_key=args.api_key, max_queue=args.max_queue, model_name=args.served_model_name,
                max_batch=args.max_batch, compile_timeout_s=args.compile_timeout, stall_s=args.stall_timeout,
                speculative_batching=args.batching == "speculative", preempt_after=args.preempt_after,
                whole_prompt_tokens=args.whole_prompt_tokens, min_prompt_chunk=args.min_prompt_chunk,
                prefill_share=args.prefill_share)


def connection_limits(args: argparse.Namespace) -> ConnectionLimits:
    """What clients may hold (http_guard.py) from the command line."""
    from .http_guard import ConnectionLimits

    try:
        return ConnectionLimits(max_connections=args.max_connections,
                                max_connections_per_client=args.max_connections_per_client,
                                max_header_bytes=args.max_header_bytes, header_timeout_s=args.header_timeout,
                                body_timeout_s=args.body_timeout, write_timeout_s=args.write_timeout)
    except ValueError as e:
        raise TachyError(str(e)) from None


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import create_app
        from .http_guard import uvicorn_config
    except ModuleNotFoundError as e:
        raise TachyError(f"the server needs {e.name}: pip install 'tachy[server]'") from None
    options, limits = app_options(args), connection_limits(args)   # bad flags fail before the model loads
    if args.prefix_cache_mb <= 0:
        raise TachyError(f"--prefix-cache-mb must be > 0, got {args.prefix_cache_mb} (--no-prefix-cache turns it off)")
    prefix_mb = None if args.no_prefix_cache else args.prefix_cache_mb
    if args.ray:
        return cmd_serve_ray(args, options, prefix_mb)
    ray_only = [f for f in ("replicas", "min_replicas", "max_replicas", "ray_address")
                if getattr(args, f) is not None]
    if ray_only:
        raise TachyError(f"--{ray_only[0].replace('_', '-')} needs --ray")
    engine = load_engine(args)
    engine.set_prefix_cache(prefix_mb)
    app = create_app(engine, **options)
    server = uvicorn.Server(uvicorn_config(app, args.host, args.port, limits,
                                           log_level=args.log_level, timeout_graceful_shutdown=5))
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


def cmd_serve_ray(args: argparse.Namespace, options: dict, prefix_mb: float | None) -> int:
    """``tachy serve --ray``: the same app on Ray Serve, one engine per replica (ray_serve.py)."""
    try:
        from .ray_serve import EngineSpec, RayServeConfig, replica_room, serve_forever
    except ModuleNotFoundError as e:
        raise TachyError(f"--ray needs {e.name}: pip install 'tachy[ray]'") from None
    from ..registry import DEFAULT_MODEL, resolve_model

    resolve_model(args.model or DEFAULT_MODEL)   # an unknown model fails here, not in every replica
    try:
        config = RayServeConfig(
            replicas=args.replicas if args.replicas is not None else 1, min_replicas=args.min_replicas,
            max_replicas=args.max_replicas, replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus,
            max_ongoing_requests=replica_room(options), host=args.host, port=args.port,
            address=args.ray_address)
    except ValueError as e:
        raise TachyError(str(e)) from None
    spec = EngineSpec(model=args.model, dtype=args.dtype, device=args.device, prefix_cache_mb=prefix_mb)
    serve_forever(spec, options, config)
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
                   help="speculative: every row drafts, and with the C forward joining prompts are prefilled "
                        "in chunks beside the running rows; plain: rows decode one token per step (as before)")
    p.add_argument("--whole-prompt-tokens", type=int, default=0,
                   help="speculative batching: a joining prompt of at most this many tokens is read whole in one "
                        "forward beside the running rows (its first token at once; their step that much longer); "
                        "0: every prompt in chunks")
    p.add_argument("--min-prompt-chunk", type=int, default=4,
                   help="speculative batching: the fewest prompt tokens a forward beside running rows carries "
                        "(long prompts read faster, running streams slower)")
    p.add_argument("--prefill-share", type=float, default=0.5,
                   help="speculative batching: what a joining prompt's chunk may cost, as a share of the running "
                        "rows' forward (higher: joining prompts read sooner, running streams slower; "
                        "docs/server.md)")
    p.add_argument("--preempt-after", type=int, default=256,
                   help="with every batch row taken and requests waiting, park a row after this many tokens of "
                        "its turn so they can join (it resumes where it was; 0: never)")
    p.add_argument("--compile-timeout", type=float, default=10.0,
                   help="seconds one response_format (regex/schema) may take to compile; over it a 400")
    p.add_argument("--stall-timeout", type=float, default=60.0,
                   help="/health answers 503 when the worker has been busy this long without progress")
    p.add_argument("--max-connections", type=int, default=512,
                   help="open connections at once; more are answered 503 (keep it under `ulimit -n`)")
    p.add_argument("--max-connections-per-client", type=int, default=128,
                   help="of them from one address; more are answered 503 (behind a proxy, raise it to "
                        "--max-connections)")
    p.add_argument("--max-header-bytes", type=int, default=64 * 1024, help="a request's line and headers; more: 431")
    p.add_argument("--header-timeout", type=float, default=30.0,
                   help="seconds a client has to send a request's headers (slow clients are closed with 408)")
    p.add_argument("--body-timeout", type=float, default=60.0, help="seconds a client has to send a request's body")
    p.add_argument("--write-timeout", type=float, default=60.0,
                   help="seconds a client may leave over 64 KiB of a response unread before it is dropped")
    p.add_argument("--prefix-cache-mb", type=float, default=DEFAULT_MB,
                   help=f"memory for K/V of earlier requests' prefixes (default {DEFAULT_MB} MB)")
    p.add_argument("--no-prefix-cache", action="store_true", help="prefill every prompt from scratch")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: the model's name)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    ray = p.add_argument_group("Ray Serve (pip install 'tachy[ray]'; docs/scale_out.md)")
    ray.add_argument("--ray", action="store_true",
                     help="serve on Ray Serve: replicas of the same app, each with its own engine")
    ray.add_argument("--replicas", type=int, default=None, help="replicas to start (default 1)")
    ray.add_argument("--min-replicas", type=int, default=None, help="autoscaling lower bound")
    ray.add_argument("--max-replicas", type=int, default=None, help="autoscaling upper bound")
    ray.add_argument("--ray-address", default=None,
                     help="join this Ray cluster ('auto': the one `ray start` runs here); default: start Ray locally")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica (also its torch threads)")
    ray.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica (with --device cuda)")
    p.set_defaults(func=cmd_serve)


EXTRA_COMMANDS.append(register)
