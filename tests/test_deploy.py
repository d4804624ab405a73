"""Deployment files: the compose file validates, container commands exist in the CLI, the image is sane.

No container engine runs here; `docker-compose config` validates the compose file against the schema the
installed docker-compose knows, and the Dockerfile is checked instruction by instruction.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.cli import build_parser
from app.core.config import Settings

ROOT = Path(__file__).resolve().parents[1]
HPSEARCH = Path(sys.executable).with_name("hpsearch")
IMAGE_SERVICES = ("migrate", "api", "worker", "worker-cpu")


# ---- docker-compose ------------------------------------------------------------------------------------


def _docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is missing; CI installs it (apt-get install docker-compose, .ci/run)")
        pytest.skip("docker-compose not installed (apt-get install docker-compose): compose not validated")
    return found


def _compose_config(tmp_path: Path, env_lines: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` on a copy of the compose file, .env made of .env.example plus env_lines."""
    shutil.copy(ROOT / "docker-compose.yml", tmp_path / "docker-compose.yml")
    (tmp_path / ".env").write_text((ROOT / ".env.example").read_text() + env_lines)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "COMPOSE_"))}
    return subprocess.run([_docker_compose(), *args, "config"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    result = _compose_config(tmp_path_factory.mktemp("compose"), "POSTGRES_PASSWORD=test-password\n",
                             "--profile", "cpu")
    assert result.returncode == 0, result.stderr
    return dict(yaml.safe_load(result.stdout))


def _mounts(service: dict[str, Any]) -> set[tuple[str, str]]:
    """(source, target) of each volume, from the short syntax (docker-compose 1) or the long one (2)."""
    out = set()
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *_ = volume.split(":")
            out.add((source, target))
        else:
            out.add((volume["source"], volume["target"]))
    return out


def _conditions(service: dict[str, Any]) -> dict[str, str]:
    return {name: dep["condition"] for name, dep in service["depends_on"].items()}


def test_compose_file_is_valid_and_wires_the_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", *IMAGE_SERVICES}
    pg = services["postgres"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert _mounts(pg) == {("postgres-data", "/var/lib/postgresql/data")}
    assert "postgres-data" in compose["volumes"]
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert _conditions(services["migrate"]) == {"postgres": "service_healthy"}
    for name in ("api", "worker", "worker-cpu"):
        assert _conditions(services[name]) == {"migrate": "service_completed_successfully"}
        # Uploaded datasets and trial weights, shared by the API and the workers.
        assert _mounts(services[name]) == {("hpsearch-data", "/var/lib/hpsearch")}
    for name in IMAGE_SERVICES:
        url = services[name]["environment"]["HPSEARCH_DATABASE_URL"]
        assert url == "postgresql+psycopg://hpsearch:test-password@postgres:5432/hpsearch"
    assert services["worker-cpu"]["profiles"] == ["cpu"] and "profiles" not in services["worker"]


def test_gpu_worker_reserves_nvidia_gpus_and_may_scale(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert device["count"] in ("all", -1)  # docker-compose 2 writes "all" as -1
    # --scale needs replicas without fixed names or host ports.
    assert "container_name" not in worker and "ports" not in worker
    stop_grace_s = int(worker["stop_grace_period"].rstrip("s"))
    args = build_parser().parse_args(worker["command"])
    assert args.devices == "auto" and stop_grace_s > args.shutdown_grace


def test_compose_refuses_to_run_without_a_database_password(tmp_path: Path) -> None:
    result = _compose_config(tmp_path, "")
    assert result.returncode != 0 and "set POSTGRES_PASSWORD" in result.stderr


def test_compose_commands_exist_in_the_cli(compose: dict[str, Any]) -> None:
    parser = build_parser()
    for name in IMAGE_SERVICES:
        service = compose["services"][name]
        assert service["image"].startswith("hpsearch:")
        args = parser.parse_args(service["command"])  # exits (fails the test) on an unknown command or option
        assert args.command == service["command"][0]
    api = parser.parse_args(compose["services"]["api"]["command"])
    assert (api.host, api.port, api.workers) == ("0.0.0.0", 8000, 0)
    assert "HPSEARCH_AUTH_ENABLED" not in compose["services"]["api"]["environment"]  # keys stay required


# ---- Dockerfile ----------------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with comments dropped and continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    return out


def _stages(instructions: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for keyword, rest in instructions:
        if keyword == "FROM":
            image, _, name = rest.partition(" AS ")
            current = stages.setdefault(name.strip() or image, [])
        if current is not None:
            current.append((keyword, rest))
    return stages


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return _instructions(ROOT / "Dockerfile")


def test_dockerfile_is_multi_stage_with_an_unprivileged_runtime(dockerfile: list[tuple[str, str]]) -> None:
    stages = _stages(dockerfile)
    assert list(stages)[-1] == "runtime" and "builder" in stages
    runtime = stages["runtime"]
    assert any(k == "COPY" and a.startswith("--from=builder ") for k, a in runtime)
    assert not any(k == "RUN" and "pip install" in a for k, a in runtime)  # builds happen in the builder only
    users = [a for k, a in runtime if k == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_dockerfile_base_image_and_torch_index_are_build_arguments(dockerfile: list[tuple[str, str]]) -> None:
    first_from = next(i for i, (k, _) in enumerate(dockerfile) if k == "FROM")
    assert ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm") in dockerfile[:first_from]
    assert dockerfile[first_from][1].startswith("${BASE_IMAGE}")
    builder = _stages(dockerfile)["builder"]
    assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in builder
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_pin = next(r for r in project["optional-dependencies"]["cpu"] if r.startswith("torch=="))
    assert ("ARG", f"TORCH_VERSION={torch_pin.removeprefix('torch==')}") in builder  # one torch everywhere


def test_dockerfile_healthcheck_entrypoint_and_default_command(dockerfile: list[tuple[str, str]]) -> None:
    runtime = _stages(dockerfile)["runtime"]
    (health,) = [a for k, a in runtime if k == "HEALTHCHECK"]
    (exposed,) = [a for k, a in runtime if k == "EXPOSE"]
    assert f"127.0.0.1:{exposed}/healthz" in health
    assert json.loads(next(a for k, a in runtime if k == "ENTRYPOINT")) == ["hpsearch"]
    command = json.loads(next(a for k, a in runtime if k == "CMD"))
    args = build_parser().parse_args(command)
    assert args.command == "serve" and args.host == "0.0.0.0" and str(args.port) == exposed


def test_dockerfile_copies_what_exists_and_dockerignore_keeps_it(dockerfile: list[tuple[str, str]]) -> None:
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    assert {".git", ".venv", ".env", ".hpsearch"} <= set(ignored)
    copied = [src for k, a in _stages(dockerfile)["builder"] if k == "COPY" for src in a.split()[:-1]]
    assert copied
    for src in copied:
        assert (ROOT / src).exists(), src
        assert not any(re.fullmatch(pattern.replace("*", ".*"), src) for pattern in ignored), src


def test_container_commands_answer_help() -> None:
    """The console script the image's ENTRYPOINT names runs each subcommand the containers use."""
    for command in ("serve", "worker", "db", "keys"):
        result = subprocess.run([str(HPSEARCH), command, "--help"], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0 and "usage: hpsearch" in result.stdout, result.stderr


def test_installed_package_ships_the_migrations(tmp_path: Path) -> None:
    """The image installs a wheel, not this checkout: every migration must be inside it."""
    src = tmp_path / "src"  # a copy, so that the build leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("app", "workers", "migrations"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path / "dist"), str(src)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("hpsearch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    migrations = {p.relative_to(ROOT).as_posix() for p in (ROOT / "migrations").rglob("*")
                  if p.is_file() and p.suffix in (".py", ".mako") and "__pycache__" not in p.parts}
    assert migrations and migrations <= names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "hpsearch = app.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


# ---- .env.example --------------------------------------------------------------------------------------


def _documented_settings() -> dict[str, str]:
    text = (ROOT / ".env.example").read_text()
    return dict(re.findall(r"^#?\s*(HPSEARCH_[A-Z0-9_]+)=(.*)$", text, re.MULTILINE))


def test_env_example_documents_every_setting() -> None:
    documented = set(_documented_settings())
    fields = {f"HPSEARCH_{name.upper()}" for name in Settings.model_fields}
    assert documented == fields, f"missing {fields - documented}, unknown {documented - fields}"


def test_env_example_shows_the_real_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(f"HPSEARCH_{name.upper()}", raising=False)
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    for var, value in _documented_settings().items():
        if value == "":
            continue  # derived from other settings, as its comment says
        field = var.removeprefix("HPSEARCH_").lower()
        monkeypatch.setenv(var, value)
        assert getattr(Settings(_env_file=None), field) == getattr(defaults, field), var  # type: ignore[call-arg]
        monkeypatch.delenv(var)
