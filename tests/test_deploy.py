"""Deployment artifacts (Dockerfile, docker-compose.yml, deploy/): rendered, validated and checked
against the real service, without a Docker engine or a cluster.

* Kubernetes: both overlays render with ``kubectl kustomize`` and every object validates against the
  Kubernetes schemas (kubernetes-validate, strict); the custom resources are checked for their
  required fields; names, selectors, ports and environment variables refer to things that exist.
* Prometheus: ``promtool check config``/``check rules``/``test rules``; the PrometheusRule carries
  exactly the groups of alerts.yml.
* Metrics: a real server is started and scraped; every metric the dashboard and the alerts use is
  exported, and every dashboard query returns data when evaluated by promtool over that scrape.
* docker compose: validated against the Compose Specification's JSON schema (check-jsonschema's
  vendored copy, offline) and checked against the repository; Redis keeps its data in an append-only
  file, checked with a real redis-server started with the deployed arguments.
* The Dockerfile: linted with hadolint and checked textually; the bundled-model selection and the
  smoke checks of deploy/docker/build-local.sh (which builds and runs the image, outside this suite)
  are run here against real directories and a real server.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from service.cli import SERVE_FLAGS, WORKER_FLAGS
from service.queue.redis_streams import LAYOUT
from service.settings import Settings
from tests.deploy_checks import (
    DEPLOY,
    alert_exprs,
    crd_errors,
    dashboard_panels,
    dashboard_targets,
    dockerfile_instructions,
    dockerignore_excludes,
    interpolate,
    kustomize,
    metric_names,
    missing_metrics,
    promtool_data_test,
    run,
    tool,
    venv_tool,
)
from tests.servers import REPO, RedisServer, Server, WorkerProcess, child_env, free_port, wait_until

K8S_VERSION = "1.31.0"
OVERLAYS = ("cpu-local", "gpu-cluster")
NAMESPACE = "fastcache"
CRD_KINDS = {"ServiceMonitor", "ScaledObject", "PrometheusRule"}
DASHBOARD = DEPLOY / "grafana" / "fastcache-dashboard.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
PROMETHEUS_RULE = DEPLOY / "prometheus" / "prometheusrule.yaml"
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
BUNDLE_MODELS = DEPLOY / "docker" / "bundle-models.sh"
BUILD_LOCAL = DEPLOY / "docker" / "build-local.sh"
SMOKE = DEPLOY / "docker" / "smoke.py"
OFFICIAL_IMAGES = ("redis", "prom/prometheus", "grafana/grafana", "minio/minio", "minio/mc")
API_REQUIREMENTS = DEPLOY / "docker" / "api-requirements.txt"
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


# ============================================================================ fixtures
@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: kustomize(DEPLOY / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def scraped(tiny_dit_dir):
    """A real server (tiny DiT) after one generation: ``(server, /metrics text)``."""
    server = Server("--model", str(tiny_dit_dir))
    try:
        with server.client() as client:
            response = client.post("/generate", json={"prompt": "1", "steps": 3})
            assert response.status_code == 200, response.text
        yield server, server.metrics()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def scaled_out(tiny_dit_dir):
    """The deployed topology (compose, Kubernetes): Redis, a worker and an API on the Redis queue,
    after one generation: ``(api, worker, API /metrics, worker /metrics)``."""
    redis = RedisServer()
    worker = api = None
    try:
        worker = WorkerProcess(redis.url, "--model", str(tiny_dit_dir))
        api = Server("--model", str(tiny_dit_dir), env={**child_env(), "FASTCACHE_QUEUE": redis.url})
        with api.client() as client:
            response = client.post("/generate", json={"prompt": "1", "steps": 3})
            assert response.status_code == 200, response.text
        yield api, worker, api.metrics(), worker.metrics()
    finally:
        for process in (api, worker, redis):
            if process is not None:
                process.stop()


def objects(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = objects(docs, kind)
    assert name in found, f"no {kind} {name}; have {sorted(found)}"
    return found[name]


def config_data(docs: list[dict]) -> dict[str, str]:
    maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("fastcache-config")]
    assert len(maps) == 1, [m["metadata"]["name"] for m in maps]
    return maps[0]["data"]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def container(workload: dict, name: str) -> dict:
    found = {c["name"]: c for c in pod_spec(workload)["containers"]}
    assert name in found, f"{workload['metadata']['name']} has no container {name}"
    return found[name]


def selects(selector: dict, labels: dict) -> bool:
    match = selector.get("matchLabels", selector)
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def container_env(docs: list[dict], c: dict) -> dict[str, str | None]:
    """Environment a container gets from ``env`` and ``envFrom`` ConfigMaps (secrets: None)."""
    env: dict[str, str | None] = {}
    configmaps = objects(docs, "ConfigMap")
    for source in c.get("envFrom") or []:
        ref = source.get("configMapRef")
        if ref:
            assert ref["name"] in configmaps, f"envFrom ConfigMap {ref['name']} is not in the render"
            env.update(configmaps[ref["name"]]["data"])
    for var in c.get("env") or []:
        env[var["name"]] = var.get("value")
    return env


# ============================================================================ Kubernetes
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_objects_validate(rendered, overlay):
    import kubernetes_validate

    errors, kinds = [], set()
    for obj in rendered[overlay]:
        kind, name = obj["kind"], obj["metadata"]["name"]
        kinds.add(kind)
        if kind in CRD_KINDS:
            errors += crd_errors(obj)
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{kind}/{name}: {error.message} at {'/'.join(map(str, error.path))}")
        except kubernetes_validate.SchemaNotFoundError as error:
            errors.append(f"{kind}/{name}: {error.message}")
        if kind != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{kind}/{name} outside {NAMESPACE}"
        assert obj["metadata"]["labels"].get("app.kubernetes.io/part-of") == "fastcache", f"{kind}/{name}"
    assert not errors, "\n".join(errors)
    assert {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "StatefulSet",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "ScaledObject",
        "PrometheusRule",
    } <= kinds


def test_validators_reject_broken_objects(rendered):
    """The validation above can fail: a misspelt field, a missing trigger, an incomplete monitor."""
    import kubernetes_validate

    docs = rendered["gpu-cluster"]
    worker = copy.deepcopy(one(docs, "Deployment", "fastcache-worker"))
    container(worker, "worker")["startupprobe"] = container(worker, "worker").pop("startupProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, K8S_VERSION, strict=True)
    scaled = copy.deepcopy(one(docs, "ScaledObject", "fastcache-worker"))
    del scaled["spec"]["triggers"]
    assert any("spec.triggers" in e for e in crd_errors(scaled))
    monitor = copy.deepcopy(one(docs, "ServiceMonitor", "fastcache-api"))
    monitor["spec"]["endpoints"] = []
    assert crd_errors(monitor)
    rule = copy.deepcopy(one(docs, "PrometheusRule", "fastcache-alerts"))
    rule["spec"].pop("groups")
    assert crd_errors(rule)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve(rendered, overlay):
    """Selectors, ports, targets and environment variables point at objects that exist."""
    docs = rendered[overlay]
    workloads = {**objects(docs, "Deployment"), **objects(docs, "StatefulSet")}
    services = objects(docs, "Service")
    for name, service in services.items():
        backing = [
            w
            for w in workloads.values()
            if selects(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(backing) == 1, f"Service {name} selects {len(backing)} workloads"
        ports = {p["name"] for c in pod_spec(backing[0])["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service {name}: no container port {port['targetPort']}"
    for name, monitor in objects(docs, "ServiceMonitor").items():
        matched = [s for s in services.values() if selects(monitor["spec"]["selector"], s["metadata"]["labels"])]
        assert len(matched) == 1, f"ServiceMonitor {name} selects {len(matched)} Services"
        port_names = {p["name"] for p in matched[0]["spec"]["ports"]}
        assert all(e["port"] in port_names for e in monitor["spec"]["endpoints"]), name
        assert all(e.get("path", "/metrics") == "/metrics" for e in monitor["spec"]["endpoints"]), name
    for kind in ("HorizontalPodAutoscaler", "ScaledObject"):
        for name, scaler in objects(docs, kind).items():
            target = scaler["spec"]["scaleTargetRef"]
            assert target.get("kind", "Deployment") == "Deployment" and target["name"] in workloads, name
    for name, budget in objects(docs, "PodDisruptionBudget").items():
        assert any(
            selects(budget["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"]) for w in workloads.values()
        ), f"PodDisruptionBudget {name} selects nothing"
    for workload in workloads.values():
        for c in pod_spec(workload)["containers"]:
            container_env(docs, c)  # every envFrom ConfigMap exists
            for var in c.get("env") or []:
                ref = (var.get("valueFrom") or {}).get("secretKeyRef")
                if ref:  # secrets are created by the user: the reference must be optional
                    assert ref.get("optional") is True, f"{c['name']}: secret {ref['name']} not optional"
    # the Redis the API, the workers and KEDA use is the in-cluster one
    data = config_data(docs)
    redis = one(docs, "Service", "fastcache-redis")
    assert data["FASTCACHE_QUEUE"] == data["FASTCACHE_REDIS"] == "redis://fastcache-redis:6379/0"
    assert data["REDIS_ADDRESS"] == f"fastcache-redis.{redis['metadata']['namespace']}.svc:6379"
    assert 6379 in [p["port"] for p in redis["spec"]["ports"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_autoscaling_on_the_redis_stream(rendered, overlay):
    docs = rendered[overlay]
    scaled = one(docs, "ScaledObject", "fastcache-worker")
    worker = one(docs, "Deployment", "fastcache-worker")
    assert "replicas" not in worker["spec"], "KEDA owns the worker replica count"
    assert "replicas" not in one(docs, "Deployment", "fastcache-api")["spec"], "the HPA owns the API replica count"
    spec = scaled["spec"]
    env_container = container(worker, spec["scaleTargetRef"].get("envSourceContainerName", "worker"))
    env = container_env(docs, env_container)
    triggers = spec["triggers"]
    assert {t["type"] for t in triggers} == {"redis-streams"}
    kinds = set()
    for trigger in triggers:
        meta = trigger["metadata"]
        # the stream and consumer group the service really uses
        assert (
            (meta["stream"], meta["consumerGroup"])
            == (LAYOUT.stream, LAYOUT.group)
            == ("fastcache:jobs", "fastcache-workers")
        )
        assert meta["addressFromEnv"] in env, f"{meta['addressFromEnv']} is not in the worker's environment"
        assert re.fullmatch(r"[a-z0-9.-]+:\d+", env[meta["addressFromEnv"]]), "KEDA wants host:port"
        kinds |= {k for k in ("pendingEntriesCount", "lagCount") if k in meta}
    assert kinds == {"pendingEntriesCount", "lagCount"}
    modifiers = spec["advanced"]["scalingModifiers"]
    # one worker per full batch of outstanding jobs
    assert int(modifiers["target"]) == int(config_data(docs)["FASTCACHE_MAX_BATCH_SIZE"])
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    hpa = one(docs, "HorizontalPodAutoscaler", "fastcache-api")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert container(one(docs, "Deployment", "fastcache-api"), "api")["resources"]["requests"]["cpu"]
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workloads_probes_shutdown_and_security(rendered, overlay):
    docs = rendered[overlay]
    data = config_data(docs)
    timeout = float(data["FASTCACHE_REQUEST_TIMEOUT"])
    # every FASTCACHE_* key is a real setting (a typo would be silently ignored by the service)
    unknown = [k for k in data if k.startswith("FASTCACHE_") and k[10:].lower() not in Settings.model_fields]
    assert not unknown, f"not settings of the service: {unknown}"
    assert data["FASTCACHE_HOST"] == "0.0.0.0"
    for name, cname, port in (("fastcache-api", "api", "http"), ("fastcache-worker", "worker", "metrics")):
        workload = one(docs, "Deployment", name)
        spec, c = pod_spec(workload), container(workload, cname)
        assert spec["terminationGracePeriodSeconds"] > timeout, f"{name} would be killed mid-batch"
        assert spec["enableServiceLinks"] is False, "service links inject FASTCACHE_*-like variables"
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["command"] == ["fastcache-serve" if cname == "api" else "fastcache-worker"]
        probes = {kind: c[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
        assert all(p["port"] == port for p in probes.values()), name
        assert probes["readinessProbe"]["path"] == "/readyz" and probes["livenessProbe"]["path"] == "/healthz"
        for section in c["resources"].values():
            for resource, amount in section.items():
                assert QUANTITY.match(str(amount)), f"{name}: {resource}={amount!r} is not a quantity"
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        if c["securityContext"].get("readOnlyRootFilesystem"):
            assert "/tmp" in mounts, f"{name}: read-only root needs a writable /tmp"
    worker = container(one(docs, "Deployment", "fastcache-worker"), "worker")
    startup = worker["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 30 * 60, "slow model loads need ~30 min"
    assert worker["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert {m["mountPath"] for m in worker["volumeMounts"]} >= {"/models"}
    assert data["HF_HOME"].startswith("/models/")
    budgets = objects(docs, "PodDisruptionBudget")
    assert {"fastcache-api", "fastcache-worker"} <= set(budgets)


def test_gpu_request_and_images_per_overlay(rendered):
    gpu, cpu = rendered["gpu-cluster"], rendered["cpu-local"]
    worker = container(one(gpu, "Deployment", "fastcache-worker"), "worker")
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert worker["image"] == "fastcache-serve:cuda"
    assert container(one(gpu, "Deployment", "fastcache-api"), "api")["image"] == "fastcache-serve:api"
    assert config_data(gpu)["FASTCACHE_DEVICE"] == "cuda"
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(cpu), "cpu-local must request no GPU"
    assert config_data(cpu)["FASTCACHE_DEVICE"] == "cpu"
    for docs in (gpu, cpu):
        images = {
            c["image"]
            for w in [*objects(docs, "Deployment").values(), *objects(docs, "StatefulSet").values()]
            for c in pod_spec(w)["containers"]
        }
        placeholders = [i for i in images if i.startswith(("fastcache-serve-api", "fastcache-serve-worker"))]
        assert not placeholders, f"base image placeholders left: {placeholders}"
    assert container(one(cpu, "Deployment", "fastcache-worker"), "worker")["image"] == "fastcache-serve:cpu"
    assert container(one(cpu, "Deployment", "fastcache-api"), "api")["image"] == "fastcache-serve:api"


def test_the_gpu_overlay_stores_images_in_an_object_store_with_credentials_from_a_secret(rendered):
    docs = rendered["gpu-cluster"]
    data = config_data(docs)
    assert data["FASTCACHE_RESULT_STORE"].startswith("s3://") and data["AWS_ENDPOINT_URL"].startswith("https://")
    for name, cname in (("fastcache-api", "api"), ("fastcache-worker", "worker")):
        env = {v["name"]: v for v in container(one(docs, "Deployment", name), cname).get("env") or []}
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "fastcache-object-store", (name, var)


def test_monitoring_objects_come_from_the_single_sources(rendered, dashboard):
    for docs in rendered.values():
        board = one(docs, "ConfigMap", "fastcache-grafana-dashboard")
        assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(board["data"]["fastcache-dashboard.json"]) == dashboard
        rule = one(docs, "PrometheusRule", "fastcache-alerts")
        assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"], (
            "PrometheusRule differs from alerts.yml: run python deploy/prometheus/sync_prometheusrule.py"
        )
        jobs = set(objects(docs, "Service"))
        assert {"fastcache-api", "fastcache-worker"} <= jobs  # job label of the ServiceMonitor targets
    check = run([sys.executable, str(DEPLOY / "prometheus" / "sync_prometheusrule.py"), "--check"])
    assert check.returncode == 0, check.stderr


def test_shared_model_cache_component(tmp_path):
    """The optional component swaps the workers' model cache to a ReadWriteMany PVC."""
    import kubernetes_validate

    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(DEPLOY / "overlays" / "gpu-cluster", tmp_path)],
                "components": [os.path.relpath(DEPLOY / "components" / "shared-model-cache", tmp_path)],
            }
        )
    )
    docs = kustomize(tmp_path)
    claim = one(docs, "PersistentVolumeClaim", "fastcache-models")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    worker = one(docs, "Deployment", "fastcache-worker")
    volume = {v["name"]: v for v in pod_spec(worker)["volumes"]}["models"]
    assert volume == {"name": "models", "persistentVolumeClaim": {"claimName": "fastcache-models"}}
    for obj in (claim, worker):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


