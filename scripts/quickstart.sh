#!/usr/bin/env bash
# One command for a newcomer: set up ./.venv ($HF_KOOPMAN_VENV if set), then profile GPT-2 (124M) at initialisation
# from its embedded config.
# No network is needed beyond the package registry; the report lands in ./hf_koopman_out/gpt2-init/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
"${HF_KOOPMAN_VENV:-.venv}/bin/hf-koopman" profile gpt2 --init --out hf_koopman_out/gpt2-init "$@"
