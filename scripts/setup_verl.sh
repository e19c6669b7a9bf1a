#!/usr/bin/env bash
# Create ./.venv-verl: real verl (0.9.1) with its declared requirements, plus this project.
#
# Kept apart from ./.venv because verl 0.9.1 pins transformers <5.11 and this project needs
# >=5.16. The DF estimator (dftrain/integrations/verl.py) needs only torch, numpy, rapidfuzz and
# verl's core_algos, so the project is installed here with --no-deps.
#   1. python3.11 -m venv .venv-verl
#   2. torch==2.13.0 FIRST (the CPU wheel here), then verl==0.9.1 with torch pinned again, so its
#      resolver cannot swap torch for a CUDA build.
#   3. the project (editable, --no-deps), rapidfuzz, pytest; an import smoke test; the versions.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3.11}
VENV=${VERL_VENV:-.venv-verl}
STAMP=$VENV/.installed
[ -f "$STAMP" ] && exit 0
[ -x "$VENV/bin/python" ] || $PY -m venv "$VENV"
PIP="$VENV/bin/pip install -q --disable-pip-version-check"
$PIP "torch==2.13.0"
$PIP "verl==0.9.1" "torch==2.13.0"
$PIP --no-deps -e .
$PIP "rapidfuzz>=3" "pytest>=8"
# verl 0.9.1 imports these in ray_trainer (its rollout server) without declaring them; the hook test imports it
$PIP cachetools fastapi uvicorn
"$VENV/bin/python" -c "import verl.trainer.ppo.core_algos, verl.trainer.ppo.ray_trainer, dftrain.integrations.verl" 
"$VENV/bin/python" -c "import torch, transformers, verl; print('verl', verl.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
touch "$STAMP"
