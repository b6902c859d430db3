"""The Helm chart, rendered by real helm: lint, Kubernetes schemas, and what an operator relies on
(probes, GPU limits, secrets kept out of ConfigMaps, a grace period that covers the drain, values
the gateway accepts, a schema that refuses bad values)."""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.settings import ServeSettings
from tests.chart.helm import CHART, CI_VALUES, NAMESPACE, Rendered, find_helm, helm, lint, render

CASES: dict[str, Path | None] = {
    "default": None,
    "gpu": CI_VALUES / "gpu-values.yaml",
    "s3-irsa": CI_VALUES / "s3-irsa-values.yaml",
    "existing-secret": CI_VALUES / "existing-secret-values.yaml",
    "autoscaling": CI_VALUES / "autoscaling-values.yaml",
    "cpu": CI_VALUES / "cpu-values.yaml",
}
# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schema at hand.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
# Kinds from CRDs: kubernetes-validate has no schema for them, so their tests check their structure.
CRD_KINDS = {"ServiceMonitor", "InferencePool"}
# ServeSettings fields the chart sets itself, from its own sections (model, store, auth, cache).
CHART_MANAGED_SETTINGS = {
    "model", "store", "served_model_name", "host", "port", "metrics_port", "metrics_token", "cache_dir",
    "keys_file", "trusted_user_header", "trusted_admin_header", "insecure_no_auth",
}  # fmt: skip
START_UP_BUDGET_S = 600  # a large model from a cold disk takes minutes
GRACE_MARGIN_S = 5


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request: pytest.FixtureRequest) -> tuple[str, Rendered]:
    return request.param, render(CASES[request.param])


def test_helm_is_real() -> None:
    """The tests run the pinned helm from `make tools` (or one the caller names), never nothing."""
    version = helm("version", "--short")
    assert version.returncode == 0 and re.match(r"v\d+\.\d+\.\d+", version.output), version.output
    assert Path(find_helm()).is_file()


@pytest.mark.parametrize("name", list(CASES))
def test_helm_lint_passes(name: str) -> None:
    result = lint(CASES[name])
    assert result.returncode == 0, result.output
    assert "0 chart(s) failed" in result.output


def test_every_rendered_object_is_valid_kubernetes(case: tuple[str, Rendered]) -> None:
    _, rendered = case
    for obj in rendered.objects:
        if obj["kind"] in CRD_KINDS:
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']} {obj['metadata']['name']} invalid for Kubernetes {version}: {exc}")


def test_default_render_holds_the_expected_objects() -> None:
    kinds = sorted(o["kind"] for o in render(None).objects)
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Secret", "Service", "ServiceAccount"]


