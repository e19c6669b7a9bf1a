"""Our trainer's loss+backward vs TRL's GRPOTrainer loss+backward: same tiny model, same batch,
same process, interleaved.

The batch is real: the pipeline in miniature (``bench_trainer.make_df_shards``: synth, tiny
Qwen2-VL, a short SFT, 8 samples per prompt, oracle repair, mask), then 8 groups x 8 rollouts,
the TRL anchor's setting in shared/notes. Both sides start from the same weights (two copies) and
see the same rollouts, advantages and behaviour log-probs:

* ours: ``dftrain.fit.micro_loss`` + ``backward`` on a ``dftrain.batch.Batch`` whose model inputs
  were built once (``ours-df-grpo-shared``: with the shared-prefix forward, fit's default) (prompts and images rendered by the processor; DF's weights are built in the loss),
  for ``--objective grpo`` and ``df-grpo``; fit prepares a batch once and reuses it for every
  update over it, so the preparation is timed separately and also reported amortised over
  ``num_iterations=2`` updates (``*_with_prep``);
* TRL: ``GRPOTrainer.compute_loss`` (its default ``dapo`` loss, ``beta=0``, ``num_iterations=2``
  so the stored old log-probs are used) + ``backward`` on prebuilt tensors (TRL's input building
  happens earlier, in ``_prepare_inputs``, and is not timed).

As a cross-check the script reports the cosine between the two gradients: ours renormalises
over the unsuppressed tokens (the sampling distribution), TRL scores the full vocabulary, so
they should point the same way but need not match exactly.

Needs the bench extra: ``pip install -e '.[bench]'`` (trl==1.16.0).
Run: python -m bench.bench_trl [--reps 12] [--json out.json]
"""
import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


from bench._env import versions


