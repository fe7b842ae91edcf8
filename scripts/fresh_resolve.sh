#!/usr/bin/env bash
# Try the newest versions that pyproject.toml's ranges allow, on purpose, before the registry moves them under a
# newcomer: a scratch venv, a fresh resolve of this package and its `test` extra, then the tests.
#   bash scripts/fresh_resolve.sh                 # the README's full test command
#   bash scripts/fresh_resolve.sh -m "not ray"    # any pytest arguments instead
# torch stays at the lock's build (PyTorch's CPU build is not on the registry; TORCH_SPEC="torch==X" overrides).
# It prints every version that differs from the lock, then runs pytest in the scratch venv and exits with its
# status. If the tests pass, `bash scripts/lock.sh` takes these versions into the lock; if not, fix the code or
# bound the range in pyproject.toml, and say which release broke what.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lock_lib.sh
variant=$(lock_variant)
lock=requirements/$variant.txt
venv=${FRESH_VENV:-$(mktemp -d "${TMPDIR:-/tmp}/gpt2serve-fresh.XXXXXX")/venv}
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
torch_spec=${TORCH_SPEC:-torch==$(lock_torch "$variant")}
"${pip[@]}" "$torch_spec" 2>/dev/null || "${pip[@]}" "$torch_spec" --find-links "$TORCH_CPU_LINKS"
echo "$torch_spec" > "$venv/torch-constraint.txt"  # the eager upgrade below must not replace it
"${pip[@]}" --upgrade --upgrade-strategy eager -c "$venv/torch-constraint.txt" setuptools -e ".[test]"
echo "fresh resolve in $venv; versions that differ from $lock:"
"$venv/bin/python" - "$lock" <<'EOF'
import re, sys
from importlib import metadata
from packaging.utils import canonicalize_name

pins = {canonicalize_name(name): version
        for name, version in re.findall(r"^([A-Za-z0-9_.-]+)==([^ \\]+)", open(sys.argv[1]).read(), re.M)}
installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
moved = [(n, pins.get(n, "-"), installed.get(n, "-")) for n in sorted(set(pins) | set(installed))
         if pins.get(n) != installed.get(n) and n not in ("pip", "gpt2-serve")]
for name, old, new in moved:
    print(f"  {name}: {old} -> {new}")
print(f"  ({len(moved)} of {len(pins)} locked packages moved, added or dropped)")
EOF
exec "$venv/bin/python" -m pytest -q "$@"