# ============================================================================ Prometheus rules
def test_promtool_checks_rules_and_config():
    promtool = tool("promtool")
    for args in (["check", "rules", str(ALERTS)], ["check", "config", str(PROMETHEUS_CONFIG)]):
        result = run([promtool, *args])
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_promtool_rule_unit_tests_pass_and_cover_high_latency():
    result = run([tool("promtool"), "test", "rules", str(ALERTS_TEST)])
    assert result.returncode == 0, result.stdout + result.stderr
    cases = [
        case for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"] for case in test.get("alert_rule_test", [])
    ]
    assert any(c["alertname"] == "FastCacheHighLatencyP95" and c["exp_alerts"] for c in cases)


def test_promtool_rule_unit_tests_catch_a_broken_rule(tmp_path):
    """The unit tests are sensitive: a latency alert that can no longer fire fails them."""
    broken = ALERTS.read_text().replace(") > 60\n", ") > 6000\n", 1)
    assert broken != ALERTS.read_text()
    (tmp_path / "alerts.yml").write_text(broken)
    (tmp_path / "alerts_test.yml").write_text(ALERTS_TEST.read_text())
    result = run([tool("promtool"), "test", "rules", str(tmp_path / "alerts_test.yml")])
    assert result.returncode != 0 and "FastCacheHighLatencyP95" in result.stdout + result.stderr


