"""docs/ARCHITECTURE.md's module map names every module of app/ and workers/, and only modules that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A line of the map starts with what it names: files and folders, comma-separated, relative to the folder
# above it (the nearest less indented folder line); the description follows after two spaces or more.
_NAME = r"(?:[\w.]+/)*(?:\w+\.py|\w+/)"
_NAMES = re.compile(rf"^({_NAME}(?:,\s*{_NAME})*)(?:\s{{2,}}|$)")


def named_in_map(text: str) -> set[str]:
    """The module paths the map names; a folder line names its package (folder/__init__.py)."""
    block = text.split("## The modules", 1)[1].split("```")[1]
    folders: list[tuple[int, str]] = []  # (indent, path) of the enclosing folder lines
    named: set[str] = set()
    for line in block.splitlines():
        match = _NAMES.match(line.strip())
        if not match:
            continue  # a description carried over from the line above, or the fence's language
        indent = len(line) - len(line.lstrip())
        while folders and folders[-1][0] >= indent:
            folders.pop()
        base = folders[-1][1] if folders else ""
        for name in re.split(r",\s*", match.group(1)):
            path = base + name
            if name.endswith("/"):
                named.add(path + "__init__.py")
                folders.append((indent, path))
            else:
                named.add(path)
    return named


def modules() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for package in ("app", "workers") for p in (ROOT / package).rglob("*.py")}


def test_the_map_names_every_module_and_no_other() -> None:
    named = named_in_map((ROOT / "docs" / "ARCHITECTURE.md").read_text())
    assert sorted(modules() - named) == [], "modules missing from docs/ARCHITECTURE.md's map"
    ours = {n for n in named if n.startswith(("app/", "workers/"))}
    assert sorted(ours - modules()) == [], "the map names modules that are gone"


def test_the_map_reader_follows_folders_and_lists() -> None:
    text = ("## The modules\n```\napp/          the service\n  a.py, b.py  two\n               c.py is a continuation\n"
            "  sub/        a package\n    c.py      one\n  d/e.py      nested by path\nworkers/     the pool\n```\n")
    assert named_in_map(text) == {"app/__init__.py", "app/a.py", "app/b.py", "app/sub/__init__.py",
                                  "app/sub/c.py", "app/d/e.py", "workers/__init__.py"}
