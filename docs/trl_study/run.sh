#!/bin/bash
# Issue "DF in TRL and verl, at full strength", item 5: stock TRL GRPOTrainer vs DFGRPOTrainer (DFConfig(), the
# oracle repairer) on the shipped research-regime start and its times task, 8 paired seeds (the first 3 were the
# issue's ask; runs/trl_study/results_3seeds.json kept them). About 7-8 minutes a seed pair on 2 cores; resumable.
set -e
cd "$(dirname "$0")/../.."  # the repository root
.venv/bin/python -m studies.trl_study --out runs/trl_study --seeds 8
mkdir -p docs/trl_study/runs
cp runs/trl_study/results.json docs/trl_study/results.json; cp runs/trl_study/results_3seeds.json docs/trl_study/ 2>/dev/null || true
for d in runs/trl_study/runs/*/seed*; do
  mkdir -p docs/trl_study/runs/${d#runs/trl_study/runs/} && cp $d/result.json docs/trl_study/runs/${d#runs/trl_study/runs/}/
done
