#!/usr/bin/env bash
# Create .venv and install hpsearch with CPU PyTorch and the test tools; quick when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.hpsearch-installed
# The example plugin (examples/hpsearch-seqconv) is installed too: the tests run it end to end.
want=$(cat pyproject.toml examples/hpsearch-seqconv/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[cpu,dev]"
  .venv/bin/python -m pip install -q -e examples/hpsearch-seqconv
  echo "$want" > "$stamp"
fi
