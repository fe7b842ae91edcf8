# Source on the offline GPU host, from the repository's root, with a bundle made by scripts/gpu_bundle.sh:
#   source scripts/gpu_install.sh .gpubundle
# Unpacks the bundle into $GPT2SERVE_SITE (default /tmp/site), makes this checkout importable as gpt2serve there
# (a link named gpt2serve to the repository root: the package that pyproject.toml maps onto it), writes `ray`,
# `serve` and `locust` commands for the host's python3, and exports PYTHONPATH and PATH for them.
bundle=${1:?usage: source scripts/gpu_install.sh BUNDLE_DIR}
site=${GPT2SERVE_SITE:-/tmp/site}
mkdir -p "$site/bin"
tar -C "$site" -xJf "$bundle/site.tar.xz"
chmod -R a+x "$site/ray/core/src" 2>/dev/null || true
ln -sfn "$PWD" "$site/gpt2serve"
# (read, not `set --`: this file is sourced, and the caller's positional parameters stay its own)
for entry in "ray ray.scripts.scripts main" "serve ray.serve.scripts cli" "locust locust.main main"; do
  read -r command module function <<<"$entry"
  printf '#!/bin/sh\nexec python3 -c "import sys; from %s import %s; sys.argv[0] = \\"%s\\"; sys.exit(%s())" "$@"\n' \
    "$module" "$function" "$command" "$function" > "$site/bin/$command"
  chmod +x "$site/bin/$command"
done
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} PATH=$site/bin:$PATH
echo "gpu_install: $(ls "$site" | wc -l) entries in $site; gpt2serve -> $PWD"
