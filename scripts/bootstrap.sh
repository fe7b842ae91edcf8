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
# Debian packages that some tests drive (they skip with a reason where these cannot be had): a real Prometheus
# for the telemetry tests; headless Chromium and its driver for the playground's browser test.
apt_updated=0
apt_install() {  # apt_install "<commands the packages provide>" <package>...: only when one is missing
  local cmd missing=0
  for cmd in $1; do command -v "$cmd" >/dev/null 2>&1 || missing=1; done
  shift
  [ "$missing" = 1 ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] || return 0
  if { [ "$apt_updated" = 1 ] || apt-get update -qq >/dev/null 2>&1; } && apt_updated=1 &&
     DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1; then
    return 0
  fi
  echo "bootstrap: could not install $*; the tests that need it will be skipped" >&2
}
apt_install prometheus prometheus
apt_install "chromium chromedriver" chromium chromium-driver
