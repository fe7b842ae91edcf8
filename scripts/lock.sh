#!/usr/bin/env bash
# Refresh the committed locks from pyproject.toml's ranges, taking the newest versions they allow:
#   bash scripts/lock.sh
# writes requirements/cpu.txt (PyTorch's CPU build: CI and CPU machines) and requirements/cuda.txt (the registry's
# CUDA build of torch: GPU machines and the GPU-host bundle), exact pins with hashes for x86_64 Linux and the CPython
# version that each requirements/<variant>.in names; those files hold the inputs beyond pyproject.toml. Then run the
# tests on the new lock (bash scripts/bootstrap.sh && .venv/bin/python -m pytest -q) and commit the pair together.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lock_lib.sh
UV_VERSION=0.13.10
uv=$(command -v uv || true)
if [ -z "$uv" ] || [ "$("$uv" --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  tools=${XDG_CACHE_HOME:-$HOME/.cache}/gpt2serve/uv-$UV_VERSION
  [ -x "$tools/bin/uv" ] || python3 -m pip install -q --target "$tools" "uv==$UV_VERSION"
  uv=$tools/bin/uv
fi
# Where torch's CPU build is found: pip's configured find-links when it holds one (a machine that keeps the wheel
# on disk), else PyTorch's CPU index; TORCH_CPU_FIND_LINKS overrides both.
cpu_links=${TORCH_CPU_FIND_LINKS:-}
if [ -z "$cpu_links" ]; then
  for dir in $(python3 -m pip config get global.find-links 2>/dev/null || true); do
    compgen -G "$dir/torch-*+cpu-*.whl" >/dev/null && cpu_links=$dir && break
  done
fi
cpu_links=${cpu_links:-$TORCH_CPU_LINKS}
for variant in cpu cuda; do
  python=$(lock_python "$variant")
  links=(); [ "$variant" = cpu ] && links=(--find-links "$cpu_links")
  "$uv" pip compile pyproject.toml "requirements/$variant.in" --extra test --python-version "$python" \
    --python-platform x86_64-manylinux_2_28 "${links[@]}" --generate-hashes --upgrade --quiet \
    --custom-compile-command "bash scripts/lock.sh  (CPython $python, x86_64 Linux)" -o "requirements/$variant.txt"
done
grep -cE '^[A-Za-z0-9_.-]+==' requirements/cpu.txt requirements/cuda.txt
