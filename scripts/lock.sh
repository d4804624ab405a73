#!/usr/bin/env bash
# Refresh requirements.lock: every package scripts/setup.sh, CI and the image install, at an exact version,
# with the hashes of its files. Arguments go to `uv pip compile`:
#   scripts/lock.sh                          # add what pyproject now asks for, keep every other pin
#   scripts/lock.sh --upgrade-package optuna # move one package to the newest its range allows
#   scripts/lock.sh --upgrade                # move everything
# Run the whole suite on the new lock before committing it (scripts/test.sh installs it first).
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.8
tools=${HPSEARCH_LOCK_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/hpsearch-lock-tools}
if [ "$("$tools/bin/uv" --version 2>/dev/null)" != "uv $UV_VERSION" ]; then
  python3 -m venv "$tools"
  "$tools/bin/python" -m pip install -q "uv==$UV_VERSION"
fi
# The lock is resolved for Linux x86_64 and Python 3.11 (CI, scripts/setup.sh, the default image). CPU
# PyTorch is PyTorch's own CPU wheel (the PyPI build of the same version pulls several GB of CUDA packages):
# this project's machines carry it in PIP_FIND_LINKS; elsewhere pass
#   --extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match
"$tools/bin/uv" pip compile pyproject.toml examples/hpsearch-seqconv/pyproject.toml \
  --extra cpu --extra dev --extra gpu --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --find-links "${PIP_FIND_LINKS:-/opt/wheels}" --custom-compile-command scripts/lock.sh \
  --output-file requirements.lock --quiet "$@"
