#!/usr/bin/env bash
# One scaled-up run of the experiment on a lent GPU machine (16 CPU cores + 1 GPU), ~9 minutes.
#   1. SFT candidates on the GPU (the tiny 0.77M and the ~5M policy, long schedules), each
#      scored on the val split with studies/error_profile.py (val only: test is never looked at);
#   2. studies/experiment.py from the best candidate: the arms x lr x seed grid as CPU processes
#      (1 thread each), cut at a time limit, summarized over the evaluations all runs reached.
# Needs the rapidfuzz wheel in .whl/ (see docs/RESULTS.md); results land in $OUT.
# Usage (device tool): bash studies/device_run.sh  [EXPERIMENT_SECONDS]
set -u
START=$(date +%s)
PY=${PY:-python3}
T=${1:-530}  # seconds from the start of this script to the end of the experiment phase
SFT_STEPS=${SFT_STEPS:-2500} SFT_DEVICE=${SFT_DEVICE:-cuda} JOBS=${JOBS:-16} NTRAIN=${NTRAIN:-20000}
export SFT_STEPS SFT_DEVICE NTRAIN
if [ -d .whl ] && [ -z "${SKIP_WHL:-}" ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1; fi
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
E=runs/dev
OUT=${OUT:-runs/dev_out}
mkdir -p $OUT
mkdir -p $E
{ nproc; nvidia-smi -L 2>/dev/null; $PY -c "import torch, transformers; print(torch.__version__, transformers.__version__)"; } | tee $OUT/machine.txt
timeout ${SFT_LIMIT:-270} $PY - <<'EOF' 2>&1 | tee $OUT/sft.log
import json, os, time
from concurrent.futures import ProcessPoolExecutor

def sft(spec):
    import torch
    torch.set_num_threads(2)
    from dfgen.policy import build_tiny
    from dftrain.sft import SFTConfig, run_sft
    name, hidden, layers, steps, lr = spec
    out = f"runs/dev/{name}"
    build_tiny(f"runs/dev/init_{name}", hidden=hidden, layers=layers)
    t = time.time()
    r = run_sft(SFTConfig(data="runs/dev/train", model=f"runs/dev/init_{name}", out=out, steps=steps, lr=lr, batch_size=32,
                          device=os.environ["SFT_DEVICE"]))
    return name, r["final_loss"], round(time.time() - t, 1)

from dfgen.synth.grid import write_synth
write_synth("runs/dev/train", int(os.environ["NTRAIN"]), seed=0, split="train")
write_synth("runs/dev/val", 500, seed=0, split="val")
n = int(os.environ["SFT_STEPS"])
specs = [("sft_h128_l2", 128, 2, n, 3e-3), ("sft_h256_l4", 256, 4, n, 1e-3), ("sft_h256_l4_lr2e-3", 256, 4, n, 2e-3)]
with ProcessPoolExecutor(3) as ex:
    for name, loss, sec in ex.map(sft, specs):
        print(f"{name}: final loss {loss} in {sec}s", flush=True)
EOF
$PY -m studies.error_profile runs/dev/sft_h* --data runs/dev/val --n 500 2>&1 | grep '^{' | tee $OUT/profiles.jsonl
BEST=$($PY -c "
import json; rows=[json.loads(l) for l in open('$OUT/profiles.jsonl')]
print(max(rows, key=lambda r: r['accuracy'] - r['lucky'])['model'])")
T=$(( T - ($(date +%s) - START) ))
echo "experiment starts from $BEST, ${T}s left for it" | tee -a $OUT/sft.log
CUDA_VISIBLE_DEVICES= timeout $T $PY -m studies.experiment --out $E/exp --sft $BEST --jobs $JOBS --threads 1 \
  --seeds 4 --lrs 3e-5,1e-4 --rounds 10 --eval-every 2 --avg-last 2 --eval-n 1000 --val-n 500 ${EXTRA:-} > $OUT/experiment.log 2>&1
CUDA_VISIBLE_DEVICES= $PY -m studies.experiment --out $E/exp --sft $BEST --seeds 4 --lrs 3e-5,1e-4 --rounds 10 \
  --eval-every 2 --avg-last 2 --eval-n 1000 --val-n 500 ${EXTRA:-} --summarize-only >> $OUT/experiment.log 2>&1
cp $E/exp/results.json $E/exp/curves.png $OUT/ 2>/dev/null
tar czf $OUT/runs.tgz $(find $E -name loop.json -o -name log.txt -o -name sft_metrics.json -o -name round.json) 2>/dev/null
tail -40 $OUT/experiment.log
