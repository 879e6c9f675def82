#!/usr/bin/env bash
# The peers of bench/extract.py in their own venv (never the project's): mergekit 0.1.5
# (mergekit-extract-lora) and lycoris-lora, over the same torch pin as the project's dev set-up.
#   bash bench/peers/setup.sh [VENV=/tmp/peer-venv] [TORCH_WHEEL_OR_SPEC=torch==2.13.0]
set -euo pipefail
venv="${1:-/tmp/peer-venv}"
torch_spec="${2:-torch==2.13.0}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q "$torch_spec"
"$venv/bin/pip" install -q "mergekit==0.1.5" "lycoris-lora==4.1.3"
"$venv/bin/python" -c "import mergekit, lycoris, torch; print('peers ready:', torch.__version__)"