def test_alert_rules_cover_the_required_conditions():
    rules = {
        rule["alert"]: rule
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    required = {
        "FastCacheHighLatencyP95": "fastcache_request_duration_seconds_bucket",
        "FastCacheHighErrorRate": 'status=~"5..',
        "FastCacheQueueGrowing": "fastcache_queue_depth",
        "FastCacheStreamBacklogGrowing": "fastcache_stream_lag_entries",
        "FastCacheLowCacheHitRate": "fastcache_cache_hit_ratio",
        "FastCacheWorkerDown": 'up{job="fastcache-worker"}',
    }
    for alert, needle in required.items():
        assert alert in rules and needle in rules[alert]["expr"], alert
    for alert, rule in rules.items():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, alert
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], alert
    # the scrape jobs the rules name exist in compose's Prometheus (Kubernetes: the Service names)
    jobs = {job["job_name"] for job in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]}
    assert {"fastcache-api", "fastcache-worker"} <= jobs


# ============================================================================ metrics vs. the service
def test_metric_name_resolution_can_fail():
    text = (
        '# TYPE fastcache_batch_size histogram\nfastcache_batch_size_bucket{le="1"} 1\n'
        "# TYPE fastcache_images_generated_total counter\n"
    )
    assert missing_metrics(metric_names("rate(fastcache_batch_size_bucket[5m])"), text) == []
    assert missing_metrics({"fastcache_images_generated_total"}, text) == []
    assert missing_metrics(metric_names('sum(rate(fastcache_requests_total{job="fastcache-api"}[5m]))'), text) == [
        "fastcache_requests_total"
    ]
    assert missing_metrics({"fastcache_images_generated_total_bucket"}, text) == [
        "fastcache_images_generated_total_bucket"
    ]