def trl_inputs(processor, groups, rows):
    """The dict TRL's ``_generate_and_score_completions`` would hand to ``compute_loss``."""
    import torch

    from dfgen.policy import prompt_inputs

    pi = prompt_inputs(processor, [r.prompt[0] for r in rows], [r.prompt[1] for r in rows])
    B, Tc = len(rows), max(len(r.token_ids) for r in rows)
    comp = torch.full((B, Tc), processor.tokenizer.pad_token_id, dtype=torch.long)
    cmask = torch.zeros((B, Tc), dtype=torch.long)
    old = torch.zeros((B, Tc))
    for i, r in enumerate(rows):
        comp[i, : len(r.token_ids)] = torch.tensor(r.token_ids)
        cmask[i, : len(r.token_ids)] = 1
        old[i, : len(r.logprobs)] = torch.tensor(r.logprobs)
    out = {"prompt_ids": pi["input_ids"], "prompt_mask": pi["attention_mask"], "completion_ids": comp,
           "completion_mask": cmask, "advantages": torch.tensor([r.advantage for r in rows], dtype=torch.float32),
           "num_items_in_batch": cmask.sum(), "old_per_token_logps": old,
           "pixel_values": pi["pixel_values"], "image_grid_thw": pi["image_grid_thw"], "num_images": [1] * B}
    if "mm_token_type_ids" in pi:  # TRL extends it with zeros over the completion
        out["mm_token_type_ids"] = torch.cat([pi["mm_token_type_ids"], torch.zeros_like(comp)], 1)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=12, help="timed loss+backward calls per side (after 2 warm-ups)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sft-steps", type=int, default=300, help="SFT of the policy that samples the batch")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    try:
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        sys.exit("bench_trl: trl is not installed; pip install -e '.[bench]'")
    from datasets import Dataset

    from bench.bench_trainer import make_df_shards
    from dfgen.images import decode_image
    from dfgen.policy import load_policy, suppress_ids
    from dfgen.shards import open_shards
    from dftrain.data import GroupStream
    from dftrain.batch import Batch, build_rows
    from dftrain.fit import FitConfig, micro_loss

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    d = Path(tempfile.mkdtemp())
    make_df_shards(d, sft_steps=args.sft_steps)
    groups = GroupStream(open_shards(d / "m"), seed=0).take(8)
    for g in groups:
        g["_image"] = decode_image(g["image"])
    ours, processor = load_policy(d / "sft")
    theirs = copy.deepcopy(ours)
    suppress = suppress_ids(processor.tokenizer)
    # DF's token weights alone (what the TRL integration carries): no repaired samples, no all-fail term
    cfgs = {obj: FitConfig(data=d / "m", model=d / "sft", out=d / "unused", objective=obj, repaired_weight=0.0,
                           fail_advantage=0.0) for obj in ("grpo", "df-grpo")}
    rows = {obj: build_rows(groups, c) for obj, c in cfgs.items()}
    assert all(not r.repaired for r in rows["df-grpo"])  # repaired samples off: the same sequences

    targs = GRPOConfig(output_dir=str(d / "trl"), per_device_train_batch_size=64, num_generations=8,
                       max_completion_length=64, beta=0.0, num_iterations=2, learning_rate=1e-4, use_cpu=True,
                       report_to="none", gradient_checkpointing=False, bf16=False, logging_steps=1)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": g["question"]}]} for g in groups])
    trainer = GRPOTrainer(model=theirs, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=targs,
                          train_dataset=ds, processing_class=processor)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); we call compute_loss directly
    tin = trl_inputs(processor, groups, rows["grpo"])
    ours.train()
    trainer.model.train()

    prep_s = {obj: [] for obj in cfgs}
    preps = {}
    for _ in range(args.reps):
        for obj in cfgs:
            t = time.perf_counter()
            preps[obj] = Batch.from_rows(rows[obj], cfgs[obj])
            preps[obj].model_inputs(processor)  # rendered prompts and images, built once per batch
            preps[obj].prompt_groups(processor)  # the same, once per group (the shared-prefix forward)
            prep_s[obj].append(time.perf_counter() - t)

    def step_ours(obj, shared=False):
        ours.zero_grad(set_to_none=True)
        t = time.perf_counter()
        loss, _ = micro_loss(ours, preps[obj], cfgs[obj], processor, suppress, 1.0, shared_prefix=shared)
        loss.backward()
        return time.perf_counter() - t, float(loss.detach())

    def step_trl():
        trainer.model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        loss = trainer.compute_loss(trainer.model, tin)
        loss.backward()
        return time.perf_counter() - t, float(loss.detach())

    sides = {"ours-grpo": lambda: step_ours("grpo"), "ours-df-grpo": lambda: step_ours("df-grpo"),
             "ours-df-grpo-shared": lambda: step_ours("df-grpo", True), "trl": step_trl}
    times = {k: [] for k in sides}
    losses = {}
    for rep in range(args.reps + 2):
        for k, f in sides.items():
            dt, losses[k] = f()
            if rep >= 2:
                times[k].append(dt)
    # gradient agreement on the same batch (GRPO objective vs TRL dapo)
    step_ours("grpo")
    step_trl()
    g1 = torch.cat([p.grad.flatten() for p in ours.parameters() if p.grad is not None])
    g2 = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    med = {k: statistics.median(v) for k, v in times.items()}
    ntok = int(tin["completion_mask"].sum())
    res = {"machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.node()}", "torch_threads": args.threads,
           "versions": versions(),
           "batch": {"sequences": len(rows["grpo"]), "completion_tokens": ntok,
                     "prompt_len": int(tin["prompt_ids"].shape[1]), "completion_len_max": int(tin["completion_ids"].shape[1])},
           "reps": args.reps, "loss_backward_s_median": {k: round(v, 4) for k, v in med.items()},
           "loss_backward_s_all": {k: [round(x, 4) for x in v] for k, v in times.items()},
           "ours_grpo_over_trl": round(med["ours-grpo"] / med["trl"], 3),
           "ours_df_over_trl": round(med["ours-df-grpo"] / med["trl"], 3),
           "ours_df_shared_prefix_over_trl": round(med["ours-df-grpo-shared"] / med["trl"], 3),
           "prepare_s_median": {k: round(statistics.median(v), 4) for k, v in prep_s.items()},
           "ours_grpo_with_prep_over_trl": round((med["ours-grpo"] + statistics.median(prep_s["grpo"]) / 2) / med["trl"], 3),
           "ours_df_with_prep_over_trl": round((med["ours-df-grpo"] + statistics.median(prep_s["df-grpo"]) / 2) / med["trl"], 3),
           "last_loss": {k: round(v, 6) for k, v in losses.items()},
           "grad_cosine_ours_grpo_vs_trl": round(float(torch.nn.functional.cosine_similarity(g1, g2, dim=0)), 5),
           "grad_norm_ratio_ours_vs_trl": round(float(g1.norm() / g2.norm()), 5)}
    print(json.dumps({k: v for k, v in res.items() if k != "loss_backward_s_all"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
