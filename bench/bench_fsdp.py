"""Per-rank memory of ``dftrain fit``'s data parallelism: DDP replicas against ``--fsdp`` (FSDP2)
shards, 2 CPU processes (torchrun, gloo), one run.

Each mode loads the realistic-shape policy of ``bench.bench_scale`` (~25M parameters; ``--hidden``
and ``--layers`` make it larger) as fit does (``Parallel.load_policy``: under FSDP rank 0 alone reads
the checkpoint, the other ranks build it on the meta device), freezes the vision tower, wraps the
model as fit does (``Parallel.wrap``: FSDP shards it and fills the shards from rank 0), and takes
one AdamW step on a small batch of the realistic rows, so gradients and both Adam moments exist.
Each rank then reports the bytes it holds of parameters, gradients and optimizer state (a sharded
tensor counts its local shard only), its peak RSS once the model is loaded and wrapped, and its
peak RSS at the end. The target: FSDP's parameter + gradient + optimizer bytes per rank about
1/world of DDP's. Peak RSS also holds the Python runtime, torch, transformers and activations,
which sharding does not divide.

Run: python -m bench.bench_fsdp [--hidden 1024 --layers 12] [--json out.json]
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench._env import machine, versions


def _local_bytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def rank_main(mode: str, policy: Path, out: Path) -> None:
    import torch

    from bench.bench_scale import make_rows
    from dfgen.models import vision_parameters
    from dfgen.policy import suppress_ids
    from dftrain.batch import Batch
    from dftrain.fit import FitConfig, micro_loss
    from dftrain.parallel import Parallel

    torch.set_num_threads(1)
    par = Parallel.start(fsdp=mode == "fsdp")
    model, processor = par.load_policy(policy)
    for q in vision_parameters(model):
        q.requires_grad_(False)
    module = par.wrap(model)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    cfg = FitConfig(data=".", model=".", out=".", objective="grpo")
    rows = make_rows(processor, 1, seed=par.rank)[:2]
    for r in rows:  # a short step: the memory of interest is the weights', not the activations'
        r.token_ids, r.logprobs = r.token_ids[:32], r.logprobs[:32]
    batch = Batch.from_rows(rows, cfg)
    loss, _ = micro_loss(module, batch, cfg, processor, suppress_ids(processor.tokenizer), 1.0)
    (loss * par.loss_scale).backward()
    opt.step()
    held = {"params": sum(_local_bytes(p) for p in model.parameters()),
            "trainable_params": sum(_local_bytes(p) for p in params),
            "grads": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(_local_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v))}
    mine = {"rank": par.rank, "mib": {k: round(v / 2**20, 2) for k, v in held.items()},
            "params_grads_optimizer_mib": round((held["params"] + held["grads"] + held["optimizer"]) / 2**20, 2),
            "peak_rss_loaded_mib": round(rss_loaded, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    every = [None] * par.world
    torch.distributed.all_gather_object(every, mine)
    if par.main:
        out.write_text(json.dumps({"mode": mode, "world": par.world, "ranks": every}))
    par.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--mode", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)
    ap.add_argument("--policy", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.mode:
        rank_main(args.mode, args.policy, args.out)
        return
    from bench.bench_scale import make_policy

    d = Path(tempfile.mkdtemp())
    policy = make_policy(d / "policy", args.hidden, args.layers)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    res = {"machine": machine(), "versions": versions(), "hidden": args.hidden, "layers": args.layers, "modes": {}}
    for k, mode in enumerate(("ddp", "fsdp")):
        out = d / f"{mode}.json"
        subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(29650 + k), "-m", "bench.bench_fsdp",
                        "--mode", mode, "--policy", str(policy), "--out", str(out)], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        res["modes"][mode] = json.loads(out.read_text())
        print(json.dumps(res["modes"][mode]), flush=True)
    per = {m: max(r["params_grads_optimizer_mib"] for r in res["modes"][m]["ranks"]) for m in ("ddp", "fsdp")}
    rss = {m: max(r["peak_rss_mib"] for r in res["modes"][m]["ranks"]) for m in ("ddp", "fsdp")}
    res["ratios"] = {"fsdp_over_ddp_params_grads_optimizer_per_rank": round(per["fsdp"] / per["ddp"], 3),
                     "fsdp_over_ddp_peak_rss_per_rank": round(rss["fsdp"] / rss["ddp"], 3)}
    for key in ("peak_rss_loaded_mib", "peak_rss_mib"):  # rank 0 reads the checkpoint; the others do not
        for r in range(2):
            res["ratios"][f"fsdp_over_ddp_{key.removesuffix('_mib')}_rank{r}"] = round(
                res["modes"]["fsdp"]["ranks"][r][key] / res["modes"]["ddp"]["ranks"][r][key], 3)
    print(json.dumps(res["ratios"], indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
