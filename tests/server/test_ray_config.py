"""`tachy serve --ray` without a cluster: its options, the deployment they make, and the router's hashing."""
from __future__ import annotations

import importlib.util

import pytest

from tachy.cli import main

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed (make test installs requirements/ray.txt)")


def test_ray_options_need_ray(capsys):
    assert main(["serve", "--replicas", "2"]) == 2
    assert "--replicas needs --ray" in capsys.readouterr().err


@pytest.mark.skipif(HAVE_RAY, reason="Ray is installed")
def test_without_ray_installed_it_says_how_to_get_it(capsys):
    assert main(["serve", "--ray"]) == 2
    assert "pip install 'tachy[ray]'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ray_serve():
    from tachy.server import ray_serve
    return ray_serve


@needs_ray
def test_bad_autoscaling_bounds_are_a_user_error(capsys):
    assert main(["serve", "--ray", "--replicas", "3", "--max-replicas", "2"]) == 2
    assert "max_replicas" in capsys.readouterr().err


@needs_ray
def test_fixed_replicas_or_autoscaling_bounds(ray_serve):
    RayServeConfig = ray_serve.RayServeConfig
    fixed = RayServeConfig(replicas=3, replica_cpus=2).deployment_options()
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.0}
    assert fixed["request_router_config"].request_router_class.endswith("ConversationRouter")
    scaled = RayServeConfig(replicas=2, min_replicas=1, max_replicas=4).deployment_options()
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 2,
                                            "target_ongoing_requests": 4.0}


@needs_ray
def test_rendezvous_moves_only_the_sessions_of_a_replica_that_left():
    from tachy.server.ray_router import rendezvous_order

    replicas = ["a1", "b2", "c3"]
    sessions = [f"conversation-{i}" for i in range(300)]
    before = {s: rendezvous_order(s, replicas)[0] for s in sessions}
    assert set(before.values()) == set(replicas)   # every replica gets some
    after = {s: rendezvous_order(s, ["a1", "c3"])[0] for s in sessions}
    assert all(after[s] == before[s] for s in sessions if before[s] != "b2")
    assert rendezvous_order("x", replicas) == rendezvous_order("x", list(reversed(replicas)))


@needs_ray
def test_the_kuberay_manifest_builds_the_application(ray_serve):
    """docs/scale_out/rayservice.yaml: its Serve config passes Ray's schema and its args build the app."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    manifest = yaml.safe_load((Path(__file__).parents[2] / "docs" / "scale_out" / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService"
    serve_config = ServeDeploySchema(**yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    app = serve_config.applications[0]
    module, name = app.import_path.split(":")
    assert module == ray_serve.__name__ and getattr(ray_serve, name) is ray_serve.build
    deployment = ray_serve.build(app.args)._bound_deployment
    assert deployment._deployment_config.max_ongoing_requests == 72   # max_batch + max_queue
    assert deployment._deployment_config.autoscaling_config.max_replicas == 8
    spec, options = deployment.init_args
    assert spec == ray_serve.EngineSpec(model="smollm2-135m") and options == {"max_batch": 8, "max_queue": 64}


@needs_ray
def test_ray_health_check_is_the_apps_own(ray_serve):
    """A replica whose app reports anything but "ok" (a stalled worker, shutting down) fails Ray's health
    check, so Ray replaces it."""
    from types import SimpleNamespace

    check = ray_serve.TachyReplica.func_or_class.check_health
    report = {"status": "ok"}
    app = SimpleNamespace(state=SimpleNamespace(health=lambda: report))
    replica = SimpleNamespace(replica_id="r1", tachy_app=app)
    check(replica)
    report["status"] = "stalled"
    with pytest.raises(RuntimeError, match="r1 is unhealthy"):
        check(replica)
