#!/bin/bash
# issue 34, the 8-seed study of the default oracle-free repairer, sibling-resample (sibling where the group has a
# correct rollout, resample where it has none), with (a) GRPO at the same rollouts and (b) GRPO-tok matched on
# each DF seed's generated tokens. Same protocol and settings as ../study8/run.sh; lr 3e-5. One job at a time;
# resumable. Reuses (hard links) the screen's sibling-resample runs of seeds 0-2 and study8's GRPO runs.
set -e
cd "$(dirname "$0")/../../.."  # the repository root
source .venv/bin/activate
OUT=runs/study34/sibres8 SCREEN=runs/study34/times34 STUDY8=runs/study34/resample8
if [ -d $SCREEN ] && [ -d $STUDY8 ] && [ ! -d $OUT ]; then
  mkdir -p $OUT/grpo $OUT/df-grpo
  cp -al $SCREEN/val $SCREEN/test $OUT/
  cp -al $STUDY8/grpo/lr3e-05 $OUT/grpo/
  cp -al $SCREEN/df-grpo/lr3e-05 $OUT/df-grpo/
fi
python -m studies.experiment --out $OUT --sft data/policies/regime_start \
  --task '{"ops": "+-*", "min_reads": 3, "max_reads": 4}' --rounds 8 --lrs 3e-5 --seeds 8 --screen-seeds 3 \
  --eval-every 2 --avg-last 2 --val-n 500 --eval-n 1000 --repaired-weight 1 --fail-advantage 1 \
  --repairer sibling-resample --token-matched --jobs 1 --threads 2
