#!/usr/bin/env bash
# Pack what the offline GPU host lacks, at the versions requirements/cuda.txt locks, into one archive:
#   bash scripts/gpu_bundle.sh .gpubundle          (here, where the registry is reachable; .gpubundle is git-ignored)
# and on the GPU host (carry .gpubundle; the command starts in the repository's root):
#   source scripts/gpu_install.sh .gpubundle
#
# The host's image has CPython 3.12 with torch 2.11 (CUDA 13.0) and triton 3.6.0, the versions cuda.txt pins, and
# a few large packages that are left to it (IMAGE below) because one call carries 64 MiB at most. Everything else in
# the lock (Ray Serve, FastAPI, pydantic, Locust, transformers, tokenizers, peft, ...) travels, unpacked for
# CPython 3.12 on x86_64 Linux and compressed, so the GPU runs use the lock's versions of them.
set -euo pipefail
out=${1:?usage: gpu_bundle.sh OUTDIR}
cd "$(dirname "$0")/.."
source scripts/lock_lib.sh
lock=requirements/cuda.txt
# Left to the image: the CUDA stack (several GB) and large packages it already has.
IMAGE='torch|triton|nvidia-.*|cuda-.*|numpy|sympy|mpmath|networkx|pillow|matplotlib|contourpy|fonttools|kiwisolver'
IMAGE+='|uvloop|pygments|hypothesis|setuptools'
# Not used on a GPU host: the browser test's driver (no browser there), Ray's virtualenv runtime environments, TLS,
# hub downloads (no network there), and the CPU-side clients of the tests and dashboards
# (openai, grafana-client and its HTTP stack).
UNUSED='selenium|trio|trio-websocket|outcome|wsproto|pysocks|virtualenv|distlib|python-discovery|platformdirs'
UNUSED+='|cryptography|cffi|pycparser|hf-xet|openai|jiter|grafana-client|grafana-foundation-sdk'
UNUSED+='|niquests|urllib3-future|qh3|jh2|wassima|verlib2'
python=$(lock_python cuda)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The lock's entries (name==version and its hashes) except those two groups.
awk -v skip="^($IMAGE|$UNUSED)\$" '
  /^[A-Za-z0-9]/ { split($1, nv, "=="); name = tolower(nv[1]); keep = (name !~ skip) }
  /^[A-Za-z0-9]/ || /^ +--hash/ { if (keep) print }' "$lock" > "$work/carry.txt"
python3 -m pip install -q --disable-pip-version-check --no-deps --require-hashes --no-compile \
  --only-binary=:all: --python-version "$python" --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --target "$work/site" -r "$work/carry.txt"
# Ray's parts a serving host never imports: Java jars, RLlib, Tune, Train; console scripts made for this machine
# (gpu_install.sh writes its own), but py-spy's native binary (benchmarks/profile_service.py runs it).
rm -rf "$work/site/ray/jars" "$work/site/ray/rllib" "$work/site/ray/tune" "$work/site/ray/train" \
       "$work/site/ray/air/examples"
find "$work/site/bin" -type f ! -name py-spy -delete
# Debug symbols are a third of the binaries (Ray's raylet and GCS server, grpc, ...) and nothing here reads them.
find "$work/site" -type f \( -name '*.so*' -o -path '*/ray/core/src/*' \) -exec file {} + |
  awk -F: '/ELF.*not stripped/ {print $1}' | xargs -r strip --strip-debug
mkdir -p "$out"
tar -C "$work/site" -cf - . | xz -T0 -9 > "$out/site.tar.xz"
echo "bundle: $(grep -cE '^[A-Za-z0-9]' "$work/carry.txt") packages of $lock," \
     "$(du -h "$out/site.tar.xz" | cut -f1) in $out/site.tar.xz"