def test_probes_fit_a_model_that_loads_for_minutes(case: tuple[str, Rendered]) -> None:
    _, rendered = case
    gateway = rendered.gateway
    http_port = {p["name"]: p["containerPort"] for p in gateway["ports"]}["http"]
    assert int(rendered.config()["LORA_GATEWAY_PORT"]) == http_port
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert gateway[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    startup = gateway["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= START_UP_BUDGET_S
    # Liveness must not kill a pod that is merely busy: several misses in a row, each with time to answer.
    liveness = gateway["livenessProbe"]
    assert liveness["failureThreshold"] >= 3 and liveness["timeoutSeconds"] >= 2


def _drain_timeout_s(rendered: Rendered) -> float:
    settings = ServeSettings.model_fields["drain_timeout_s"].default
    return float(rendered.config().get("LORA_GATEWAY_DRAIN_TIMEOUT_S", settings))


def test_grace_period_covers_prestop_and_drain(case: tuple[str, Rendered]) -> None:
    _, rendered = case
    pre_stop = rendered.gateway["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    pre_stop_s = int(pre_stop[1])
    assert pre_stop_s > 0, "without a pause, traffic still arrives after SIGTERM"
    grace = rendered.pod["terminationGracePeriodSeconds"]
    assert grace >= pre_stop_s + _drain_timeout_s(rendered) + GRACE_MARGIN_S


def test_grace_period_follows_a_longer_drain() -> None:
    rendered = render(None, ("settings.drain_timeout_s=300",))
    assert rendered.pod["terminationGracePeriodSeconds"] >= 300 + GRACE_MARGIN_S


def test_gpu_pods_ask_for_gpus_and_gpu_nodes(case: tuple[str, Rendered]) -> None:
    name, rendered = case
    resources = rendered.gateway["resources"]
    if name == "cpu":
        assert "nvidia.com/gpu" not in resources.get("limits", {})
        return
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["limits"]["memory"]  # merged, not replaced
    if name == "gpu":
        pod = rendered.pod
        assert pod["runtimeClassName"] == "nvidia"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]


def test_the_gateway_accepts_the_rendered_settings(case: tuple[str, Rendered], monkeypatch) -> None:
    """Load the rendered environment into the gateway's own settings class: it must validate, and
    every path it names must be a mount of the pod."""
    name, rendered = case
    for var in [v for v in os.environ if v.startswith("LORA_GATEWAY_")]:
        monkeypatch.delenv(var)
    for key, value in rendered.config().items():
        monkeypatch.setenv(key, value)
    settings = ServeSettings(_env_file=None)
    assert settings.host == "0.0.0.0"
    mounts = {m["mountPath"]: m for m in rendered.gateway["volumeMounts"]}
    volumes = {v["name"]: v for v in rendered.pod["volumes"]}

    def volume_under(path: Path) -> dict[str, Any]:
        mount = next(m for p, m in mounts.items() if path == Path(p) or Path(p) in path.parents)
        return volumes[mount["name"]]

    assert volume_under(settings.model)
    assert settings.cache_dir is not None and volume_under(settings.cache_dir)
    if settings.store.startswith("file://"):
        assert volume_under(Path(settings.store.removeprefix("file://")))
    else:
        assert settings.store.startswith("s3://")
    if name == "cpu":
        assert settings.insecure_no_auth
    else:
        assert settings.keys_file is not None
        keys_volume = volume_under(settings.keys_file)
        # A directory mount of the Secret (no subPath): a changed Secret reaches the running pod.
        assert "secret" in keys_volume
        assert not any("subPath" in m for m in rendered.gateway["volumeMounts"] if m["name"] == keys_volume["name"])
        assert settings.keys_file.name in _secret_keys(rendered, keys_volume["secret"]["secretName"])


def _secret_keys(rendered: Rendered, secret_name: str) -> set[str]:
    """The keys of a Secret the chart renders, or, for one made outside it, the key the pod expects."""
    secret = rendered.named("Secret", secret_name)
    if secret is not None:
        return set(secret["data"])
    return {Path(rendered.config()["LORA_GATEWAY_KEYS_FILE"]).name}


def test_no_secret_values_in_configmaps(case: tuple[str, Rendered]) -> None:
    name, rendered = case
    values = yaml.safe_load(CASES[name].read_text()) if CASES[name] else {}
    credentials = (values.get("store", {}).get("s3", {}).get("credentials", {}) or {}).values()
    secrets = [s for s in [*rendered.secret_values(), *credentials] if s and s != "keys: []\n"]
    for config_map in rendered.of_kind("ConfigMap"):
        for key, value in config_map["data"].items():
            assert not re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|HEADERS", key), key
            for secret in secrets:
                assert secret not in value and value not in secret.splitlines(), f"{key} holds a secret value"
    for env in rendered.gateway.get("env", []):
        if re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|HEADERS", env["name"]):
            assert "valueFrom" in env and "secretKeyRef" in env["valueFrom"], env["name"]


def _env_secret_refs(rendered: Rendered) -> dict[str, tuple[str, str]]:
    return {
        e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in rendered.gateway.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def test_existing_secrets_are_referenced_not_rendered() -> None:
    rendered = render(CASES["existing-secret"])
    assert rendered.of_kind("Secret") == []
    refs = _env_secret_refs(rendered)
    assert refs["AWS_ACCESS_KEY_ID"] == ("adapter-store-credentials", "AWS_ACCESS_KEY_ID")
    assert refs["AWS_SECRET_ACCESS_KEY"] == ("adapter-store-credentials", "AWS_SECRET_ACCESS_KEY")
    assert refs["OTEL_EXPORTER_OTLP_HEADERS"] == ("otlp-auth", "headers")
    keys_volume = next(v for v in rendered.pod["volumes"] if v["name"] == "keys")
    assert keys_volume["secret"]["secretName"] == "gateway-api-keys"
    config = rendered.config()
    assert config["LORA_GATEWAY_KEYS_FILE"].endswith("/api-keys.yaml")
    assert config["AWS_ENDPOINT_URL_S3"] == "https://minio.storage.svc:9000"


def test_static_s3_credentials_go_into_a_secret_the_pod_references() -> None:
    rendered = render(CASES["autoscaling"])
    values = yaml.safe_load(CASES["autoscaling"].read_text())["store"]["s3"]["credentials"]
    secret = rendered.named("Secret", "lgw-lora-gateway-s3")
    assert secret is not None
    assert base64.b64decode(secret["data"]["AWS_ACCESS_KEY_ID"]).decode() == values["accessKeyId"]
    assert base64.b64decode(secret["data"]["AWS_SECRET_ACCESS_KEY"]).decode() == values["secretAccessKey"]
    refs = _env_secret_refs(rendered)
    assert refs["AWS_ACCESS_KEY_ID"] == ("lgw-lora-gateway-s3", "AWS_ACCESS_KEY_ID")
    assert refs["AWS_SECRET_ACCESS_KEY"] == ("lgw-lora-gateway-s3", "AWS_SECRET_ACCESS_KEY")


def test_irsa_uses_the_role_and_no_static_keys() -> None:
    rendered = render(CASES["s3-irsa"])
    account = rendered.one("ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    assert rendered.pod["serviceAccountName"] == account["metadata"]["name"]
    env_names = {e["name"] for e in rendered.gateway.get("env", [])}
    assert not env_names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert rendered.config()["AWS_REGION"] == "eu-west-1"
    assert rendered.one("Deployment")["spec"]["replicas"] == 2
    # The model comes from Hugging Face in an init container, with the token from a Secret.
    init = rendered.pod["initContainers"][0]
    assert init["command"][:3] == ["hf", "download", "Qwen/Qwen2.5-0.5B-Instruct"]
    assert init["command"][init["command"].index("--local-dir") + 1] == rendered.config()["LORA_GATEWAY_MODEL"]
    token = next(e for e in init["env"] if e["name"] == "HF_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}


def test_settings_and_credentials_roll_pods_but_keys_do_not() -> None:
    """Settings are read at start (a change must roll the pods); the keys file is re-read live."""

    def checksums(*sets: str) -> dict[str, str]:
        annotations = render(CASES["autoscaling"], sets).one("Deployment")["spec"]["template"]["metadata"]
        return {k: v for k, v in annotations["annotations"].items() if k.startswith("checksum/")}

    base = checksums()
    assert checksums("settings.max_loras=2")["checksum/config"] != base["checksum/config"]
    assert checksums("store.s3.credentials.secretAccessKey=rotated")["checksum/s3-secret"] != base["checksum/s3-secret"]
    assert checksums("auth.apiKeys.keysFile=keys: []") == base


def test_autoscaling_hpa_service_monitor_and_inference_pool() -> None:
    rendered = render(CASES["autoscaling"])
    deployment = rendered.one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    hpa = rendered.one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_waiting"

    service = rendered.one("Service")
    monitor = rendered.one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}

    pool = rendered.one("InferencePool")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert set(pool["spec"]) == {"selector", "targetPorts", "endpointPickerRef"}
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pool["spec"]["targetPorts"] == [{"number": rendered.gateway["ports"][0]["containerPort"]}]
    picker = pool["spec"]["endpointPickerRef"]
    assert picker == {
        "kind": "Service",
        "name": "lora-gateway-epp",
        "port": {"number": 9002},
        "failureMode": "FailClose",
    }
    for obj in (monitor, pool):
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])
        assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}


def test_pdb_and_service_select_the_pods(case: tuple[str, Rendered]) -> None:
    _, rendered = case
    pod_labels = rendered.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert rendered.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert rendered.one("Service")["spec"]["selector"].items() <= pod_labels.items()
    assert rendered.one("Service")["spec"]["ports"][0]["targetPort"] == "http"


def test_pods_run_unprivileged(case: tuple[str, Rendered]) -> None:
    _, rendered = case
    assert rendered.pod["securityContext"]["runAsNonRoot"] is True
    for container in rendered.pod["containers"] + rendered.pod.get("initContainers", []):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]


