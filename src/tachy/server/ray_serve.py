"""``tachy serve --ray``: the same OpenAI-compatible app on Ray Serve, one engine per replica.

Ray hosts the app, it does not re-implement it: each replica is a Ray actor that loads one engine and builds
the app with ``create_app`` (what ``tachy serve`` runs), and Ray's HTTP proxy hands it requests through Ray's
ASGI ingress. Ray adds what one process cannot: replicas on many machines, routing (ray_router.py: a
conversation stays on its replica, other requests go to the least loaded one), replica health from the app's
own health check (a stalled worker gets its replica replaced), replacement of replicas that die, and
autoscaling between bounds. Needs the ``ray`` extra: ``pip install 'tachy[ray]'``.
"""
from __future__ import annotations

import dataclasses
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from ..prefix_cache import DEFAULT_MB
from .ray_router import ROUTER_PATH

REPLICA_HEADER = "x-tachy-replica"   # every response names the replica that answered it


@dataclass(frozen=True)
class EngineSpec:
    """What each replica loads (the arguments of ``tachy.load``), how many torch threads it runs (None: as
    many as the CPUs Ray gave the replica) and its prefix cache's budget (None: off)."""
    model: str | None = None
    dtype: str | None = None
    device: str | None = None
    threads: int | None = None
    prefix_cache_mb: float | None = DEFAULT_MB


@dataclass(frozen=True)
class RayServeConfig:
    """The deployment: how many replicas, their resources, and where Ray and its HTTP proxy run.

    replicas: replicas to start (and keep, without autoscaling bounds). min_replicas / max_replicas: let
    Ray's autoscaler move between them, aiming at ``target_ongoing_requests`` per replica. address: None
    starts (or joins) Ray on this machine; "auto" or "ray://host:10001" joins a running cluster.
    """
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 4.0
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    max_ongoing_requests: int = 72   # requests Ray sends one replica at once: its batch plus its queue
    host: str = "127.0.0.1"
    port: int = 8000
    address: str | None = None
    app_name: str = "tachy"
    health_period_s: float = 5.0
    health_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        low = self.min_replicas if self.min_replicas is not None else self.replicas
        high = self.max_replicas if self.max_replicas is not None else self.replicas
        if not 0 <= low <= self.replicas <= high or high < 1:
            raise ValueError(f"need 0 <= min_replicas ({low}) <= replicas ({self.replicas}) <= max_replicas "
                             f"({high}), max_replicas >= 1")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of ``Deployment.options``."""
        options: dict[str, Any] = dict(
            ray_actor_options={"num_cpus": self.replica_cpus, "num_gpus": self.replica_gpus},
            max_ongoing_requests=self.max_ongoing_requests,
            health_check_period_s=self.health_period_s, health_check_timeout_s=self.health_timeout_s,
            request_router_config=RequestRouterConfig(request_router_class=ROUTER_PATH))
        if self.autoscaling:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas if self.min_replicas is not None else self.replicas,
                "max_replicas": self.max_replicas if self.max_replicas is not None else self.replicas,
                "initial_replicas": self.replicas, "target_ongoing_requests": self.target_ongoing_requests}
        else:
            options["num_replicas"] = self.replicas
        return options


class ReplicaHeader:
    """ASGI middleware adding ``x-tachy-replica: <replica id>`` to every HTTP response, so a client (and the
    affinity test) can see which replica answered."""

    def __init__(self, app, replica: str):
        self.tachy_app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.tachy_app(scope, receive, send)

        async def send_named(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.tachy_app(scope, receive, send_named)


@serve.deployment(name="TachyReplica")
@serve.ingress()
class TachyReplica:
    """One replica: one engine, one app (built by ``__serve_build_asgi_app__`` once the engine is loaded)."""

    def __init__(self, spec: EngineSpec, app_options: dict[str, Any]):
        import torch

        import tachy

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(spec.threads or max(1, int(cpus)))
        self.engine = tachy.load(spec.model, dtype=spec.dtype, device=spec.device, progress=False)
        self.engine.set_prefix_cache(spec.prefix_cache_mb)
        self.app_options = app_options
        self.replica_id = serve.get_replica_context().replica_tag
        self.tachy_app = None

    def __serve_build_asgi_app__(self):
        from .app import create_app

        self.tachy_app = create_app(self.engine, **self.app_options)
        self.tachy_app.add_middleware(ReplicaHeader, replica=self.replica_id)
        return self.tachy_app

    def check_health(self) -> None:
        """Ray's health check is the app's own (/health): a stalled or stopping worker fails it, and Ray
        replaces the replica."""
        if self.tachy_app is None:
            return
        report = self.tachy_app.state.health()
        if report["status"] != "ok":
            raise RuntimeError(f"tachy replica {self.replica_id} is unhealthy: {report}")


def application(spec: EngineSpec, app_options: dict[str, Any], config: RayServeConfig):
    """The Ray Serve application (``serve.run`` it, or point a Serve config file's import_path at a builder
    that returns it)."""
    return TachyReplica.options(**config.deployment_options()).bind(spec, app_options)


def build(args: dict[str, Any]):
    """Application builder for Serve config files and KubeRay's RayService (``import_path:
    tachy.server.ray_serve:build``). ``args`` holds fields of EngineSpec and RayServeConfig by name, the
    rest are ``create_app``'s options (max_batch, max_queue, api_key ...); there the config file's
    ``http_options`` decide host and port."""
    names = lambda cls: {f.name for f in dataclasses.fields(cls)}   # noqa: E731
    spec = EngineSpec(**{k: v for k, v in args.items() if k in names(EngineSpec)})
    config = RayServeConfig(**{k: v for k, v in args.items() if k in names(RayServeConfig)})
    options = {k: v for k, v in args.items() if k not in names(EngineSpec) | names(RayServeConfig)}
    if "max_ongoing_requests" not in args:
        config = dataclasses.replace(config, max_ongoing_requests=replica_room(options))
    return application(spec, options, config)


def replica_room(app_options: dict[str, Any]) -> int:
    """How many requests Ray should send one replica at once: what its app batches plus what it queues
    (more would get 429 from the replica while another has room)."""
    return app_options.get("max_queue", 64) + app_options.get("max_batch", 8)


def start(spec: EngineSpec, app_options: dict[str, Any], config: RayServeConfig, **ray_init: Any) -> str:
    """Start (or join) Ray, deploy the app and wait until its replicas are up; returns the base URL.
    ``ray_init``: extra arguments of ``ray.init`` (the tests start a small local cluster)."""
    if not ray.is_initialized():
        ray.init(address=config.address, include_dashboard=False, **ray_init)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(application(spec, app_options, config), name=config.app_name, route_prefix="/", blocking=False)
    return f"http://{config.host}:{config.port}"


def serve_forever(spec: EngineSpec, app_options: dict[str, Any], config: RayServeConfig) -> None:
    """``tachy serve --ray``: deploy, then wait for SIGINT/SIGTERM and take the deployment down."""
    url = start(spec, app_options, config)
    print(f"serving on Ray Serve at {url} ({config.replicas} replica(s); OpenAI API under /v1)",
          file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr, flush=True)
    finally:
        serve.delete(config.app_name)
        if config.address is None:
            serve.shutdown()
            ray.shutdown()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
