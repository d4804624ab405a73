"""requirements.lock against pyproject: the lock pins, with hashes, every dependency of what setup.sh installs,
inside pyproject's ranges, and the image builds the torch version it pins."""
from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
# What scripts/setup.sh installs, and so what the lock must cover.
EXTRAS = ("cpu", "dev", "gpu")
PLUGIN = ROOT / "examples" / "hpsearch-seqconv" / "pyproject.toml"


def locked() -> dict[str, tuple[Version, list[str]]]:
    """Each locked package's exact version and hashes, by canonical name."""
    text = (ROOT / "requirements.lock").read_text().replace("\\\n", " ")
    pins: dict[str, tuple[Version, list[str]]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, *options = line.split(" --")
        req = Requirement(spec)
        (pin,) = req.specifier
        assert pin.operator == "==", f"{req.name} is not pinned exactly: {spec}"
        hashes = [o.removeprefix("hash=") for o in options if o.startswith("hash=")]
        assert len(hashes) == len(options), f"{req.name}: options other than hashes: {options}"
        pins[canonicalize_name(req.name)] = (Version(pin.version), hashes)
    return pins


def wanted() -> list[Requirement]:
    """The requirements of hpsearch with the extras setup.sh installs, of the example plugin, and of building
    both."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *(s for extra in EXTRAS for s in project["optional-dependencies"][extra])]
    plugin = tomllib.loads(PLUGIN.read_text())
    specs += plugin["project"]["dependencies"]
    # setup.sh builds both without build isolation, with the setuptools of the lock
    specs += [*tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"],
              *plugin["build-system"]["requires"]]
    return [Requirement(s) for s in specs]


def test_every_pyproject_dependency_is_locked_inside_its_range() -> None:
    pins = locked()
    for req in wanted():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is in pyproject but not in requirements.lock: run scripts/lock.sh"
        version = pins[name][0]
        assert req.specifier.contains(version, prereleases=True), (
            f"requirements.lock has {name}=={version}, outside pyproject's {req}: run scripts/lock.sh")


def test_every_locked_package_has_a_hash_and_optuna_a_bounded_range() -> None:
    pins = locked()
    assert not [name for name, (_, hashes) in pins.items() if not hashes]
    assert all(h.startswith("sha256:") for _, hashes in pins.values() for h in hashes)
    optuna = next(r for r in wanted() if r.name == "optuna")
    # The upper bound is the minor after the locked one: the newest minor the suite passed on.
    locked_optuna = pins["optuna"][0]
    assert optuna.specifier.contains(locked_optuna)
    assert not optuna.specifier.contains(f"{locked_optuna.major}.{locked_optuna.minor + 1}.0"), optuna


def test_the_lock_holds_the_dependencies_of_its_dependencies() -> None:
    """Walks the requirements of the installed distributions (where they are the locked versions), extras
    included: a package that a locked one needs and the lock lacks would fail setup.sh's `pip check`."""
    pins = locked()
    todo = [(canonicalize_name(r.name), frozenset(r.extras)) for r in wanted()]
    seen: set[tuple[str, frozenset[str]]] = set()
    missing: set[str] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        if name not in pins:
            missing.add(name)
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if Version(dist.version) != pins[name][0]:
            continue  # another version's requirements say nothing about the locked one
        for spec in dist.requires or []:
            req = Requirement(spec)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    assert not missing, f"needed but not in requirements.lock: {sorted(missing)}"


def test_the_image_builds_the_locked_torch_version() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    (image_torch,) = re.findall(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.MULTILINE)
    assert Version(image_torch).public == locked()["torch"][0].public