# Refused by values.schema.json: `helm lint` and `helm template`/`install` fail, naming the field.
BAD_VALUES = {
    "replicaCount is not a number": (("--set-string", "replicaCount=two"), "replicaCount"),
    "unsupported LoRA rank": (("--set", "settings.max_lora_rank=7"), "max_lora_rank"),
    "setting the gateway does not have": (("--set", "settings.max_lorras=4"), "max_lorras"),
    "negative drain timeout": (("--set", "settings.drain_timeout_s=-1"), "drain_timeout_s"),
    "unknown auth mode": (("--set", "auth.mode=none"), "mode"),
    "store that is not S3": (("--set", "store.url=http://bucket"), "url"),
    "unknown value key": (("--set", "replicas=3"), "replicas"),
    "replicas on a pod-local store": (("--set", "replicaCount=3"), "replicaCount"),
    "autoscaling on a pod-local store": (("--set", "autoscaling.enabled=true"), "autoscaling"),
    "trusted header without a header": (("--set", "auth.mode=trustedHeader"), "userHeader"),
    "download without a repository": (("--set", "model.download.enabled=true"), "repoId"),
    "negative GPU count": (("--set", "gpu.count=-1"), "count"),
    "OTLP endpoint without a scheme": (("--set", "otel.endpoint=collector:4317"), "endpoint"),
    "a LoRA info metric the gateway does not serve": (
        ("--set", "inferencePool.loraInfoMetric=vllm:lora_requests_info"), "loraInfoMetric"
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BAD_VALUES))
def test_bad_values_are_refused_with_the_field_named(name: str) -> None:
    chart_args, field = BAD_VALUES[name]
    for result in (
        helm("lint", str(CHART), "--strict", *chart_args),
        helm("template", "lgw", str(CHART), *chart_args),
    ):
        assert result.returncode != 0, f"helm accepted {chart_args}"
        assert field in result.output, result.output


