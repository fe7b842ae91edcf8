#!/usr/bin/env bash
# The serving side by side (issue 20) on the lent GPU machine, as back-to-back commands on one warm machine
# (each command carries at most 64 MiB, so the peer's three parts and our bundle travel in separate commands):
#   1. carry .vl1:        bash benchmarks/serving_job.sh peer-part
#   2. carry .vl2:        bash benchmarks/serving_job.sh peer-part
#   3. carry .gpubundle:  bash benchmarks/serving_job.sh install
#   4. carry .vl3:        bash benchmarks/serving_job.sh peer       (vLLM's OpenAI server: W4 levels, Locust 100)
#   5. (nothing):         COMMIT=<sha> bash benchmarks/serving_job.sh ours   (ours as shipped, behind Serve's proxy,
#                         in process; COMMIT names what was measured: the host's copy of .git may be stale)
# then here: python -m gpt2serve.benchmarks.serving_compare report --out-dir <the two runs' files, together>
# .vl1-.vl3 come from ../shared/peer/vllm_bundle.sh, .gpubundle from scripts/gpu_bundle.sh.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
ours_env() {  # our bundle, unpacked by `install` into /tmp/ours, importing this checkout as gpt2serve
  ln -sfn "$PWD" /tmp/ours/gpt2serve
  export PYTHONPATH=/tmp/ours PATH=/tmp/ours/bin:$PATH PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
}
level_s=${LEVEL_S:-16} locust_s=${LOCUST_S:-24}
case $1 in
peer-part) mkdir -p /tmp/vl && cp .vl*/part.* /tmp/vl/ && ls -la /tmp/vl ;;
install) GPT2SERVE_SITE=/tmp/ours source scripts/gpu_install.sh .gpubundle
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader ;;
peer)
  bash .vl3/run_peer.sh serve
  ( ours_env; python3 -m gpt2serve.benchmarks.serving_compare peer --url http://127.0.0.1:8100 --out-dir "$OUT" \
      --level-s "$level_s" --locust-s "$locust_s" )
  kill "$(cat /tmp/vllm_serve.pid)"; sleep 5
  tail -3 "$OUT/vllm_serve.log" ;;
ours)
  ours_env
  [ -d /tmp/xl ] || python3 -m gpt2serve.engine make-dummy-model /tmp/xl --like gpt2-xl > /dev/null
  python3 -m gpt2serve.benchmarks.serving_compare ours --config configs/gpt2xl.yaml --model /tmp/xl \
    --load-format dummy --out-dir "$OUT" --level-s "$level_s" --locust-s "$locust_s" ${COMMIT:+--commit "$COMMIT"}
  for f in "$OUT"/serve_*.log; do grep -E "Traceback|Error" "$f" | head -5; done ;;
gil)  # ours as shipped with the worker's GIL switch interval set (GIL_S), W4 at 10 and 100 streams, and in process
  ours_env
  [ -d /tmp/xl ] || python3 -m gpt2serve.engine make-dummy-model /tmp/xl --like gpt2-xl > /dev/null
  python3 -c "import yaml, sys; d = yaml.safe_load(open('configs/gpt2xl.yaml')); \
d['applications'][0]['args']['worker_gil_switch_interval_s'] = float(sys.argv[1]); \
yaml.safe_dump(d, open('/tmp/gpt2xl_gil.yaml', 'w'), sort_keys=False)" "${GIL_S:-0.0005}"
  python3 -m gpt2serve.benchmarks.serving_compare ours --config /tmp/gpt2xl_gil.yaml --model /tmp/xl \
    --load-format dummy --out-dir "$OUT" --levels 10,100 --level-s "$level_s" --locust-s 0 --skip-proxy \
    ${COMMIT:+--commit "$COMMIT"} ;;
esac
