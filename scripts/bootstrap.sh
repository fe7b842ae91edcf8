#!/usr/bin/env bash
# Create .venv from the committed lock and install this package into it (editable), then write the default
# service's model directory. Idempotent: a second run with the same lock only checks; a changed lock rebuilds .venv.
#
# The lock is requirements/cuda.txt where a GPU answers nvidia-smi, requirements/cpu.txt elsewhere
# (GPT2SERVE_LOCK=cpu|cuda chooses). Each is locked for one CPython version, named in requirements/<variant>.in;
# with another Python the install falls back to pyproject.toml's ranges and says so. Refresh the locks on purpose
# with scripts/lock.sh; scripts/fresh_resolve.sh tries the newest versions the ranges allow in a scratch venv.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lock_lib.sh

variant=$(lock_variant)
lock=requirements/$variant.txt
locked_python=$(lock_python "$variant")
version_of() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }
python=${PYTHON:-python3}
if [ "$(version_of "$python")" != "$locked_python" ] && command -v "python$locked_python" >/dev/null 2>&1; then
  python=python$locked_python
fi
py_version=$(version_of "$python")
source_kind=$variant; [ "$py_version" = "$locked_python" ] || source_kind=ranges  # read by tests/test_packaging.py
stamp="$source_kind $py_version $(sha256sum < "$lock" | cut -c1-16)"
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps)

if [ "$(cat .venv/.lock-stamp 2>/dev/null)" != "$stamp" ]; then
  [ -f .venv/.lock-stamp ] && echo "bootstrap: $lock changed since .venv was made: rebuilding .venv" >&2
  rm -rf .venv
  "$python" -m venv .venv
  torch_pin=$(lock_torch "$variant")
  if [ "$source_kind" != ranges ]; then
    # torch first and alone: PyTorch's CPU build is on PyTorch's own index, asked only where pip's configuration
    # (a find-links directory, say) cannot supply it, and only for torch.
    torch_req=$(mktemp)
    awk '/^torch==/ {on = 1} on && /^ *#/ {exit} on {print}' "$lock" > "$torch_req"
    "${pip[@]}" --require-hashes -r "$torch_req" 2>/dev/null ||
      "${pip[@]}" --require-hashes -r "$torch_req" --find-links "$TORCH_CPU_LINKS"
    rm -f "$torch_req"
    "${pip[@]}" --require-hashes -r "$lock"
  else
    echo "bootstrap: $lock is locked for Python $locked_python, this is $py_version: installing from" \
         "pyproject.toml's ranges instead (not reproducible: versions may differ from CI's)" >&2
    case $torch_pin in
      *+cpu) .venv/bin/python -m pip install -q "torch==$torch_pin" --find-links "$TORCH_CPU_LINKS" ;;
      *) .venv/bin/python -m pip install -q "torch==$torch_pin" ;;
    esac
    .venv/bin/python -m pip install -q setuptools ".[test]"
  fi
  echo "$stamp" > .venv/.lock-stamp
fi
# This package itself, editable: cheap, and it follows changes to pyproject.toml's package list.
"${pip[@]}" --no-build-isolation -e .

# The default service's model (configs/tiny.yaml): GPT-2 small's config and a BPE tokenizer of GPT-2's vocabulary
# size trained here on Python's own sources, so that text prompts get text back with no network; the weights are
# drawn at start-up (load_format: dummy).
[ -f models/gpt2-offline/tokenizer.json ] || .venv/bin/gpt2serve make-dummy-model models/gpt2-offline --like gpt2

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
