#!/usr/bin/env bash
# Run a local Prometheus (the Debian package's binary) that scrapes the service and Ray's metrics endpoint.
#
#   bash scripts/prometheus.sh --service 127.0.0.1:8000 --ray 127.0.0.1:8080 [--listen 127.0.0.1:9090]
#                              [--data DIR] [--interval 5s]
#
# --service: the Serve HTTP address whose /metrics the ingress serves (gpt2serve:* names).
# --ray:     Ray's metrics export port on each node (ray_gpt2serve_* names, and Ray's own ray_* metrics);
#            several nodes: repeat --ray. Either may be left out.
# Runs in the foreground (exec): stop it with SIGTERM / Ctrl-C. Install: apt-get install -y --no-install-recommends prometheus
set -euo pipefail

service=() ray=() listen=127.0.0.1:9090 data="" interval=5s
while [ $# -gt 0 ]; do
  case "$1" in
    --service) service+=("$2"); shift 2 ;;
    --ray) ray+=("$2"); shift 2 ;;
    --listen) listen="$2"; shift 2 ;;
    --data) data="$2"; shift 2 ;;
    --interval) interval="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
bin=$(command -v prometheus || true)
if [ -z "$bin" ]; then
  echo "prometheus is not installed: apt-get install -y --no-install-recommends prometheus" >&2
  exit 3
fi
[ -n "$data" ] || data=$(mktemp -d -t prometheus-gpt2serve-XXXXXX)
mkdir -p "$data"

targets() { local first=1; printf '['; for t in "$@"; do [ $first = 1 ] || printf ', '; printf "'%s'" "$t"; first=0; done; printf ']'; }
{
  echo "global:"
  echo "  scrape_interval: $interval"
  echo "  evaluation_interval: $interval"
  echo "scrape_configs:"
  if [ ${#service[@]} -gt 0 ]; then
    echo "  - job_name: gpt2serve"
    echo "    metrics_path: /metrics"
    echo "    static_configs: [{targets: $(targets "${service[@]}")}]"
  fi
  if [ ${#ray[@]} -gt 0 ]; then
    echo "  - job_name: ray"
    echo "    static_configs: [{targets: $(targets "${ray[@]}")}]"
  fi
} > "$data/prometheus.yml"
echo "prometheus: config $data/prometheus.yml, UI and API on http://$listen" >&2
exec "$bin" --config.file="$data/prometheus.yml" --storage.tsdb.path="$data/tsdb" \
  --web.listen-address="$listen" --log.level=warn
