"""The README's quick start and Python client session, run as they are written against a fresh `hpsearch serve`.

The only changes to the commands: the server the test starts (temp SQLite, temp home, a free port) stands in
for `scripts/setup.sh` and `scripts/serve.sh &`, and this interpreter for `.venv/bin`. The quick start never
stops the server: the sections after it use the same one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT
from tests.integration.processes import SHARED_CORES, free_port, processes, wait_until


def _block(section: str, language: str) -> str:
    """The first fenced block of `language` in the README section whose heading is `section`."""
    text = (ROOT / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(rf"```{language}\n(.*?)```", body, flags=re.DOTALL)
    assert found, f"a {language} block in the README's {section!r} section"
    return found.group(1)


def _replace(text: str, old: str, new: str) -> str:
    assert old in text, f"the README no longer has {old!r}: update this test with it"
    return text.replace(old, new)


def _drop_line(text: str, starting: str) -> str:
    lines = text.splitlines()
    kept = [line for line in lines if not line.startswith(starting)]
    assert len(kept) == len(lines) - 1, f"one line starting {starting!r} in the quick start"
    return "\n".join(kept) + "\n"


@pytest.mark.slow
def test_the_quick_start_and_the_client_session_run_as_written(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPSEARCH_")}
    env.update(SHARED_CORES, HPSEARCH_HOME=str(tmp_path / "home"), HPSEARCH_API_URL=url, PYTHONPATH=str(ROOT),
               HPSEARCH_LOG_JSON="true", TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    cli = f"{sys.executable} -m app.cli"

    script = _block("Quick start", "bash")
    script = _drop_line(script, "scripts/setup.sh")
    script = _drop_line(script, "scripts/serve.sh &")
    script = _replace(script, "localhost:8000", f"127.0.0.1:{port}")
    script = _replace(script, ".venv/bin/python", sys.executable)  # first: the interpreter's path may hold it
    script = _replace(script, ".venv/bin/hpsearch", cli)

    session = _block("The Python client", "python")
    session = _replace(session, "http://127.0.0.1:8000", url)

    with processes() as procs, open(tmp_path / "serve.log", "wb") as log:
        serve = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--workers", "2"],
                                 env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        procs.append(serve)

        def up() -> bool:
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 120, "hpsearch serve to answer /readyz", interval_s=0.3)
        quick = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, cwd=tmp_path,
                               capture_output=True, timeout=300)
        out, err = quick.stdout.decode(), quick.stderr.decode()
        assert quick.returncode == 0, (out[-3000:], err[-3000:])
        assert re.search(r"\] 20/20  running 0 .* completed\n", out), out[-3000:]
        assert re.search(r"^study [0-9a-f]{32} cancelled$", out, flags=re.MULTILINE), out[-3000:]
        assert re.search(r"^\s*#\s+state\s+value\s+secs\s+\w+", out, flags=re.MULTILINE), out  # the trials table
        [work] = [d for d in (tmp_path / "tmp").iterdir() if (d / "spec.json").exists()]  # $WORK, from mktemp -d
        assert {p.name for p in work.iterdir()} == {"spec.json", "long.json", "digits-export"}
        assert (work / "digits-export" / "model.safetensors").is_file()
        assert (work / "digits-export" / "ensemble" / "ensemble.json").is_file()
        assert not (ROOT / "spec.json").exists() and not (ROOT / "digits-export").exists()

        key = subprocess.run([sys.executable, "-m", "app.cli", "keys", "create", "--owner", "notebook"], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=120).stdout.strip().splitlines()[-1]
        notebook = subprocess.run([sys.executable, "-c", session], env={**env, "HPSEARCH_API_KEY": key},
                                  cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert notebook.returncode == 0, (notebook.stdout[-3000:], notebook.stderr[-3000:])
        assert "completed" in notebook.stdout
        assert "422 objective.metric - unknown metric 'accuracy'" in notebook.stdout, notebook.stdout
        assert (tmp_path / "digits-notebook-export" / "config.json").is_file()

    said = [line for line in (tmp_path / "serve.log").read_text().splitlines() if "listening on" in line]
    assert said == [f"hpsearch listening on {url}: dashboard {url}/, API {url}/api/v1, API docs {url}/docs"], said


def test_the_readme_names_datasets_as_sent_and_counts_the_searched_hyperparameters() -> None:
    import json

    from app.ml import data
    from app.ml.space import Context, resolve_space
    from app.schemas.study import StudySpec

    readme = (ROOT / "README.md").read_text()
    datasets = readme.split("**Datasets**", 1)[1].split("\n\n", 1)[0]
    named = re.findall(r"`(builtin:[a-z_]+)`", datasets)
    assert sorted(named) == sorted(data.BUILTINS), named  # every built-in, each written as a spec names it
    assert "HPSEARCH_MNIST_DIR" in datasets and "`dataset:<id>`" in datasets
    assert not re.search(r"`(iris|wine|breast_cancer|synthetic)`", datasets)

    spec_text = _block("Quick start", "bash").split("<<'SPEC'\n", 1)[1].split("\nSPEC\n", 1)[0]
    spec = StudySpec.model_validate(json.loads(spec_text))
    searched = resolve_space(spec.space_entries(), Context(model="mlp", image=True))  # digits: 1x8x8 images
    named_here = len(spec.search_space)
    assert f"names {named_here} of the {len(searched)} that apply" in " ".join(readme.split())
    assert f"the other {len(searched) - named_here} " in " ".join(readme.split())
    assert "/docs" in readme
