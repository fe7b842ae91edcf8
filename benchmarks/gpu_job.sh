#!/usr/bin/env bash
# One GPU job phase on the lent machine (see benchmarks/README.md). Usage: bash benchmarks/gpu_job.sh PHASE COMMIT
#   check:   GPU tests, kernel micro-benchmarks, fp16 agreement, and the PyTorch-reference engine on W1/W3
#   offline: W1-W3 of ours (Triton + CUDA graphs) beside the HF baselines, in one process
#   prefix:  cascade-attention tests and kernel figures, host overhead per step, W5 (prefix caching on and off)
#   install: every GPU-marked test, the packaging checks, and `serve run configs/gpt2.yaml` (dummy weights) answering
#            a text prompt with text, all through the bundle's import name (docs/installing.md)
#   service-profile: W4 through the service behind Serve's proxy and behind HAProxy, each process profiled
#            (benchmarks/profile_service.py), GPT-2 XL with dummy weights and a trained tokenizer
# Results go under $OUT (the device tool brings that folder back).
set -uo pipefail
phase=$1 commit=${2:-unknown}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source scripts/gpu_install.sh .gpubundle > "$OUT/install.log" 2>&1 || { echo "bundle install failed"; tail "$OUT/install.log"; exit 1; }
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case $phase in
check)
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_engine.py tests/kernels 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
  timeout 150 python3 benchmarks/kernels_gpu.py --no-sweep --out "$OUT/kernels.json" 2>&1 | tail -30
  timeout 90 python3 -m gpt2serve.benchmarks.fp16_agreement --out "$OUT/fp16_agreement.json" 2>&1 | tail -5
  timeout 150 python3 -m gpt2serve.benchmarks.offline --workloads W1,W3 --model gpt2-xl --load-format dummy --dtype float16 \
    --device cuda --attention-backend torch --enforce-eager --commit "$commit" \
    --out "$OUT/offline_torch-eager.json" 2>&1 | tail -12
  ;;
offline)
  python3 -m gpt2serve.benchmarks.offline --workloads W1,W2,W3 --model gpt2-xl --load-format dummy --dtype float16 \
    --device cuda --baselines hf-generate,hf-generate_batch,hf-generate-static --baseline-scale 0.25 \
    --baseline-scale W2=0.125 --hf-generate-w3-runs 1 --deadline-s 500 --commit "$commit" \
    --out "$OUT/offline_W1-W3.json" 2>&1 | tee "$OUT/offline_log.txt" | tail -25
  ;;
prefix)
  # Issue 7: prefix caching + cascade attention. W5 with vLLM's batch limits (16,384 batched tokens; 512 sequences,
  # enough for all of W5 at once), caching on and off in one engine, HF generate beside it.
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_cascade_attention.py tests/test_cascade_runner.py \
    tests/test_gpu_engine.py 2>&1 | tail -8 | tee "$OUT/gpu_tests_prefix.log"
  timeout 120 python3 benchmarks/kernels_gpu.py --no-sweep --out "$OUT/kernels.json" 2>&1 | grep -E "cascade|FAIL" | head -20
  timeout 60 python3 -m gpt2serve.benchmarks.host_overhead --out "$OUT/host_overhead.json" 2>&1 | tail -1
  python3 -m gpt2serve.benchmarks.offline --workloads W5 --model gpt2-xl --load-format dummy --dtype float16 --device cuda \
    --engine-arg max_num_seqs=512 --engine-arg max_num_batched_tokens=16384 --baselines hf-generate \
    --baseline-scale 0.25 --commit "$commit" --out "$OUT/offline_W5.json" 2>&1 | tee "$OUT/offline_W5_log.txt" | tail -8
  ;;
service-profile)
  python3 -m gpt2serve.engine make-dummy-model /tmp/xl --like gpt2-xl > /dev/null
  for ingress in ${INGRESSES:-proxy haproxy direct}; do
    # direct ingress (each replica on its own port) only stands in for HAProxy when HAProxy did not come up
    [ "$ingress" = direct ] && [ -f "$OUT/profile_haproxy.json" ] && continue
    timeout 240 python3 -m gpt2serve.benchmarks.profile_service --config configs/gpt2xl.yaml --load-format dummy \
      --model /tmp/xl --ingress "$ingress" --duration 36 --window 16 --out-dir /tmp/prof 2>&1 | tail -30
    cp /tmp/prof/profile_"$ingress".json /tmp/prof/profile_"$ingress".md "$OUT"/ 2>/dev/null
    tail -5 /tmp/prof/serve_"$ingress".log
  done
  ;;
install)
  timeout 330 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
  timeout 60 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_packaging.py 2>&1 | tail -5 \
    | tee "$OUT/packaging.log"
  python3 -m gpt2serve.engine make-dummy-model /tmp/gpt2-dummy > /dev/null
  export RAY_AUTH_MODE=disabled GPT2SERVE_MODEL=/tmp/gpt2-dummy GPT2SERVE_LOAD_FORMAT=dummy
  set -m; serve run configs/gpt2.yaml > "$OUT/serve.log" 2>&1 & serve_pid=$!
  for _ in $(seq 120); do curl -sf http://127.0.0.1:8000/health | grep -q workers && break; sleep 1; done
  curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
    -d '{"model": "gpt2", "prompt": "Hello", "max_tokens": 16}' | tee "$OUT/curl.json"; echo
  kill -INT -$serve_pid; sleep 15; kill -KILL -$serve_pid 2>/dev/null; true
  ;;
esac
