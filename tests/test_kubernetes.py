"""Kubernetes manifests: every overlay renders and validates, and names only what the code accepts.

No cluster runs here: `kubectl kustomize` renders each overlay offline and `kubernetes-validate` checks every
object against the bundled Kubernetes schemas in strict mode (unknown fields fail). The commands, flags,
ports, probe paths and environment variables are then checked against the real argparse parser, the Settings
class and the FastAPI routes, so a renamed flag or setting fails here instead of in a cluster.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient
from kubernetes_validate.utils import SchemaNotFoundError, latest_version
from sqlalchemy import text

from app.cli import build_parser
from app.core.config import Settings
from app.core.db import Database
from app.main import create_app
from app.models import TrialState
from tests.conftest import make_settings
from tests.factories import client_for, study_spec
from workers import leasing

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
OVERLAYS = {"external-postgres", "in-cluster-postgres", "cpu-workers", "servicemonitor"}
# The oldest Kubernetes release the manifests promise to work on, and the newest whose schemas are bundled.
KUBERNETES_VERSIONS = ("1.30", latest_version())
# Custom resources have no bundled schema; only these may appear, and they are checked field by field below.
CUSTOM_KINDS = {"ServiceMonitor", "ScaledObject", "TriggerAuthentication"}
DATABASE_SECRET = "hpsearch-database"
IMAGES = {"hpsearch", "hpsearch-cuda"}  # the names a user's overlay points at a registry
API_PREFIX = "/api/v1"


# ---- rendering -----------------------------------------------------------------------------------------


def _kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is missing; CI installs it (.ci/run)")
        pytest.skip("kubectl not installed: the Kubernetes manifests are not rendered")
    return found


@cache
def _render_dir(path: Path) -> tuple[dict[str, Any], ...]:
    result = subprocess.run([_kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {path}: {result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(overlay: str) -> list[dict[str, Any]]:
    """The overlay's objects, as `kubectl apply -k` would send them (a deep copy: tests may change them)."""
    return copy.deepcopy(list(_render_dir(K8S / "overlays" / overlay)))


def render_components(tmp_path: Path, *components: str) -> list[dict[str, Any]]:
    """The base with the named components, as a user's own overlay would combine them."""
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "base", tmp_path)],
        "components": [os.path.relpath(K8S / "components" / c, tmp_path) for c in components],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return list(_render_dir(tmp_path))


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod spec) of every Deployment, StatefulSet and Job."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield doc, doc["spec"]["template"]["spec"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def hpsearch_containers(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(workload, pod spec, container) of every container that runs the hpsearch image."""
    for workload, pod in pod_specs(docs):
        for container in containers(pod):
            if workload["metadata"]["labels"].get("app.kubernetes.io/component") != "database":
                yield workload, pod, container


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---- what the code accepts -----------------------------------------------------------------------------


def console_scripts() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def dockerfile_uid() -> int:
    match = re.search(r"^ARG UID=(\d+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert match, "the Dockerfile no longer declares ARG UID"
    return int(match.group(1))


def subcommand_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The argparse parser of the (nested) subcommand that argv names, e.g. `keys create`."""
    parser = build_parser()
    for word in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        parser = subs[0].choices[word]
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """argv as the CLI parses it; an unknown command or flag, or a hidden internal one, fails the test."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"the CLI rejects {argv}")
    documented = {option for action in subcommand_parser(argv)._actions if action.help != argparse.SUPPRESS
                  for option in action.option_strings}
    for word in argv:
        flag = word.split("=", 1)[0]
        assert not flag.startswith("--") or flag in documented, f"{flag} in {argv} is not a documented flag"
    return args


def settings_fields_by_env() -> dict[str, str]:
    """HPSEARCH_<FIELD> -> field, as pydantic-settings reads the environment."""
    prefix = Settings.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper(): name for name in Settings.model_fields}


@pytest.fixture(scope="module")
def answers(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path) -> Iterator[Callable[[str], bool]]:
    """Whether the real app answers GET path with 200, the way a kubelet probe or Prometheus asks (no key)."""
    home = tmp_path_factory.mktemp("app")
    shutil.copy(sqlite_template, home / "hpsearch.db")
    settings = make_settings(f"sqlite:///{home / 'hpsearch.db'}", home)
    db = Database(settings.database_url)
    with TestClient(create_app(settings, db)) as client:
        yield lambda path: client.get(path).status_code == 200
    db.dispose()


