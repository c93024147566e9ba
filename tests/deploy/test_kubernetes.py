"""The Kubernetes manifests: every one valid against the Kubernetes schemas (kubernetes-validate, strict), and
agreeing with each other and with the server: GPU request, probes on /health, the cache volume, the Service's
selector and port, the autoscaler on the waiting-requests gauge served by the Prometheus adapter."""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from kubernetes_validate import utils as kv

from tests.deploy.deployfiles import (
    DEPLOY,
    KUBERNETES,
    ROOT,
    kustomize_resources,
    load_yaml_documents,
    manifest,
    manifests,
    server_env_vars,
)

# The oldest Kubernetes these manifests are meant for, and the newest the package knows.
VERSIONS = ["1.30.0", kv.latest_version()]


def container() -> dict:
    (server,) = manifest("Deployment")["spec"]["template"]["spec"]["containers"]
    return server


def env(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c["env"]}


def test_kustomization_lists_every_manifest() -> None:
    listed = {p.name for p in kustomize_resources()}
    present = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    assert all(p.is_file() for p in kustomize_resources())


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_strictly(version: str) -> None:
    docs = manifests()
    assert docs
    for doc in docs:
        # Raises ValidationError on a bad field, SchemaNotFoundError on a kind Kubernetes does not have.
        kv.validate(doc, version, strict=True)


@pytest.mark.parametrize(
    ("kind", "break_it"),
    [
        ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(readinesProbe={})),
        (
            "Deployment",
            lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort="http"),
        ),
        ("HorizontalPodAutoscaler", lambda d: d["spec"]["metrics"][0]["pods"].pop("metric")),
        ("Service", lambda d: d["spec"]["ports"][0].pop("port")),
    ],
    ids=["misspelled-probe", "port-not-a-number", "hpa-metric-unnamed", "service-port-missing"],
)
def test_validation_rejects_broken_manifests(kind: str, break_it) -> None:
    broken = copy.deepcopy(manifest(kind))
    break_it(broken)
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, kv.latest_version(), strict=True)


def test_deployment_requests_a_gpu_on_the_gpu_pool() -> None:
    resources = container()["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]
    pod = manifest("Deployment")["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["nodeSelector"]


def test_probes_read_health_on_the_server_port() -> None:
    c = container()
    (port,) = c["ports"]
    assert str(port["containerPort"]) == env(c)["GPT_OSS_PORT"]
    assert env(c)["GPT_OSS_HOST"] == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health", probe
        assert get["port"] in (port["name"], port["containerPort"]), probe
    # A first start downloads and loads the weights: at least ten minutes before the kubelet gives up.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_the_hpa_owns_the_replica_count_and_updates_keep_capacity() -> None:
    deployment = manifest("Deployment")
    assert "replicas" not in deployment["spec"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_termination_grace_covers_the_pause_and_the_servers_drain() -> None:
    """The kubelet's SIGKILL must not cut the server's own drain: preStop pause + shutdown grace + 5 s cleanup."""
    pod = manifest("Deployment")["spec"]["template"]["spec"]
    c = container()
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    from server.main import parse_args

    drain = float(env(c).get("GPT_OSS_SHUTDOWN_GRACE") or parse_args([]).shutdown_grace)
    assert pod["terminationGracePeriodSeconds"] >= float(command[1]) + drain + 5


def test_model_cache_is_mounted_where_the_server_and_hugging_face_look() -> None:
    c = container()
    pod = manifest("Deployment")["spec"]["template"]["spec"]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "model-cache"]
    for variable in ("GPT_OSS_CACHE_DIR", "HF_HOME"):
        assert env(c)[variable].startswith(mount["mountPath"].rstrip("/") + "/")
    (volume,) = [v for v in pod["volumes"] if v["name"] == "model-cache"]
    claim = manifest("PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    # Every replica, on any node, mounts the same cache.
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_runs_as_the_images_non_root_user() -> None:
    pod = manifest("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    dockerfile_user = re.search(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert dockerfile_user
    assert pod["securityContext"]["runAsUser"] == int(dockerfile_user.group(1))
    assert container()["securityContext"]["allowPrivilegeEscalation"] is False


def test_settings_are_ones_the_server_reads() -> None:
    known = server_env_vars()
    names = env(container())
    assert "GPT_OSS_PORT" in names
    for name in names:
        assert name in known or name.startswith("HF_"), (
            f"{name} is read by neither the server nor Hugging Face"
        )


def test_service_selects_the_pods_and_targets_the_server_port() -> None:
    service = manifest("Service")
    labels = manifest("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert manifest("Deployment")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    (container_port,) = container()["ports"]
    assert port["targetPort"] in (container_port["name"], container_port["containerPort"])


def test_pod_disruption_budget_covers_the_pods() -> None:
    pdb = manifest("PodDisruptionBudget")
    labels = manifest("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_hpa_scales_the_deployment_on_waiting_requests() -> None:
    hpa = manifest("HorizontalPodAutoscaler")
    deployment = manifest("Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "gpt_oss_requests_waiting"
    assert metric["pods"]["target"]["type"] == "AverageValue"


def test_the_server_exports_the_metric_the_hpa_reads() -> None:
    name = manifest("HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    source = "\n".join(p.read_text() for p in (ROOT / "server").rglob("*.py"))
    assert f'"{name}"' in source, f"the server exports no {name}"


def test_prometheus_adapter_serves_the_hpa_metric_per_pod() -> None:
    values = yaml.safe_load((DEPLOY / "prometheus-adapter-values.yaml").read_text())
    name = manifest("HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = [r for r in values["rules"]["custom"] if r["name"]["as"] == name]
    assert len(rules) == 1, f"no adapter rule exposes {name}"
    (rule,) = rules
    assert rule["seriesQuery"].startswith(name + "{")
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    assert "<<.Series>>" in rule["metricsQuery"]
    assert "<<.LabelMatchers>>" in rule["metricsQuery"]
    assert "<<.GroupBy>>" in rule["metricsQuery"]


def test_pods_are_scraped_where_the_server_serves_metrics() -> None:
    annotations = manifest("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/port"] == env(container())["GPT_OSS_PORT"]


def test_yaml_files_parse() -> None:
    paths = [*KUBERNETES.glob("*.yaml"), DEPLOY / "prometheus-adapter-values.yaml"]
    assert len(paths) > 1, "the kubernetes folder holds no YAML files"
    for path in paths:
        assert load_yaml_documents(path), path
