#!/usr/bin/env bash
# Set everything up and run the service on the embedded default (SQLite in .hpsearch/, CPU or GPU workers).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/hpsearch serve "$@"
