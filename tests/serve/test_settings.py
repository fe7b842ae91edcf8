"""Service settings, the shipped configs, overrides from the environment and the command line, build_app."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from gpt2serve import serve_app
from gpt2serve.actors.autoscaling import POLICY_PATH, desired_replicas, engine_load_policy
from gpt2serve.actors.settings import DEFAULT_MAX_ONGOING, ServiceConfig
from gpt2serve.engine.config import EngineConfig

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(ROOT.glob("configs/*.yaml"))
GPT2XL = str(ROOT / "configs/gpt2xl.yaml")
SERVE_CONFIGS = [p for p in CONFIGS if p.name in ("tiny.yaml", "gpt2.yaml", "gpt2xl.yaml", "multi_replica.yaml")]


def test_the_four_serve_configs_exist():
    assert {p.name for p in SERVE_CONFIGS} == {"tiny.yaml", "gpt2.yaml", "gpt2xl.yaml", "multi_replica.yaml"}


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_configs_validate_and_keep_serve_knobs_on_purpose(path):
    cfg = ServiceConfig.from_args({"config": str(path)}, env={})
    assert EngineConfig.from_yaml(path) == cfg.engine  # the engine CLI reads the same settings
    for dep in (cfg.ingress, cfg.scheduler, cfg.worker):
        # Serve's default of 5 concurrent calls per replica would cap the engine's batch.
        assert dep.max_ongoing_requests >= cfg.engine.max_num_seqs
    if path.name != "tiny.yaml":
        assert cfg.worker.ray_actor_options.get("num_gpus") == 1
        assert cfg.engine.device == "cuda"
    auto = cfg.worker.autoscaling_config
    if path.name == "multi_replica.yaml":
        assert auto["min_replicas"] < auto["max_replicas"]
        assert auto["target_ongoing_requests"] < cfg.engine.max_num_seqs
    opts = serve_app.worker_options(cfg)
    assert ("num_replicas" in opts) == (auto is None)


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serves_request_timeout_comes_after_the_services_own_deadlines(path):
    """Serve cuts a request at http_options.request_timeout_s with a plain-text 408 and leaves the request running
    on its worker; the service's own deadline (any request's, up to max_request_timeout_s) must come first."""
    from ray.serve.schema import ServeDeploySchema

    serve_config = ServeDeploySchema(**yaml.safe_load(path.read_text()))
    cfg = ServiceConfig.from_args({"config": str(path)}, env={})
    assert cfg.request_timeout_s <= cfg.max_request_timeout_s < serve_config.http_options.request_timeout_s


def test_gpt2xl_config_is_the_w4_setup():
    cfg = ServiceConfig.from_args({"config": GPT2XL}, env={})
    assert (cfg.engine.model, cfg.engine.dtype, cfg.model_name) == ("gpt2-xl", "float16", "gpt2-xl")
    assert cfg.engine.max_num_seqs >= 100  # W4's 100 streams run in one batch


def test_load_format_from_environment_and_from_arguments():
    base = {"config": GPT2XL}
    assert ServiceConfig.from_args(base, env={}).engine.load_format == "auto"
    env = {"GPT2SERVE_LOAD_FORMAT": "dummy", "GPT2SERVE_NUM_GPU_BLOCKS": "64", "GPT2SERVE_NOT_A_FIELD": "x"}
    cfg = ServiceConfig.from_args(base, env=env)
    assert (cfg.engine.load_format, cfg.engine.num_gpu_blocks) == ("dummy", 64)
    # `serve run gpt2serve.serve_app:build_app config=... load_format=dummy max_queued_requests=8`: strings, typed here;
    # arguments win over the environment.
    cfg = ServiceConfig.from_args({**base, "load_format": "safetensors", "max_queued_requests": "8"},
                                  env={"GPT2SERVE_LOAD_FORMAT": "dummy"})
    assert (cfg.engine.load_format, cfg.max_queued_requests) == ("safetensors", 8)


def test_nested_args_as_serve_passes_them_from_a_config_file():
    cfg = ServiceConfig.from_args({"engine": {"model": "gpt2", "max_num_seqs": 4}, "worker": {"num_replicas": 3}},
                                  env={})
    assert cfg.engine.max_num_seqs == 4 and cfg.worker.num_replicas == 3


def test_bad_settings_are_refused():
    with pytest.raises(ValidationError, match="load_format"):
        ServiceConfig.from_args({"load_format": "pickle"}, env={})
    with pytest.raises(ValidationError, match="extra"):
        ServiceConfig.from_args({"max_queue": 3}, env={})
    with pytest.raises(ValidationError, match="target_ongoing_requests"):
        ServiceConfig(worker={"autoscaling_config": {"target_ongoing_requests": 10}, "max_ongoing_requests": 10})
    with pytest.raises(ValidationError, match="exactly one replica"):
        ServiceConfig(scheduler={"num_replicas": 2})
    with pytest.raises(ValidationError, match="must not exceed max_request_timeout_s"):
        ServiceConfig(request_timeout_s=100, max_request_timeout_s=60)
    with pytest.raises(ValidationError, match="max_failed_steps"):
        ServiceConfig(worker_health={"max_failed_steps": 0})


def test_defaults_never_cap_the_batch_at_serves_default():
    cfg = ServiceConfig()
    assert cfg.worker.max_ongoing_requests == cfg.ingress.max_ongoing_requests == DEFAULT_MAX_ONGOING > 5


def test_build_app_wires_router_autoscaling_policy_and_overrides():
    app = serve_app.build_app({"config": str(ROOT / "configs/multi_replica.yaml"), "load_format": "dummy"})
    ingress = app._bound_deployment
    scheduler_app, worker_app = ingress.init_args[1], ingress.init_args[2]
    worker = worker_app._bound_deployment
    assert worker.name == "ModelWorker" and scheduler_app._bound_deployment.name == "Scheduler"
    assert worker.init_args[0]["load_format"] == "dummy"
    config = worker._deployment_config
    assert config.request_router_config.request_router_class.endswith("PinnedReplicaRouter")
    assert config.autoscaling_config.policy.policy_function == POLICY_PATH
    assert config.max_ongoing_requests == DEFAULT_MAX_ONGOING
    # The worker's health limits and the test-only fault switch (off) reach the worker.
    assert worker.init_args[6:] == ({"stall_timeout_s": 120.0, "max_failed_steps": 3}, False)
    # A dead scheduler is noticed sooner than Serve's default health check would.
    assert scheduler_app._bound_deployment._deployment_config.health_check_period_s == 2.0


def test_engine_load_policy():
    assert desired_replicas([10, 30], target_per_replica=20) == 2

    class Ctx:
        current_num_replicas = 3
        aggregated_metrics = {"engine_load": {"a": 90.0, "b": 60.0, "c": 0.0}}

        class config:
            @staticmethod
            def get_target_ongoing_requests():
                return 50

    assert engine_load_policy(Ctx())[0] == 3
    Ctx.aggregated_metrics = {}
    assert engine_load_policy(Ctx())[0] == 3  # nothing reported yet: hold
