"""The chart's side of /metrics privacy: by default one open port whose page names no adapter;
adapter names only on the metrics port (for the endpoint picker and Prometheus) or for the
ServiceMonitor with the metrics token."""

from __future__ import annotations

import os

import pytest

from gateway.settings import ServeSettings
from tests.chart.helm import CI_VALUES, helm, render
from tests.chart.test_chart import CHART, NAMESPACE


def settings_of(rendered, monkeypatch: pytest.MonkeyPatch) -> ServeSettings:
    for var in [v for v in os.environ if v.startswith("LORA_GATEWAY_")]:
        monkeypatch.delenv(var)
    for key, value in rendered.config().items():
        monkeypatch.setenv(key, value)
    return ServeSettings(_env_file=None)


def test_by_default_no_scraper_is_authorised(monkeypatch: pytest.MonkeyPatch) -> None:
    rendered = render(None, ("metrics.serviceMonitor.enabled=true",))
    settings = settings_of(rendered, monkeypatch)
    assert settings.metrics_port is None and settings.metrics_token is None
    assert [p["name"] for p in rendered.gateway["ports"]] == ["http"]
    assert [p["name"] for p in rendered.one("Service")["spec"]["ports"]] == ["http"]
    env = {e["name"] for e in rendered.gateway.get("env", [])}
    assert "LORA_GATEWAY_METRICS_TOKEN" not in env
    [endpoint] = rendered.one("ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["port"] == "http" and "authorization" not in endpoint


def test_the_metrics_port_is_opened_and_scraped(monkeypatch: pytest.MonkeyPatch) -> None:
    rendered = render(None, ("metrics.port=9090", "metrics.serviceMonitor.enabled=true"))
    assert settings_of(rendered, monkeypatch).metrics_port == 9090
    ports = {p["name"]: p for p in rendered.gateway["ports"]}
    assert ports["metrics"]["containerPort"] == 9090
    service_ports = {p["name"]: p for p in rendered.one("Service")["spec"]["ports"]}
    assert service_ports["metrics"]["targetPort"] == "metrics"
    [endpoint] = rendered.one("ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"


def test_the_metrics_token_comes_from_a_secret_and_the_service_monitor_sends_it() -> None:
    rendered = render(None, ("metrics.tokenSecret.name=scrape-token", "metrics.serviceMonitor.enabled=true"))
    env = {e["name"]: e for e in rendered.gateway["env"]}
    assert env["LORA_GATEWAY_METRICS_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "scrape-token", "key": "token"}}
    assert "LORA_GATEWAY_METRICS_TOKEN" not in rendered.one("ConfigMap")["data"]
    [endpoint] = rendered.one("ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["port"] == "http"
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {"name": "scrape-token", "key": "token"}}


def test_the_endpoint_picker_is_told_to_read_the_metrics_port() -> None:
    """Without adapter names the picker has no LoRA affinity: it must scrape the metrics port."""
    values = str(CI_VALUES / "autoscaling-values.yaml")
    result = helm("install", "lgw", str(CHART), "--dry-run=client", "--namespace", NAMESPACE, "-f", values)
    assert result.returncode == 0, result.output
    assert "--model-server-metrics-port=9090" in result.output.split("NOTES:", 1)[1]
    result = helm(
        "install", "lgw", str(CHART), "--dry-run=client", "--namespace", NAMESPACE, "-f", values,
        "--set", "metrics.port=null",
    )  # fmt: skip
    assert result.returncode != 0 and "metrics.port" in result.output


@pytest.mark.parametrize("port", ["0", "8000", "70000"])
def test_a_metrics_port_that_cannot_work_is_refused(port: str) -> None:
    result = helm("template", "lgw", str(CHART), "--set", f"metrics.port={port}")
    assert result.returncode != 0 and "metrics" in result.output
