#!/usr/bin/env bash
# One-time set-up (idempotent): a virtual environment in .venv with elmctl and its test tools.
# Takes the CPU build of PyTorch where no NVIDIA GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" "torch>=2.4"                       # CUDA build
  else
    # CPU build: a local wheel where the machine has one, else PyTorch's CPU index.
    "${PIP[@]}" torch==2.13.0 2>/dev/null \
      || "${PIP[@]}" torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"${PIP[@]}" -e ".[dev]"
# Byte-compile once so the CLI starts fast even where PYTHONDONTWRITEBYTECODE is set.
.venv/bin/python -m compileall -q elmctl >/dev/null