def used_metrics(dashboard: dict) -> dict[str, set[str]]:
    """``{where: metric names}`` for every dashboard query, template variable and alert rule."""
    used: dict[str, set[str]] = {}
    for panel, target in dashboard_targets(dashboard):
        used.setdefault(f"panel {panel['title']!r}", set()).update(metric_names(target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            used[f"variable {variable['name']}"] = metric_names(variable["definition"])
    for alert, expr in alert_exprs(ALERTS).items():
        used[f"alert {alert}"] = metric_names(expr)
    return used


def test_dashboard_and_alert_metrics_are_exported(scraped, dashboard):
    _, exposition = scraped
    for panel, target in dashboard_targets(dashboard):
        assert metric_names(target["expr"]), f"panel {panel['title']!r} {target['refId']} uses no fastcache metric"
    problems = {where: missing_metrics(names, exposition) for where, names in used_metrics(dashboard).items()}
    problems = {k: v for k, v in problems.items() if v}
    assert not problems, f"not exported by the service: {problems}"


def test_worker_serves_the_probe_and_scrape_endpoints(scaled_out):
    """What the worker's probes, ServiceMonitor and container health check call (port 9100)."""
    api, worker, _, worker_exposition = scaled_out
    for path in ("/healthz", "/readyz"):
        assert httpx.get(f"{worker.url}{path}", timeout=5).status_code == 200, path
    assert "# TYPE fastcache_ready gauge" in worker_exposition
    assert httpx.get(f"{api.url}/readyz", timeout=5).status_code == 200  # a worker registered its model
    base = {k: v for k, v in os.environ.items() if not k.startswith("FASTCACHE_")}
    env = {**base, "FASTCACHE_PORT": str(free_port()), "FASTCACHE_METRICS_PORT": str(worker.metrics_port)}
    assert subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, timeout=30).returncode == 0


def test_scaled_out_stack_exports_what_dashboard_and_alerts_use(scaled_out, dashboard):
    _, _, api_exposition, worker_exposition = scaled_out
    exposition = api_exposition + "\n" + worker_exposition
    problems = {where: missing_metrics(names, exposition) for where, names in used_metrics(dashboard).items()}
    problems = {k: v for k, v in problems.items() if v}
    assert not problems, f"not exported by the API + worker on the Redis queue: {problems}"
    for family in ("fastcache_request_duration_seconds", "fastcache_queue_wait_seconds"):
        assert f"{family}_count{{" in exposition, f"{family} has no samples after a generation"


def test_every_dashboard_query_returns_data(scraped, dashboard, tmp_path):
    """promtool evaluates each query (variables on "All") over the scraped series, labelled as a
    Kubernetes scrape labels them; no query may come back empty. The documented 5xx statuses are
    added as copies of the 200 series so that error panels have something to show."""
    _, exposition = scraped
    exprs = [interpolate(t["expr"]) for _, t in dashboard_targets(dashboard)]
    leftover = [e for e in exprs if "$" in e]
    assert not leftover, f"unknown dashboard variables in {leftover}"
    test = promtool_data_test(
        exposition,
        exprs,
        {"namespace": NAMESPACE, "pod": "fastcache-worker-0", "job": "fastcache-worker", "instance": "10.0.0.1:9100"},
        extra_statuses=("499", "500", "503", "504"),
    )
    path = tmp_path / "dashboard_test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    result = run([tool("promtool"), "test", "rules", str(path)])
    assert result.returncode == 0, f"dashboard queries without data:\n{result.stdout}{result.stderr}"
    # and the check itself can fail: a label value the service never exports
    bad = promtool_data_test(
        exposition, ['sum(rate(fastcache_block_decisions_total{result="skipped"}[1m]))'], {"pod": "p"}
    )
    path.write_text(yaml.safe_dump(bad, sort_keys=False))
    assert run([tool("promtool"), "test", "rules", str(path)]).returncode != 0


def test_dashboard_structure(dashboard):
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["definition"] == "label_values(fastcache_request_duration_seconds_count, model)"
    assert re.fullmatch(r"label_values\(fastcache_[a-z_]+, pod\)", variables["pod"]["definition"])
    for name in ("model", "pod"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*", name
    panels = dashboard_panels(dashboard)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'pod=~"$pod"' in target["expr"], f"{panel['title']}: not filtered by $pod"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"panel {panel['title']!r} overlaps another"
                cells.add((x, y))
    titles = {p["title"] for p in panels}
    readme = (DEPLOY / "README.md").read_text()
    undocumented = [t for t in titles if f"| {t} |" not in readme]
    assert not undocumented, f"panels missing from deploy/README.md: {undocumented}"
    exprs = " ".join(t["expr"] for _, t in dashboard_targets(dashboard))
    for needle in (
        "histogram_quantile",
        "fastcache_request_duration_seconds_bucket",
        "fastcache_queue_depth",
        "fastcache_queue_wait_seconds_bucket",
        "fastcache_batch_size",
        "fastcache_cache_hit_ratio",
        "fastcache_tokens_computed_fraction",
        'result="approximated"',
        "fastcache_device_memory",
        "fastcache_rejected_requests_total",
        'status=~"5.."',
    ):
        assert needle in exprs, needle


def test_container_healthcheck_script(scraped):
    server, _ = scraped
    base = {k: v for k, v in os.environ.items() if not k.startswith("FASTCACHE_")}

    def check(**env: str) -> int:
        return subprocess.run(
            [sys.executable, str(HEALTHCHECK)], env={**base, **env}, capture_output=True, timeout=30
        ).returncode

    closed = str(free_port())
    assert check(FASTCACHE_PORT=str(server.port), FASTCACHE_METRICS_PORT=closed) == 0  # the API
    assert check(FASTCACHE_PORT=closed, FASTCACHE_METRICS_PORT=str(server.port)) == 0  # a worker
    assert check(FASTCACHE_PORT=closed, FASTCACHE_METRICS_PORT=closed) == 1
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200


# ============================================================================ docker compose
def test_compose_stack_is_complete_and_self_contained():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"redis", "api", "worker", "prometheus", "grafana"} <= set(services)
    built = {}
    for name, service in services.items():
        image = service.get("image")
        if "build" in service:
            build = service["build"]
            context = REPO / (build["context"] if isinstance(build, dict) else build)
            assert context.is_dir(), f"{name}: build context {context} missing"
            dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            built[name] = image
        else:
            assert image, f"{name} has neither build nor image"
            repo, _, tag = image.partition(":")
            assert repo in OFFICIAL_IMAGES, f"{name}: {image} is neither built here nor an official image"
            assert tag and tag != "latest", f"{name}: pin the tag of {image}"
        depends = service.get("depends_on") or []
        for target in depends if isinstance(depends, list) else depends.keys():
            assert target in services, f"{name} depends on unknown service {target}"
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0]
            if source.startswith(("./", "/")):
                assert (REPO / source).exists(), f"{name}: mounted {source} is not in the repository"
            else:
                assert source in (compose.get("volumes") or {}), f"{name}: volume {source} not declared"
    assert set(built) == {"api", "worker"}
    # the API runs the light image (the Dockerfile's `api` target), the worker the full one
    assert built["api"] == "fastcache-serve:api" and services["api"]["build"]["target"] == "api"
    assert built["worker"] == "fastcache-serve:cpu" and "target" not in services["worker"]["build"]
    # both store the images in the compose MinIO, which publishes the port the presigned URLs name
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["FASTCACHE_RESULT_STORE"].startswith("s3://") and env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert "9000:9000" in services["minio"]["ports"]
    assert services["api"]["environment"]["FASTCACHE_RESULT_PUBLIC_ENDPOINT"] == "http://localhost:9000"
    assert services["api"]["depends_on"]["minio-setup"]["condition"] == "service_completed_successfully"

    api, worker = services["api"], services["worker"]
    assert api["command"][0] == "fastcache-serve" and worker["command"][0] == "fastcache-worker"
    assert api["environment"]["FASTCACHE_QUEUE"] == "redis://redis:6379/0"
    assert "8000:8000" in api["ports"]
    args = worker["command"][1:]
    assert args[args.index("--redis") + 1] == "redis://redis:6379/0"
    assert args[args.index("--metrics-port") + 1] == "9100"
    flags = [a[2:].replace("-", "_") for a in args if a.startswith("--")]
    assert set(flags) <= set(WORKER_FLAGS), flags
    for service, allowed in ((api, SERVE_FLAGS), (worker, WORKER_FLAGS)):
        keys = [k for k in service.get("environment") or {} if k.startswith("FASTCACHE_")]
        unknown = [k for k in keys if k[10:].lower() not in allowed]
        assert not unknown, unknown
    timeout = Settings.model_fields["request_timeout"].default
    for name in ("api", "worker"):
        assert int(services[name]["stop_grace_period"].rstrip("s")) > timeout, name

    # Prometheus scrapes the compose services and loads alerts.yml where rule_files points
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"] if v.startswith("./"))
    assert mounts["./deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    for rule_file in config["rule_files"]:
        assert mounts[f"./deploy/prometheus/{rule_file}"] == f"/etc/prometheus/{rule_file}"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["fastcache-api"]["static_configs"][0]["targets"] == ["api:8000"]
    dns = jobs["fastcache-worker"]["dns_sd_configs"][0]
    assert dns["names"] == ["worker"] and dns["port"] == 9100

    # Grafana: its data source is the compose Prometheus; the provider reads the mounted dashboard
    grafana = dict(v.split(":")[:2] for v in services["grafana"]["volumes"] if v.startswith("./"))
    datasources = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/fastcache.yml").read_text())
    dashboard_target = grafana["./deploy/grafana/fastcache-dashboard.json"]
    assert str(Path(dashboard_target).parent) == providers["providers"][0]["options"]["path"]


def test_compose_file_follows_the_compose_specification():
    """The Compose Specification's JSON schema (check-jsonschema's vendored copy: no network)."""
    result = run([venv_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert result.returncode == 0, f"{result.stdout}{result.stderr}"


@pytest.mark.parametrize("breakage", ["unknown service key", "unknown depends_on condition"])
def test_compose_schema_check_rejects_a_broken_file(tmp_path, breakage):
    compose = yaml.safe_load(COMPOSE.read_text())
    if breakage == "unknown service key":
        compose["services"]["worker"]["stop_grace_periods"] = compose["services"]["worker"].pop("stop_grace_period")
    else:
        compose["services"]["api"]["depends_on"]["redis"]["condition"] = "service_ready"
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(compose))
    result = run([venv_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(broken)])
    assert result.returncode != 0, breakage


# ============================================================================ Redis persistence
def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def deployed_redis(rendered) -> dict[str, tuple[list[str], set[str]]]:
    """``{where: (redis-server arguments, mount paths backed by persistent volumes)}`` for the compose
    service and the StatefulSet of each overlay."""
    compose = yaml.safe_load(COMPOSE.read_text())
    service = compose["services"]["redis"]
    assert service["command"][0] == "redis-server"
    named = set(compose.get("volumes") or {})
    out = {
        "docker-compose.yml": (
            service["command"][1:],
            {v.split(":")[1] for v in service.get("volumes") or [] if v.split(":")[0] in named},
        )
    }
    for overlay, docs in rendered.items():
        statefulset = one(docs, "StatefulSet", "fastcache-redis")
        c = container(statefulset, "redis")
        assert "command" not in c, "the image's entrypoint runs redis-server with the args"
        claims = {t["metadata"]["name"] for t in statefulset["spec"].get("volumeClaimTemplates") or []}
        out[overlay] = (
            [str(a) for a in c["args"]],
            {m["mountPath"] for m in c.get("volumeMounts") or [] if m["name"] in claims},
        )
    return out


def test_redis_keeps_an_append_only_file_on_a_persistent_volume(rendered):
    for where, (args, persistent) in deployed_redis(rendered).items():
        assert flag(args, "--appendonly") == "yes", f"{where}: Redis runs without an append-only file"
        assert flag(args, "--dir") in persistent, f"{where}: the data directory is not on a persistent volume"
        assert flag(args, "--maxmemory-policy") == "noeviction", f"{where}: jobs could be evicted"


@pytest.mark.parametrize("where", ["docker-compose.yml", "gpu-cluster"])
def test_redis_with_the_deployed_arguments_keeps_jobs_across_a_kill(rendered, tmp_path, where):
    """A real redis-server started with the deployed arguments (its data directory moved to a
    temporary one), killed with SIGKILL after a job was queued, and started again: the job is there."""
    import redis

    args, _ = deployed_redis(rendered)[where]
    args = [str(tmp_path) if i > 0 and args[i - 1] == "--dir" else a for i, a in enumerate(args)]
    port = free_port()
    command = [
        shutil.which("redis-server") or "/usr/bin/redis-server",
        *args,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
    ]

    def start() -> subprocess.Popen:
        process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=port, socket_timeout=2)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.exceptions.RedisError:
                return False

        wait_until(up, 20, lambda: f"redis-server {args} did not start", process=process)
        return process

    process = start()
    try:
        client = redis.Redis(port=port, decode_responses=True)
        client.xadd(LAYOUT.stream, {"job": "before-the-kill"})
        # appendfsync everysec may postpone the write by a moment: kill once it is in the file
        wait_until(
            lambda: any(b"before-the-kill" in f.read_bytes() for f in tmp_path.rglob("*.aof")),
            20,
            lambda: f"no append-only file with the job in {sorted(tmp_path.rglob('*'))}",
        )
        process.kill()
        process.wait(timeout=10)
        process = start()
        entries = redis.Redis(port=port, decode_responses=True).xrange(LAYOUT.stream)
        assert [fields for _, fields in entries] == [{"job": "before-the-kill"}]
    finally:
        process.kill()
        process.wait(timeout=10)


# ============================================================================ Dockerfile
def test_dockerfile_variants_user_healthcheck_and_model():
    steps = dockerfile_instructions(DOCKERFILE)
    first_from = next(i for i, (word, _) in enumerate(steps) if word == "FROM")
    global_args = dict(a.split("=", 1) for w, a in steps[:first_from] if w == "ARG" and "=" in a)
    assert global_args["VARIANT"] == "cpu"
    froms = [a for w, a in steps if w == "FROM"]
    stages = {f.split(" AS ")[1].strip() for f in froms if " AS " in f}
    assert {"python-cpu", "python-cuda"} <= stages
    assert any(f.startswith("python-${VARIANT}") for f in froms), "the VARIANT argument picks the base stage"
    text = DOCKERFILE.read_text()
    assert "nvidia/cuda:12." in text and re.search(r"download\.pytorch\.org/whl/\$\{TORCH_CUDA\}", text)
    assert re.search(r"TORCH_CUDA=cu12\d", text)
    assert "https://download.pytorch.org/whl/cpu" in text and "ARG TORCH_VERSION=2.13.0" in text
    assert '"torch==${TORCH_VERSION}"' in text
    assert any(w == "RUN" and re.search(r"pip install \.(\s|$)", a) for w, a in steps)

    runtime = steps[max(i for i, (w, _) in enumerate(steps) if w == "FROM") :]
    users = [a for w, a in runtime if w == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the runtime stage must run as non-root"
    env = {}
    for word, args in runtime:
        if word == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", args))
    copies = [a.split() for w, a in runtime if w == "COPY" and "--from" not in a]
    destinations = {parts[-2]: parts[-1] for parts in copies}
    # the bundled models land in /app/models; the default model is one of them
    bundled = [a.split() for w, a in runtime if w == "COPY" and "--from=bundled-models" in a]
    assert bundled, "the runtime stage copies the bundled models"
    default_model = Path(env["FASTCACHE_MODEL"])
    assert str(default_model.parent) == bundled[0][-1].rstrip("/"), "the default model is a bundled one"
    assert (REPO / "models" / default_model.name / "model_index.json").is_file()
    assert "bundled-models" in stages
    assert env["HF_HOME"] == "/models/hf-cache" and env["FASTCACHE_HOST"] == "0.0.0.0"
    healthcheck = [a for w, a in runtime if w == "HEALTHCHECK"]
    assert healthcheck and destinations["deploy/docker/healthcheck.py"] in healthcheck[0]
    assert "/healthz" in HEALTHCHECK.read_text()
    cmd = [a for w, a in runtime if w == "CMD"]
    assert cmd and json.loads(cmd[-1]) == ["fastcache-serve"]
    scripts = __import__("tomllib").loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"fastcache-serve", "fastcache-worker"} <= set(scripts)

    # every COPY source is in the repository and in the build context
    for word, args in steps:
        if word != "COPY" or "--from" in args:
            continue
        for source in [p for p in args.split()[:-1] if not p.startswith("--")]:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert not dockerignore_excludes(DOCKERIGNORE, source), f"COPY {source}: excluded by .dockerignore"


def test_the_api_target_installs_the_api_requirements_and_no_torch():
    steps = dockerfile_instructions(DOCKERFILE)
    starts = [i for i, (word, _) in enumerate(steps) if word == "FROM"]
    stages = {}
    for begin, end in zip(starts, [*starts[1:], len(steps)], strict=True):
        stages[steps[begin][1].split(" AS ")[-1].strip()] = steps[begin:end]
    assert {"api-builder", "api"} <= set(stages)
    builder = " ".join(args for _, args in stages["api-builder"])
    assert "pip install -r api-requirements.txt" in builder and "pip install --no-deps ." in builder
    requirements = [line for line in API_REQUIREMENTS.read_text().splitlines() if line[:1].isalpha()]
    assert not [line for line in requirements if line.startswith(("torch", "diffusers", "transformers"))]
    assert "'torch' in sys.modules" in builder, "the build checks that the API imports no torch"
    api = stages["api"]
    assert [a for w, a in api if w == "USER"][-1].split(":")[0] not in {"root", "0"}
    assert json.loads([a for w, a in api if w == "CMD"][-1]) == ["fastcache-serve"]
    assert list(stages)[-1] == "runtime", "`docker build .` still builds the full image"


def test_api_requirements_are_the_projects_own_dependencies():
    tomllib = __import__("tomllib")
    declared = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])
    wanted = [line.strip() for line in API_REQUIREMENTS.read_text().splitlines() if line.strip()[:1].isalpha()]
    assert wanted and set(wanted) <= declared, set(wanted) - declared


