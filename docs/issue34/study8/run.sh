#!/bin/bash
# issue 34, the 8-seed study: GRPO vs DF (default options) with the oracle-free repairer the 3-seed screen
# ranked first on val (resample), (a) at the same rollouts and (b) against GRPO-tok, which samples what each
# DF seed generated (probes included). The oracle runs beside it as the ceiling. lr 3e-5 for every arm: the
# previous study's val choice on this start and task (not re-screened here). One job at a time; resumable.
set -e
cd "$(dirname "$0")/../../.."  # the repository root
source .venv/bin/activate
OUT=runs/study34/resample8 SCREEN=runs/study34/times34
if [ -d $SCREEN ] && [ ! -d $OUT ]; then  # the screen's finished runs of the same settings, reused (hard links)
  mkdir -p $OUT/grpo $OUT/df-grpo $OUT/options/oracle
  cp -al $SCREEN/val $SCREEN/test $OUT/
  cp -al $SCREEN/grpo/lr3e-05 $OUT/grpo/
  cp -al $SCREEN/options/resample/lr3e-05 $OUT/df-grpo/
  cp -al $SCREEN/options/oracle/lr3e-05 $OUT/options/oracle/
fi
python -m studies.experiment --out $OUT --sft data/policies/regime_start \
  --task '{"ops": "+-*", "min_reads": 3, "max_reads": 4}' --rounds 8 --lrs 3e-5 --seeds 8 --screen-seeds 3 \
  --eval-every 2 --avg-last 2 --val-n 500 --eval-n 1000 --repaired-weight 1 --fail-advantage 1 \
  --repairer resample --token-matched --jobs 1 --threads 2
python -m studies.options_screen --setting $OUT --variants oracle --seeds 8 --threads 2
