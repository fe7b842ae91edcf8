#!/usr/bin/env bash
# Create .venv with everything the service and the tests need. Idempotent; takes ~2 minutes the first time.
# torch is pinned to the CPU build first where no GPU is present, so that the range in pyproject.toml does not
# pull a multi-GB CUDA build onto a CPU machine; GPU machines keep whatever torch they install.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then .venv/bin/pip install -q torch; else .venv/bin/pip install -q torch==2.13.0; fi
fi
.venv/bin/pip install -q -e ".[test]"
# A real Prometheus for the telemetry tests (Debian package; they skip with a reason where it cannot be had).
if ! command -v prometheus >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus) >/dev/null 2>&1 || \
    echo "bootstrap: could not install prometheus; its tests will be skipped" >&2
fi