def test_dockerignore_keeps_the_context_small():
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "bench/out/result.json",
        "service/__pycache__/x.pyc",
        "fastcache_serve.egg-info/PKG-INFO",
        ".pytest_cache/v",
        "tests/test_deploy.py",
    ):
        assert dockerignore_excludes(DOCKERIGNORE, path), f"{path} would be sent to the Docker daemon"
    for path in (
        "service/cli.py",
        "fastcache_core/cache.py",
        "models/digits-dit/vae/config.json",
        "deploy/docker/healthcheck.py",
        "deploy/docker/bundle-models.sh",
        "deploy/docker/api-requirements.txt",
        "pyproject.toml",
        "README.md",
    ):
        assert not dockerignore_excludes(DOCKERIGNORE, path), f"{path} is needed by the build"
    for path in ("deploy/docker/build-local.sh", "deploy/docker/smoke.py", "deploy/base/api.yaml"):
        assert dockerignore_excludes(DOCKERIGNORE, path), f"{path} is not needed in the image"


def test_dockerfile_passes_hadolint():
    result = run([venv_tool("hadolint"), "--no-color", str(DOCKERFILE)])
    assert result.returncode == 0 and not result.stdout.strip(), f"hadolint:\n{result.stdout}{result.stderr}"


def test_hadolint_flags_a_broken_dockerfile(tmp_path):
    """The lint can fail: an unpinned base image and an apt install that keeps its lists."""
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = run([venv_tool("hadolint"), "--no-color", str(broken)])
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3008" in result.stdout, result.stdout


