"""The `hpsearch` commands as a user runs them: `serve` on a fresh home, then the client commands against it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import ROOT
from tests.factories import study_spec
from tests.integration.processes import (
    FAST_LEASES,
    SHARED_CORES,
    alive,
    children_of,
    free_port,
    processes,
    wait_until,
)


def _cli(*args: str, env: dict[str, str], cwd: Path, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, cwd=cwd, capture_output=True,
                          timeout=timeout_s)
    # Decoded by hand: text=True would turn the progress bar's carriage returns into line breaks.
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def _readme_predict_body() -> dict[str, object]:
    block = re.search(r"predict\?use=ensemble.*?-d '(.*?)'", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    assert block, "the README's predict example"
    return dict(json.loads(block.group(1)))


def test_serve_then_submit_follow_status_trials_and_cancel(tmp_path: Path) -> None:
    (tmp_path / "tiny.json").write_text(json.dumps(study_spec(name="tiny", budget={"n_trials": 3, "epochs": 1})))
    (tmp_path / "big.json").write_text(json.dumps(study_spec(name="to-cancel", budget={"n_trials": 50})))
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPSEARCH_")}
    env.update(FAST_LEASES, **SHARED_CORES, HPSEARCH_HOME=str(tmp_path / "home"), HPSEARCH_API_URL=api,
               HPSEARCH_LOG_JSON="true")
    with processes() as procs, open(tmp_path / "serve.log", "wb") as log:
        # `serve` and `keys create` both migrate the missing SQLite file, at the same moment as in the README
        serve = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--workers", "3"],
                                 env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        procs.append(serve)
        created = _cli("keys", "create", "--owner", "me", env=env, cwd=tmp_path)
        assert created.returncode == 0, created.stderr
        env["HPSEARCH_API_KEY"] = created.stdout.strip().splitlines()[-1]
        auth = {"Authorization": f"Bearer {env['HPSEARCH_API_KEY']}"}

        def worker_registered() -> bool:
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                return bool(httpx.get(f"{api}/api/v1/workers", headers=auth, timeout=5).json()["data"])
            except httpx.HTTPError:
                return False

        wait_until(worker_registered, 120, "serve's embedded worker to register", interval_s=0.3)
        workers = _cli("workers", env=env, cwd=tmp_path)
        assert "devices cpu  slots 3  " in workers.stdout, workers  # --workers 3: three slots in total
        [worker] = children_of(serve.pid)
        cmdline = Path(f"/proc/{worker}/cmdline").read_text().split("\0")
        assert "--slots" in cmdline and not [a for a in cmdline if "sqlite" in a], cmdline  # no URL in `ps`

        followed = _cli("submit", "tiny.json", "--follow", env=env, cwd=tmp_path, timeout_s=180)
        assert followed.returncode == 0, (followed.stdout, followed.stderr)
        study_id, progress, *summary = followed.stdout.split("\n")  # not splitlines(): it splits at \r too
        bars = progress.split("\r")[1:]  # the bar redraws itself in place
        assert re.fullmatch(r"\[#{30}\] 3/3  running 0  pruned 0  failed 0  best 0\.\d{4}  completed", bars[-1]), bars
        assert summary[0].startswith(f"study {study_id} completed"), summary
        assert re.fullmatch(r"best trial #[0-2]: 0\.\d+", summary[1]), summary
        assert summary[2].startswith("  params: {") and "learning_rate" in summary[2]
        test_metrics = json.loads(summary[3].removeprefix("test: "))
        assert 0 < test_metrics["test_accuracy"] <= 1

        trials = _cli("trials", study_id, env=env, cwd=tmp_path)
        assert trials.returncode == 0, trials.stderr
        rows = [line.split()[:2] for line in trials.stdout.splitlines()[1:-1]]
        assert rows == [["0", "complete"], ["1", "complete"], ["2", "complete"]], trials.stdout
        assert trials.stdout.splitlines()[-1] == "(3 of 3)"

        # The README's predict example is a valid input for the study it describes.
        predicted = httpx.post(f"{api}/api/v1/studies/{study_id}/predict", params={"use": "ensemble"},
                               json=_readme_predict_body(), headers=auth, timeout=30)
        assert predicted.status_code == 200, predicted.text
        assert len(predicted.json()["predictions"]) == 1

        # Without trial slots a new study stays queued: one without a best trial once broke the listing.
        os.kill(worker, signal.SIGTERM)
        wait_until(lambda: not alive(worker), 30, "the embedded worker to stop")
        submitted = _cli("submit", "big.json", env=env, cwd=tmp_path)
        assert submitted.returncode == 0, submitted.stderr
        queued = submitted.stdout.strip()
        listed = _cli("status", env=env, cwd=tmp_path)
        assert listed.returncode == 0, listed.stderr
        assert re.search(rf"^{queued}\s+queued\s+0/50\s+-\s+to-cancel$", listed.stdout, re.MULTILINE), listed.stdout
        assert re.search(rf"^{study_id}\s+completed\s+3/3\s+0\.\d{{4}}\s+tiny$", listed.stdout, re.MULTILINE)
        one = _cli("status", queued, env=env, cwd=tmp_path)
        assert one.returncode == 0, one.stderr
        assert "0/50" in one.stdout and "best -  queued" in one.stdout and f"study {queued} queued" in one.stdout
        cancelled = _cli("cancel", queued, env=env, cwd=tmp_path)
        assert cancelled.returncode == 0 and cancelled.stdout.strip() == f"study {queued} cancelled", cancelled
