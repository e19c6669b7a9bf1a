"""Trainer cost, side by side in one run: GRPO vs DF-GRPO step time for every policy loss
(``--policy-loss``: ppo, gspo, sapo, cispo), tokens/s, peak RSS, and the data loader's throughput
against what the trainer consumes. The DF overhead of a loss is its df-grpo step time over its own
grpo step time, both measured interleaved in this run.

Makes DF shards with the real pipeline (tiny model, a short SFT, sample, oracle repair, mask), then
times ``dftrain.fit`` steps (8 groups x 8 rollouts, 2 updates per batch, as the TRL anchor in
shared/notes) for each objective, interleaved, and streams the shards through ``GroupStream``
alone. Peak RSS of the loader with 1x and 10x the shards is measured in subprocesses.

Run: python -m bench.bench_trainer [--steps 10] [--policy-losses ppo,gspo,sapo,cispo] [--json out.json]
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._env import machine, versions


def _copies(src: Path, dst: Path, copies: int) -> None:
    """``copies`` workers' worth of the one-worker shard set ``src`` in ``dst``: copy k is worker k's
    shards and manifest, its group ids made distinct (readers refuse a group id met twice)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    man = json.loads((src / "_manifest.w000.json").read_text())
    for k in range(copies):
        shards = {}
        for f in sorted(src.glob("part-w000-*.parquet")):
            t = pq.read_table(f)
            ids = pa.array([f"{i}-{k}" for i in t.column("id").to_pylist()])
            name = f.name.replace("part-w000-", f"part-w{k:03d}-")
            pq.write_table(t.set_column(t.schema.get_field_index("id"), "id", ids), dst / name, compression="zstd")
            shards[name] = man["shards"][f.name]
        (dst / f"_manifest.w{k:03d}.json").write_text(json.dumps({**man, "shards": shards}))


def loader_rss(path: Path, copies: int) -> float:
    """Peak memory (MiB) of a fresh process that streams ``copies`` workers' worth of ``path`` (made
    here, outside the measured process) through GroupStream."""
    d = Path(tempfile.mkdtemp())
    _copies(path, d, copies)
    code = f"""
from pathlib import Path
from dfgen.shards import open_shards
from dftrain.data import GroupStream
ss = open_shards(Path({str(d)!r}))
n = ss.num_rows()
s = GroupStream(ss, seed=0, buffer_size=64)
for _ in range(n):
    s.take(1)  # consume without keeping (a trainer keeps one step of groups)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec from the parent
print([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0] / 1024)
"""
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return float(out.strip().splitlines()[-1])


def make_df_shards(d: Path, sft_steps: int = 300, prompts: int = 96) -> None:
    """The real pipeline in miniature under ``d``: synth -> tiny -> SFT (``d/sft``) -> sample 8 per
    prompt (``d/s``) -> oracle repair (``d/r``) -> mask (``d/m``)."""
    from dfgen.mask import MaskConfig, run_mask
    from dfgen.tiny import build_tiny
    from dfgen.repair import RepairConfig, run_repair
    from dfgen.sample import SampleConfig, run_sample
    from dfgen.synth.grid import write_synth
    from dftrain.sft import SFTConfig, run_sft

    write_synth(d / "train", 2000, seed=0)
    build_tiny(d / "tiny")
    run_sft(SFTConfig(data=d / "train", model=d / "tiny", out=d / "sft", steps=sft_steps))
    run_sample(SampleConfig(prompts=d / "train", model=d / "sft", out=d / "s", group_size=8, limit=prompts,
                            chunk_size=16))
    run_repair(RepairConfig(rollouts=d / "s", out=d / "r"))
    run_mask(MaskConfig(repairs=d / "r", out=d / "m"))