def test_grace_period_below_the_drain_is_refused() -> None:
    """A cross-field rule the schema cannot state: the templates refuse it (helm lint only logs a
    template's `fail`, so the render and the install are what must fail)."""
    chart_args = ("--set", "shutdown.terminationGracePeriodSeconds=20")
    for result in (
        helm("template", "lgw", str(CHART), *chart_args),
        helm("install", "lgw", str(CHART), "--dry-run=client", *chart_args),
    ):
        assert result.returncode != 0
        assert "terminationGracePeriodSeconds (20) must be at least" in result.output
    assert render(None, ("shutdown.terminationGracePeriodSeconds=40",)).pod["terminationGracePeriodSeconds"] == 40


def _schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


def test_chart_settings_are_exactly_the_gateways() -> None:
    """Every gateway setting is offered (or set by the chart itself), and nothing else is."""
    offered = _schema()["properties"]["settings"]["properties"]
    gateway_fields = set(ServeSettings.model_fields)
    assert CHART_MANAGED_SETTINGS <= gateway_fields
    assert set(offered) == gateway_fields - CHART_MANAGED_SETTINGS
    gateway_schema = ServeSettings.model_json_schema()["properties"]
    for name, schema in offered.items():
        types = {gateway_schema[name].get("type")} | {a.get("type") for a in gateway_schema[name].get("anyOf", [])}
        assert schema["type"] in types, name
    for name, value in yaml.safe_load((CHART / "values.yaml").read_text())["settings"].items():
        ServeSettings.model_validate({"model": "/m", "insecure_no_auth": True, name: value})


