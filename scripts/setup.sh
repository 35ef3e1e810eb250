#!/usr/bin/env bash
# Create ./.venv and install hf_koopman with its test, bench and docs extras (the tests build the docs site with
# `mkdocs build --strict`). Offline-safe apart from the package registry.
# torch is pinned first. Where pip's configuration offers the CPU wheel (as on our CI machines) that wheel is taken;
# elsewhere set HF_KOOPMAN_TORCH_INDEX=https://download.pytorch.org/whl/cpu so that no multi-GB CUDA build is pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${HF_KOOPMAN_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0" ${HF_KOOPMAN_TORCH_INDEX:+--index-url "$HF_KOOPMAN_TORCH_INDEX"}
"$VENV/bin/python" -m pip install --quiet -e ".[test,bench,docs]"
echo "hf_koopman installed in $VENV"
