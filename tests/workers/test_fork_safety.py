"""A torch op run in the supervisor must not hang the runners it forks afterwards (GNU libgomp keeps no
OpenMP team across fork). In a fresh interpreter: this test process keeps torch on one thread itself."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT

SUPERVISOR = """
import multiprocessing as mp
import torch
from workers.runner import warm_imports

def runner(q):
    torch.set_num_threads(2)  # as a runner sets its slot's threads
    a = torch.randn(512, 512)
    q.put(float((a @ a).sum()))

warm_imports()  # what the supervisor does first
a = torch.randn(512, 512)
(a @ a).sum()  # a torch op in the supervisor afterwards (a plugin's import, say)
ctx = mp.get_context("fork")
q = ctx.Queue()
child = ctx.Process(target=runner, args=(q,))
child.start()
child.join(120)  # a deadlock, not a slow op: the product takes well under a second
if child.is_alive():
    child.kill()
    raise SystemExit("the forked runner hung in its first multi-threaded op")
print("runner finished", q.get(timeout=5))
"""


def test_a_runner_forked_after_a_torch_op_in_the_supervisor_does_not_hang() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # a machine of two cores or more, as CI's
    done = subprocess.run([sys.executable, "-c", SUPERVISOR], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "runner finished" in done.stdout
