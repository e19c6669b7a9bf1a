"""Ray's overhead for `dfgen sample`: 2 workers as Ray tasks on a local instance vs the same 2
workers started by hand as two processes, same prompts, same model, same output rows, one run.

On a 2-core machine neither can be faster than the other (both use the two cores); the ratio says
what scheduling through Ray costs (starting its worker processes, importing the stage there).

Run: python -m bench.bench_ray [--prompts 64] [--json out.json]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._env import machine, versions


def sample_args(d: Path, out: Path, n: int) -> list[str]:
    return ["-m", "dfgen.cli", "sample", "--prompts", str(d / "train"), "--model", str(d / "tiny"), "--out", str(out),
            "--group-size", "4", "--limit", str(n), "--chunk-size", "8", "--num-workers", "2", "--seed", "0"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    import ray

    from dfgen.tiny import build_tiny
    from dfgen.synth.grid import write_synth

    d = Path(tempfile.mkdtemp())
    write_synth(d / "train", a.prompts, seed=0)
    build_tiny(d / "tiny")
    ctx = ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    addr = ctx.address_info["gcs_address"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    hand, on_ray = [], []
    for rep in range(a.reps):
        t = time.time()
        procs = [subprocess.Popen([sys.executable, *sample_args(d, d / f"hand{rep}", a.prompts), "--worker-index", str(i)],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in (0, 1)]
        assert all(p.wait() == 0 for p in procs)
        hand.append(time.time() - t)
        t = time.time()
        subprocess.run([sys.executable, *sample_args(d, d / f"ray{rep}", a.prompts), "--ray", addr], env=env,
                       check=True, capture_output=True)
        on_ray.append(time.time() - t)
    ray.shutdown()
    res = {"machine": machine(), "versions": versions(), "prompts": a.prompts, "group_size": 4,
           "hand_wall_s": [round(x, 2) for x in hand], "ray_wall_s": [round(x, 2) for x in on_ray],
           "ray_over_hand": round(min(on_ray) / min(hand), 3)}
    print(json.dumps(res, indent=2))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