def df_cost_direct(d: Path, losses: list, extra: dict, med: dict, reps: int = 30) -> dict:
    """What DF adds to a step, timed directly (the step-time difference above is within this VM's
    step-to-step noise): the objective's loss + backward on the step's ``Batch`` (B, T) tensors, DF's
    (which builds its token weights, ``batch_token_weights``, inside) minus GRPO's, once per update
    (the model's forward and backward are the same computation for both objectives)."""
    import statistics

    import torch

    from dfgen.images import decode_image
    from dfgen.policy import load_policy
    from dfgen.shards import open_shards
    from dftrain.data import GroupStream
    from dftrain.batch import Batch, build_rows
    from dftrain.fit import FitConfig
    from dftrain.loss import LOSSES

    groups = GroupStream(open_shards(d / "m"), seed=0).take(8)
    for g in groups:
        g["_image"] = decode_image(g["image"])
    _, processor = load_policy(d / "sft")

    def timed(f):
        out = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            out.append(time.perf_counter() - t)
        return statistics.median(out)

    res = {}
    for loss in losses:
        # DF's token weights alone (as BENCHMARKS.md measured): the default repaired samples add ~9% sequences
        cfgs = {obj: FitConfig(data=d / "m", model=d / "sft", out=d / "x", objective=obj, policy_loss=loss,
                               repaired_weight=0.0, fail_advantage=0.0, **extra.get(loss, {})) for obj in ("grpo", "df-grpo")}
        batches = {obj: Batch.from_rows(build_rows(groups, c), c) for obj, c in cfgs.items()}
        t_loss = {}
        for obj, c in cfgs.items():
            b = batches[obj]
            lp = (b.logprobs + 0.01 * torch.randn_like(b.logprobs)).requires_grad_(True)

            def step(b=b, c=c, lp=lp, obj=obj):
                loss_, _ = LOSSES[obj](lp, b, c)  # the df-grpo objective builds its token weights inside
                loss_.backward()
            t_loss[obj] = timed(step)
        extra_s = 2 * (t_loss["df-grpo"] - t_loss["grpo"])  # 2 updates per batch; weights built in each
        res[loss] = {"df_extra_s_per_step": round(extra_s, 5),
                     "df_overhead_direct": round(extra_s / med[loss, "grpo"], 4)}
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--policy-losses", default="ppo,gspo,sapo,cispo", help="comma list; the first is the baseline")
    ap.add_argument("--reps", type=int, default=4, help="fits per (loss, objective), interleaved")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(2)
    from dfgen.shards import open_shards
    from dftrain.data import GroupStream
    from dftrain.fit import FitConfig, run_fit

    d = Path(tempfile.mkdtemp())
    make_df_shards(d)
    losses = [x for x in args.policy_losses.split(",") if x]
    extra = {"cispo": {"clip_high": 4.0}}  # TRL's recommended epsilon_high 5.0
    times = {(loss, obj): [] for loss in losses for obj in ("grpo", "df-grpo")}
    toks = {k: [] for k in times}
    for rep in range(args.reps):
        order = [(loss, obj) for loss in losses for obj in ("grpo", "df-grpo")]
        for loss, obj in (order if rep % 2 == 0 else order[::-1]):  # alternate the order: drift cancels
            out = d / f"fit-{loss}-{obj}-{rep}"
            run_fit(FitConfig(data=d / "m", model=d / "sft", out=out, objective=obj, steps=args.steps,
                              groups_per_step=8, updates_per_batch=2, seed=rep, policy_loss=loss,
                              repaired_weight=0.0, fail_advantage=0.0, **extra.get(loss, {})), log=lambda m: None)
            recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][2:]  # skip warm-up
            times[loss, obj] += [r["step_s"] for r in recs]
            toks[loss, obj] += [r["tok_per_s"] for r in recs]
    med_all = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    direct = df_cost_direct(d, losses, extra, med_all)
    tps_all = {k: sorted(v)[len(v) // 2] for k, v in toks.items()}
    base = losses[0]
    med = {obj: med_all[base, obj] for obj in ("grpo", "df-grpo")}
    tps = {obj: tps_all[base, obj] for obj in ("grpo", "df-grpo")}
    ss = open_shards(d / "m")
    n = ss.num_rows()
    t = time.time()
    GroupStream(ss, seed=0).take(n)
    load_gps = n / (time.time() - t)
    train_gps = 8 / med["df-grpo"]
    res = {"machine": machine(), "versions": versions(), "torch_threads": torch.get_num_threads(),
           "step_s_median": med, "tok_per_s_median": tps,
           "df_overhead": round(med["df-grpo"] / med["grpo"] - 1, 4),
           "policy_loss": base,
           "per_policy_loss": {loss: {"step_s_median": {obj: med_all[loss, obj] for obj in ("grpo", "df-grpo")},
                                      "df_overhead": round(med_all[loss, "df-grpo"] / med_all[loss, "grpo"] - 1, 4),
                                      "vs_ppo_grpo": round(med_all[loss, "grpo"] / med_all[losses[0], "grpo"], 4),
                                      **direct[loss]}
                               for loss in losses},
           "loader_groups_per_s": round(load_gps, 1), "trainer_groups_per_s": round(train_gps, 1),
           "loader_vs_trainer": round(load_gps / train_gps, 1),
           "peak_rss_mib_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    r1, r10 = loader_rss(d / "m", 1), loader_rss(d / "m", 10)
    res.update({"loader_rss_mib_1x": round(r1, 1), "loader_rss_mib_10x": round(r10, 1),
                "loader_rss_ratio_10x_vs_1x": round(r10 / r1, 3)})
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