def env_of(container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each environment variable of the container, from `env` and from the ConfigMaps in `envFrom`."""
    out = {e["name"]: e for e in container.get("env", [])}
    for source in container.get("envFrom", []):
        assert set(source) == {"configMapRef"}, f"unexpected envFrom {source}"
        config = one(docs, "ConfigMap", source["configMapRef"]["name"])  # the generator's hashed name
        for name, value in config["data"].items():
            assert name not in out, f"{name} is set twice"
            out[name] = {"name": name, "value": value}
    return out


# ---- rendering and schemas -----------------------------------------------------------------------------


def test_the_overlays_are_the_documented_ones() -> None:
    found = {p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml")}
    assert found == OVERLAYS


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_every_overlay_renders_and_validates_strictly(overlay: str, version: str) -> None:
    docs = render(overlay)
    assert {"Job", "Deployment", "Service", "PodDisruptionBudget", "PersistentVolumeClaim"} <= {d["kind"] for d in docs}
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except SchemaNotFoundError:
            assert doc["kind"] in CUSTOM_KINDS, f"{doc['kind']} has no schema in Kubernetes {version}"
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(map(str, exc.path))
            pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']} at {path}: {exc.message}")


def test_strict_validation_rejects_an_unknown_field() -> None:
    """The schema check above can fail: a misspelt field is an error, not ignored."""
    docs = render("external-postgres")
    worker = one(docs, "Deployment", "hpsearch-worker")
    worker["spec"]["template"]["spec"]["terminationGracePeriod"] = 90
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, KUBERNETES_VERSIONS[0], strict=True)


def test_components_combine_into_one_installation(tmp_path: Path) -> None:
    """A trial on a cluster without GPUs: in-cluster PostgreSQL, CPU workers, a ServiceMonitor and KEDA."""
    docs = render_components(tmp_path, "in-cluster-postgres", "cpu-workers", "servicemonitor", "keda-postgresql")
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "ServiceMonitor", "ScaledObject", "TriggerAuthentication"} <= kinds
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(docs)


# ---- the manifests name only what the code accepts -----------------------------------------------------


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_commands_flags_and_environment_exist_in_the_code(overlay: str) -> None:
    docs = render(overlay)
    scripts, fields = console_scripts(), settings_fields_by_env()
    for workload, _, container in hpsearch_containers(docs):
        where = f"{overlay}: {workload['metadata']['name']}/{container['name']}"
        assert container["command"][0] in scripts and len(container["command"]) == 1, where
        assert container["image"] in IMAGES, f"{where}: {container['image']} is not an image DEPLOYMENT.md maps"
        parse(container["args"])
        env = env_of(container, docs)
        assert set(env) <= set(fields), f"{where}: {set(env) - set(fields)} are not Settings fields"
        # The URL carries the password: it comes from the Secret only, never from a manifest.
        assert env["HPSEARCH_DATABASE_URL"] == {"name": "HPSEARCH_DATABASE_URL", "valueFrom": {
            "secretKeyRef": {"name": DATABASE_SECRET, "key": "url"}}}, where
        for name, variable in env.items():
            if "value" in variable:  # a literal the field accepts (a typo in a number or a boolean fails here)
                Settings.model_validate({fields[name]: variable["value"]})
    assert not [d for d in docs if d["kind"] == "Secret"], "a Secret in the manifests would carry credentials"
    assert "postgresql+psycopg://" not in yaml.safe_dump_all(docs)


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_migrations_run_before_the_api_and_the_workers(overlay: str) -> None:
    docs = render(overlay)
    job = one(docs, "Job", "hpsearch-migrate")
    (migrate,) = job["spec"]["template"]["spec"]["containers"]
    args = parse(migrate["args"])
    assert (args.command, args.action, args.revision) == ("db", "upgrade", "head")
    for name in ("hpsearch-api", "hpsearch-worker"):
        pod = one(docs, "Deployment", name)["spec"]["template"]["spec"]
        (init,) = pod["initContainers"]
        assert init["args"] == migrate["args"] and init["image"] == pod["containers"][0]["image"], name


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_the_upgrade_selector_applies_the_job_with_everything_it_reads(overlay: str) -> None:
    """DEPLOYMENT.md applies `-l app.kubernetes.io/component in (migration, settings)` before the rest."""
    match = re.search(r"kubectl apply -k \S+ -l '(app\.kubernetes\.io/component) in \(([^)]*)\)'",
                      (ROOT / "docs" / "DEPLOYMENT.md").read_text())
    assert match, "the upgrade step of DEPLOYMENT.md changed"
    label, values = match.group(1), {v.strip() for v in match.group(2).split(",")}
    docs = render(overlay)
    selected = {(d["kind"], d["metadata"]["name"]) for d in docs
                if d["metadata"].get("labels", {}).get(label) in values}
    (migrate,) = one(docs, "Job", "hpsearch-migrate")["spec"]["template"]["spec"]["containers"]
    reads = {("ConfigMap", s["configMapRef"]["name"]) for s in migrate.get("envFrom", [])}
    assert selected == {("Job", "hpsearch-migrate"), *reads}


def test_commands_the_documentation_runs_in_pods_exist() -> None:
    """`kubectl exec ... -- hpsearch ...` lines of the Kubernetes section parse with the real CLI."""
    text = (ROOT / "docs" / "DEPLOYMENT.md").read_text()
    section = text[text.index("### Kubernetes"):]
    section = section[:section.index("\n### ", 1)]
    commands = re.findall(r"exec [^\n]*?-- hpsearch ([^\n`#]+)", section)
    assert any(c.startswith("keys create --owner") for c in commands), commands
    for command in commands:
        parse(shlex.split(command))


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_api_port_probes_and_service_agree_with_the_app(overlay: str, answers: Callable[[str], bool]) -> None:
    docs = render(overlay)
    pod = one(docs, "Deployment", "hpsearch-api")["spec"]["template"]
    (api,) = pod["spec"]["containers"]
    args = parse(api["args"])
    assert args.command == "serve" and args.workers == 0  # API only: workers are their own pods
    assert args.host == "0.0.0.0"
    (port,) = api["ports"]
    assert port["containerPort"] == args.port
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = api[probe]["httpGet"]
        assert answers(get["path"]) and not get["path"].startswith(API_PREFIX), probe
        assert get["port"] in (port["name"], port["containerPort"]), probe
    service = one(docs, "Service", "hpsearch-api")
    assert labels_match(service["spec"]["selector"], pod["metadata"]["labels"])
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in (port["name"], port["containerPort"])
    assert api["resources"]["requests"] and api["resources"]["limits"]

    annotations = pod["metadata"].get("annotations", {})
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert bool(annotations) != bool(monitors), "scrape by annotations or by a ServiceMonitor, one of them"
    if annotations:
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == args.port
        assert answers(annotations["prometheus.io/path"])
    for monitor in monitors:
        assert labels_match(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] == service_port["name"] and answers(endpoint["path"])
    assert not answers("/no-such-probe")  # the checks above can fail


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_workers_hand_trials_back_before_they_are_killed(overlay: str) -> None:
    docs = render(overlay)
    worker = one(docs, "Deployment", "hpsearch-worker")
    pod = worker["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    args = parse(container["args"])
    assert args.command == "worker"
    assert pod["spec"]["terminationGracePeriodSeconds"] > args.shutdown_grace + 10  # room to hand trials back
    assert "replicas" not in worker["spec"], "kubectl scale and autoscalers own the worker count"
    budget = one(docs, "PodDisruptionBudget", "hpsearch-worker")
    assert labels_match(budget["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    limits = container["resources"]["limits"]
    if overlay == "cpu-workers":
        assert args.devices == "cpu" and "nvidia.com/gpu" not in limits and "tolerations" not in pod["spec"]
        assert pod["spec"]["initContainers"][0]["image"] == container["image"]
    else:
        assert args.devices == "auto" and int(limits["nvidia.com/gpu"]) >= 1
        assert container["image"] != one(docs, "Deployment", "hpsearch-api")["spec"]["template"]["spec"][
            "containers"][0]["image"], "GPU workers run the CUDA image"


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_shared_files_are_one_read_write_many_claim_at_hpsearch_home(overlay: str) -> None:
    docs = render(overlay)
    claim = one(docs, "PersistentVolumeClaim", "hpsearch-shared")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in ("hpsearch-api", "hpsearch-worker"):
        pod = one(docs, "Deployment", name)["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        main = pod["containers"][0]
        home = env_of(main, docs)["HPSEARCH_HOME"]["value"]
        (mount,) = [m for m in main["volumeMounts"] if m["mountPath"] == home]
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == "hpsearch-shared", name


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_pods_run_unprivileged(overlay: str) -> None:
    docs = render(overlay)
    for _, pod in pod_specs(docs):
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] != 0
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in containers(pod):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
            assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    for _, pod, container in hpsearch_containers(docs):
        assert pod["securityContext"]["runAsUser"] == dockerfile_uid()  # the image's own user owns its files
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
    account = one(docs, "ServiceAccount", "hpsearch")
    assert account["automountServiceAccountToken"] is False


def test_in_cluster_postgres_is_what_the_database_url_names() -> None:
    docs = render("in-cluster-postgres")
    server = one(docs, "StatefulSet", "hpsearch-postgres")
    service = one(docs, "Service", "hpsearch-postgres")
    assert labels_match(service["spec"]["selector"], server["spec"]["template"]["metadata"]["labels"])
    (postgres,) = server["spec"]["template"]["spec"]["containers"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert postgres["image"] == compose["services"]["postgres"]["image"]  # one PostgreSQL version to support
    env = {e["name"]: e for e in postgres["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == DATABASE_SECRET
    # The URL the documentation tells the user to store in the Secret names this server, user and database.
    url = f"postgresql+psycopg://{env['POSTGRES_USER']['value']}:{{}}@{service['metadata']['name']}:" \
          f"{service['spec']['ports'][0]['port']}/{env['POSTGRES_DB']['value']}"
    assert url.format("$PW") in (ROOT / "docs" / "DEPLOYMENT.md").read_text()
    assert url.format("PASSWORD") in (K8S / "components" / "in-cluster-postgres" / "kustomization.yaml").read_text()


# ---- autoscaling ---------------------------------------------------------------------------------------


def keda_query(tmp_path: Path) -> str:
    docs = render_components(tmp_path, "keda-postgresql")
    scaled = one(docs, "ScaledObject", "hpsearch-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment", "hpsearch-worker")["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    auth = one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert auth["spec"]["secretTargetRef"][0]["name"] == DATABASE_SECRET
    return str(trigger["metadata"]["query"])


@pytest.mark.postgres
def test_keda_query_counts_the_trial_slots_studies_can_use(tmp_path: Path, postgres_url: str) -> None:
    query = keda_query(tmp_path)
    settings = make_settings(postgres_url, tmp_path / "home")
    db = Database(settings.database_url)
    try:
        client = client_for(settings, db)

        def create(n_trials: int, max_parallel: int) -> str:
            spec = study_spec(budget={"n_trials": n_trials, "max_parallel": max_parallel})
            response = client.post(f"{API_PREFIX}/studies", json=spec)
            assert response.status_code == 201, response.text
            return str(response.json()["id"])

        def slots_wanted() -> int:
            with db.engine.connect() as conn:
                return int(conn.execute(text(query)).scalar_one())

        assert slots_wanted() == 0
        nearly_done = create(n_trials=3, max_parallel=4)  # the oldest: claimed first
        wide = create(n_trials=10, max_parallel=2)
        paused = create(n_trials=4, max_parallel=4)
        cancelled = create(n_trials=4, max_parallel=4)
        assert slots_wanted() == 3 + 2 + 4 + 4
        assert client.post(f"{API_PREFIX}/studies/{paused}/pause").status_code == 200
        assert client.post(f"{API_PREFIX}/studies/{cancelled}/cancel").status_code == 200
        assert slots_wanted() == 3 + 2

        first = leasing.claim_trial(db, worker_id="w", device="cpu", trial_deadline_s=60)
        assert first is not None and first.study_id == nearly_done
        assert slots_wanted() == 3 + 2  # a running trial still wants its slot
        assert leasing.finish_trial(db, first, state=TrialState.COMPLETE, value=0.9)
        assert slots_wanted() == 2 + 2  # a finished one does not
        progress = client.get(f"{API_PREFIX}/studies/{nearly_done}").json()["progress"]
        assert progress["n_trials"] - progress["finished"] == 2
        assert client.get(f"{API_PREFIX}/studies/{wide}").json()["status"] in ("queued", "running")
    finally:
        db.dispose()
