# Sourced by the scripts that install or make the locks (bootstrap.sh, fresh_resolve.sh, lock.sh, gpu_bundle.sh):
# which lock fits this machine, and what a lock says. Run from the repository root.

# PyTorch's CPU builds are not on the registry; this flat index holds them.
TORCH_CPU_LINKS=https://download.pytorch.org/whl/cpu/torch/

lock_variant() {  # cuda where a GPU answers nvidia-smi, else cpu; GPT2SERVE_LOCK=cpu|cuda chooses
  local variant=cpu
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then variant=cuda; fi
  echo "${GPT2SERVE_LOCK:-$variant}"
}

lock_python() {  # lock_python VARIANT: the CPython version requirements/VARIANT.txt is locked for
  sed -n 's/^# python: *//p' "requirements/$1.in"
}

lock_torch() {  # lock_torch VARIANT: the torch version requirements/VARIANT.txt pins (2.13.0+cpu, say)
  sed -n 's/^torch==\([^ ]*\).*/\1/p' "requirements/$1.txt"
}