def _value_paths(values: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the values, down to the chart's own fields (Kubernetes objects passed through whole)."""
    paths = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        sub_schema = schema.get("properties", {}).get(key, {})
        if isinstance(value, dict) and value and "properties" in sub_schema:
            paths += _value_paths(value, sub_schema, path + ".")
        else:
            paths.append(path)
    return paths


def test_chart_readme_lists_every_value() -> None:
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    paths = _value_paths(values, _schema()) + [
        f"settings.{name}" for name in _schema()["properties"]["settings"]["properties"]
    ]
    missing = [path for path in paths if f"`{path}`" not in readme]
    assert missing == []


def test_notes_say_what_to_do_next() -> None:
    result = helm("install", "lgw", str(CHART), "--dry-run=client", "--namespace", NAMESPACE)
    assert result.returncode == 0, result.output
    notes = result.output.split("NOTES:", 1)[1]
    assert "kubectl -n serving port-forward service/lgw-lora-gateway 8000:8000" in notes
    assert "no API keys yet" in notes and "store.url is empty" in notes


def test_notes_tell_how_to_run_the_endpoint_picker_for_lora_affinity() -> None:
    """The picker must read the gateway's LoRA gauge (owner/name), not vLLM's (owner/name@version)."""
    values = str(CASES["autoscaling"])
    result = helm("install", "lgw", str(CHART), "--dry-run=client", "--namespace", NAMESPACE, "-f", values)
    assert result.returncode == 0, result.output
    notes = result.output.split("NOTES:", 1)[1]
    flags = "--pool-name lgw-lora-gateway --pool-namespace serving --lora-info-metric=lora_gateway:lora_requests_info"
    assert flags in notes
    assert "owner/name" in notes


def test_trusted_header_mode_has_no_keys(monkeypatch) -> None:
    rendered = render(None, ("auth.mode=trustedHeader", "auth.trustedHeader.userHeader=X-Forwarded-User"))
    assert rendered.of_kind("Secret") == []
    assert "keys" not in {v["name"] for v in rendered.pod["volumes"]}
    for var in [v for v in os.environ if v.startswith("LORA_GATEWAY_")]:
        monkeypatch.delenv(var)
    for key, value in rendered.config().items():
        monkeypatch.setenv(key, value)
    settings = ServeSettings(_env_file=None)
    assert settings.trusted_user_header == "X-Forwarded-User" and settings.keys_file is None


def parse_quantity(quantity: str) -> int:
    """A Kubernetes binary quantity ("4Gi") in bytes."""
    number, unit = re.fullmatch(r"([0-9]+)([KMGTPE]i)?", quantity).groups()  # type: ignore[union-attr]
    return int(number) << (10 * (" KMGTPE".index(unit[0]) if unit else 0))


def test_the_scratch_volume_uploads_land_on_has_a_size_limit(case: tuple[str, Rendered]) -> None:
    """Uploads are received under /tmp before validation: an unbounded emptyDir there lets uploads
    fill the node's disk."""
    _, rendered = case
    mounts = {m["mountPath"]: m["name"] for m in rendered.gateway["volumeMounts"]}
    volumes = {v["name"]: v for v in rendered.pod["volumes"]}
    scratch = volumes[mounts["/tmp"]]
    assert parse_quantity(scratch["emptyDir"]["sizeLimit"]) >= 2 * (512 << 20)  # two uploads at the default limit


def test_the_scratch_size_limit_is_a_value() -> None:
    rendered = render(None, ("scratchSizeLimit=9Gi",))
    mounts = {m["mountPath"]: m["name"] for m in rendered.gateway["volumeMounts"]}
    volumes = {v["name"]: v for v in rendered.pod["volumes"]}
    assert volumes[mounts["/tmp"]]["emptyDir"]["sizeLimit"] == "9Gi"
