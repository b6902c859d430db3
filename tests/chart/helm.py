"""Run the real helm binary on the chart and parse what it renders."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "lora-gateway"
CI_VALUES = CHART / "ci"
RELEASE = "lgw"
NAMESPACE = "serving"


def find_helm() -> str:
    """$HELM, the Makefile's .tools/helm, or helm on PATH. Missing helm is a failure, never a skip."""
    for candidate in (os.environ.get("HELM"), REPO / ".tools" / "helm", shutil.which("helm")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RuntimeError("helm not found: run `make tools` (fetches the pinned helm into .tools/helm) or set HELM")


@dataclass(frozen=True)
class HelmResult:
    returncode: int
    output: str


def helm(*args: str) -> HelmResult:
    done = subprocess.run([find_helm(), *args], capture_output=True, text=True, timeout=120)
    return HelmResult(done.returncode, done.stdout + done.stderr)


def value_args(values_file: Path | None, sets: tuple[str, ...] = ()) -> list[str]:
    args = ["-f", str(values_file)] if values_file else []
    for item in sets:
        args += ["--set", item]
    return args


def lint(values_file: Path | None, sets: tuple[str, ...] = ()) -> HelmResult:
    return helm("lint", str(CHART), "--strict", *value_args(values_file, sets))


def template(values_file: Path | None, sets: tuple[str, ...] = ()) -> HelmResult:
    return helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *value_args(values_file, sets))


@dataclass(frozen=True)
class Rendered:
    objects: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
        return found[0]

    def named(self, kind: str, name: str) -> dict[str, Any] | None:
        return next((o for o in self.of_kind(kind) if o["metadata"]["name"] == name), None)

    @property
    def pod(self) -> dict[str, Any]:
        return self.one("Deployment")["spec"]["template"]["spec"]

    @property
    def gateway(self) -> dict[str, Any]:
        return next(c for c in self.pod["containers"] if c["name"] == "gateway")

    def config(self) -> dict[str, str]:
        """The gateway's environment: its ConfigMap plus its literal env values."""
        env = dict(self.one("ConfigMap")["data"])
        env.update({e["name"]: e["value"] for e in self.gateway.get("env", []) if "value" in e})
        return env

    def secret_values(self) -> list[str]:
        return [
            base64.b64decode(value).decode()
            for secret in self.of_kind("Secret")
            for value in (secret.get("data") or {}).values()
        ]


def render(values_file: Path | None, sets: tuple[str, ...] = ()) -> Rendered:
    result = template(values_file, sets)
    assert result.returncode == 0, result.output
    return Rendered([o for o in yaml.safe_load_all(result.output) if o])
