#!/usr/bin/env bash
# Create .venv and install hpsearch with CPU PyTorch and the test tools at the versions of requirements.lock;
# quick when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.hpsearch-installed
# The example plugin (examples/hpsearch-seqconv) is installed too: the tests run it end to end.
want=$(cat requirements.lock pyproject.toml examples/hpsearch-seqconv/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pip=(.venv/bin/python -m pip install -q)
  # Every dependency from the lock, each file checked against its hash; then the two local projects alone,
  # built with the locked setuptools.
  "${pip[@]}" --require-hashes --no-deps -r requirements.lock
  "${pip[@]}" --no-deps --no-build-isolation -e . -e examples/hpsearch-seqconv
  .venv/bin/python -m pip check  # a lock that misses a dependency fails here, not in the middle of a test
  echo "$want" > "$stamp"
fi