def bundle_models(source: Path, dest: Path, names: str = "") -> subprocess.CompletedProcess:
    return run(["sh", str(BUNDLE_MODELS), str(source), str(dest), names])


def test_image_bundles_every_model_directory_and_no_training_code(tmp_path):
    """What the Dockerfile's bundled-models stage does with the repository's models/."""
    result = bundle_models(REPO / "models", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    expected = {d.name for d in (REPO / "models").iterdir() if (d / "model_index.json").is_file()}
    assert "digits-dit" in expected
    assert {d.name for d in (tmp_path / "out").iterdir()} == expected
    copied = tmp_path / "out" / "digits-dit"
    for file in (REPO / "models" / "digits-dit").rglob("*"):
        if file.is_file() and "__pycache__" not in file.parts:
            twin = copied / file.relative_to(REPO / "models" / "digits-dit")
            assert twin.read_bytes() == file.read_bytes(), twin


def test_bundled_models_can_be_chosen_and_a_missing_one_fails_the_build(tmp_path):
    source = tmp_path / "models"
    for name in ("one-dit", "two-dit"):
        (source / name).mkdir(parents=True)
        (source / name / "model_index.json").write_text("{}")
    (source / "one_dit").mkdir()
    (source / "one_dit" / "__init__.py").write_text("")
    chosen = bundle_models(source, tmp_path / "chosen", "two-dit")
    assert chosen.returncode == 0, chosen.stderr
    assert [d.name for d in (tmp_path / "chosen").iterdir()] == ["two-dit"]
    missing = bundle_models(source, tmp_path / "missing", "two-dit three-dit")
    assert missing.returncode != 0 and "three-dit" in missing.stderr
    package = bundle_models(source, tmp_path / "package", "one_dit")
    assert package.returncode != 0 and "not a model directory" in package.stderr
    (tmp_path / "empty").mkdir()
    assert bundle_models(tmp_path / "empty", tmp_path / "none").returncode != 0


def test_build_script_is_valid_bash():
    result = run(["bash", "-n", str(BUILD_LOCAL)])
    assert result.returncode == 0, result.stderr


def test_build_script_smoke_checks_pass_against_a_real_server(scraped):
    """The checks build-local.sh runs against the container, run here against a real server."""
    server, _ = scraped
    answers = {}
    for check in ("ready", "healthz", "generate", "metrics"):
        result = run([sys.executable, str(SMOKE), check, server.url, "--timeout", "120"])
        assert result.returncode == 0, f"{check}: {result.stderr}"
        answers[check] = result.stdout
    assert float(answers["ready"]) >= 0
    assert re.search(r"^200, one \d+x\d+ PNG", answers["generate"]), answers["generate"]
    assert "fastcache_ metric families" in answers["metrics"]


def test_build_script_smoke_checks_fail_without_a_server():
    url = f"http://127.0.0.1:{free_port()}"
    ready = run([sys.executable, str(SMOKE), "ready", url, "--timeout", "1"])
    assert ready.returncode == 1 and "not ready" in ready.stderr
    assert run([sys.executable, str(SMOKE), "generate", url, "--timeout", "5"]).returncode == 1
