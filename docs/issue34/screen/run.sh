#!/bin/bash
# issue 34 screen: GRPO vs DF (default options) with each oracle-free repairer, 3 seeds, lr 3e-5 (the
# previous study's val choice for every arm on this start and task). One job at a time.
set -e
cd "$(dirname "$0")/../../.."  # the repository root
source .venv/bin/activate
python -m studies.experiment --out runs/study34/times34 --sft data/policies/regime_start \
  --task '{"ops": "+-*", "min_reads": 3, "max_reads": 4}' --rounds 8 --lrs 3e-5 --seeds 3 \
  --eval-every 2 --avg-last 2 --val-n 500 --eval-n 1000 --repaired-weight 1 --fail-advantage 1 \
  --repairer sibling-resample --jobs 1 --threads 2
python -m studies.options_screen --setting runs/study34/times34 --variants resample,oracle,sibling --seeds 3 --threads 2
