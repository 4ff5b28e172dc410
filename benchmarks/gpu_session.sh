#!/usr/bin/env bash
# The whole GPU check of docs/benchmarks.md in one device call.
#
# Here (a machine with pip access), once per checkout:   bash benchmarks/gpu_session.sh fetch
#   downloads the wheels the device image lacks (pydantic and its needs, for its Python 3.12) into .whl/
#   (add `/.whl/` to .git/info/exclude so it travels only when carried).
# On the device machine (device tool, carry [".whl"], timeout_s 560):   bash benchmarks/gpu_session.sh run
#   installs them under /tmp/site, then runs benchmarks/gpu_check.py with its results under $OUT.
set -euo pipefail
case "${1:-run}" in
  fetch)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
      pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.15.0
    ls .whl ;;
  run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD/src" PYTHONUNBUFFERED=1 MPLCONFIGDIR=/tmp/mpl
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.is_available())"
    python3 -c "import eigenprune.experiments.runner, eigenprune.batched.fused"  # fail fast (a missing package) before any GPU work
    python3 benchmarks/gpu_check.py --out "$OUT" --budget-s "${BUDGET_S:-420}" 2>&1 | tee "$OUT/log.txt" ;;
  *) echo "usage: bash benchmarks/gpu_session.sh fetch|run" >&2; exit 2 ;;
esac
