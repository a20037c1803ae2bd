#!/usr/bin/env bash
# The GPU check, for the day a CUDA machine is lent (the `device` tool runs it there). Under 5 minutes:
#   1. the gpu-marked tests: Triton kernels against their references, verify rows against 1-row decode steps
#      on CUDA (with the logit gap of any divergence), lossless greedy speculation on CUDA;
#   2. benchmarks/bench_kernels.py --quick: the kernels timed against their references and SDPA.
# It installs nothing (that machine may have no network): it needs a python with torch (CUDA), triton,
# transformers, safetensors, gguf and pytest, and runs the tree in place through a symlinked package.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: $PY has no torch with a CUDA device; nothing to check" >&2
  exit 2
fi
missing=$("$PY" -c "
import importlib.util as u
print(' '.join(m for m in ('triton', 'transformers', 'safetensors', 'gguf', 'pytest') if u.find_spec(m) is None))")
if [ -n "$missing" ]; then
  echo "gpu_check: missing python packages: $missing" >&2
  exit 2
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/specedit"  # specedit = engine/, specedit.kernels = kernels/, as pyproject.toml maps them
for f in engine/*; do ln -s "$PWD/$f" "$tmp/specedit/"; done
ln -s "$PWD/kernels" "$tmp/specedit/kernels"
export PYTHONPATH="$tmp:$PWD/tests:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
status=0
timeout 200 "$PY" -m pytest -q -rA -s -m gpu tests -p no:cacheprovider || status=$?
timeout 80 "$PY" benchmarks/bench_kernels.py --quick || status=$?
exit $status
