"""The trainer on a realistic VLM shape, not the tiny default: ours (packing on), ours (packing off)
and TRL 1.16 ``GRPOTrainer.compute_loss`` + backward on the same batch, each arm in its own process
(for its peak RSS), one run.

Shape (``make_policy``, ``make_rows``): a random-init Qwen2-VL of ~25M parameters (hidden 512, 6
layers, the tiny tokenizer), prompts of ~300 image tokens (a 476 x 504 px image, one token per 28 px
cell) + ~50 text tokens, ``--groups`` groups of G = 8 completions whose lengths are long-tailed
(50 + an exponential of mean 60, capped at 300), random token ids, advantages and behaviour
log-probs. Every arm trains the same rows in micro-batches of ``--micro-batch`` rows:

* ``ours-shared``: fit's defaults: the shared-prefix forward (each group's prompt and image run once
  per micro-batch, its completions continue its key/value cache) on micro-batches that keep a
  group's rows together, packed by length within it (``split(n, by_length=True, by_group=True)``);
* ``ours-pack``: the plain forward (``--no-shared-prefix``) on ``Batch.split(n, by_length=True)``,
  each micro-batch trimmed to its own longest completion;
* ``ours-nopack``: ``Batch.split(n)`` in step order (still trimmed per micro-batch);
* ``trl``: TRL pads every completion to the generation batch's longest and splits it in order
  (its own ``split_pixel_values_by_grid`` / ``split_tensor_dict``), loss ``dapo``
  (``num_items_in_batch`` = the step's tokens, so the chunks sum to the step's loss).

Timed: loss + backward over all micro-batches of the step, on prebuilt model inputs (TRL builds its
inputs in ``_prepare_inputs``, untimed; ours renders a step once for all its updates, reported as
``prepare_s``). Reported: median step seconds, peak RSS (MiB) of each arm's process, the completion
padding fraction of its micro-batches, and the ratios ours/TRL.

Needs the bench extra (trl). Run: python -m bench.bench_scale [--groups 2] [--reps 3] [--json out.json]
"""
import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._env import machine, versions

G = 8
ARMS = ("ours-shared", "ours-pack", "ours-nopack", "trl")


def make_policy(d: Path, hidden: int = 512, layers: int = 6) -> Path:
    """A random-init Qwen2-VL (~25M parameters at the defaults) with the tiny tokenizer and a
    processor for ~300-token images."""
    import torch

    from dfgen.models import save_processor
    from dfgen.models.qwen import tiny_qwen2_vl
    from dfgen.synth.grid import corpus_texts
    from dfgen.tiny import CHAT_TEMPLATE, SPECIAL, build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(corpus_texts(seed=0))
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    model, proc = tiny_qwen2_vl(tok, ids, hidden=hidden, layers=layers, heads=8, vision_depth=2,
                                min_pixels=56 * 56, max_pixels=320 * 28 * 28, chat_template=CHAT_TEMPLATE)
    model.save_pretrained(d, safe_serialization=True)
    save_processor(proc, d)
    return d


def make_rows(processor, groups: int, seed: int = 0) -> list:
    """``groups`` x G training rows of the realistic shape (see the module docstring)."""
    import numpy as np
    from PIL import Image

    from dftrain.batch import TrainRow

    rng = random.Random(seed)
    vocab = [i for i in range(20, len(processor.tokenizer)) if i not in processor.tokenizer.all_special_ids]
    words = "how many red cells are left of the blue square after the green ones are removed and counted".split()
    rows = []
    for _ in range(groups):
        pixels = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 255, (504, 476, 3), dtype=np.uint8)
        prompt = (" ".join(rng.choice(words) for _ in range(12)), Image.fromarray(pixels))
        for _ in range(G):
            n = min(300, 50 + int(rng.expovariate(1 / 60)))
            rows.append(TrainRow(prompt, [rng.choice(vocab) for _ in range(n)], [-rng.uniform(0.1, 3) for _ in range(n)],
                                 advantage=rng.gauss(0, 1), reward=float(rng.random() < 0.5)))
    return rows


def _trl_micro(processor, rows, micro: int, policy: Path):
    """(trainer, [micro-batch input dicts]) as TRL 1.16 builds them for these rows."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import split_pixel_values_by_grid, split_tensor_dict, unsplit_pixel_values_by_grid

    from bench.bench_trl import trl_inputs
    from dfgen.policy import load_policy

    model, _ = load_policy(policy)
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(rows), num_generations=G,
                      max_completion_length=300, beta=0.0, num_iterations=2, use_cpu=True, report_to="none",
                      bf16=False, loss_type="dapo")
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": "x"}]}] * 2)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=ds, processing_class=processor)
    trainer.current_gradient_accumulation_steps = 1
    whole = trl_inputs(processor, None, rows)
    parts = split_tensor_dict(split_pixel_values_by_grid(whole), len(rows) // micro)
    return trainer, [unsplit_pixel_values_by_grid(p) for p in parts]


def run_arm(arm: str, policy: Path, groups: int, micro: int, reps: int, threads: int) -> dict:
    import torch

    from dfgen.policy import load_policy, suppress_ids
    from dftrain.batch import Batch
    from dftrain.fit import FitConfig, micro_loss

    torch.set_num_threads(threads)
    model, processor = load_policy(policy)
    model.train()
    rows = make_rows(processor, groups)
    from dfgen.policy import prompt_inputs

    pi = prompt_inputs(processor, [rows[0].prompt[0]], [rows[0].prompt[1]])
    prompt_tokens = {"all": int(pi["input_ids"].shape[1]),
                     "image": int((pi["input_ids"] == model.config.image_token_id).sum())}
    if arm == "trl":
        trainer, parts = _trl_micro(processor, rows, micro, policy)
        model = trainer.model
        model.train()
        cells = sum(int(p["completion_mask"].numel()) for p in parts)
        tokens = sum(int(p["completion_mask"].sum()) for p in parts)
        prep = 0.0

        def step():
            for p in parts:
                trainer.compute_loss(model, p).backward()
    else:
        cfg = FitConfig(data=".", model=".", out=".", objective="grpo")
        t = time.perf_counter()
        batch = Batch.from_rows(rows, cfg)
        shared = arm == "ours-shared"
        micro_b = batch.split(micro, by_length=arm != "ours-nopack", by_group=shared)
        for mb in micro_b:
            mb.prompt_groups(processor) if shared else mb.model_inputs(processor)
        prep = time.perf_counter() - t
        suppress = suppress_ids(processor.tokenizer)
        cells, tokens = sum(mb.completion_mask.numel() for mb in micro_b), int(batch.completion_mask.sum())

        def step():
            for mb in micro_b:
                micro_loss(model, mb, cfg, processor, suppress, 1.0, shared_prefix=shared)[0].backward()
    times = []
    for rep in range(reps + 1):
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        step()
        if rep:  # the first is a warm-up
            times.append(time.perf_counter() - t)
    return {"arm": arm, "step_s_median": round(statistics.median(times), 3), "step_s_all": [round(x, 3) for x in times],
            "prepare_s": round(prep, 3), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "pad_frac": round(1 - tokens / cells, 4), "completion_tokens": tokens, "prompt_tokens": prompt_tokens,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # one arm, in its own process
    ap.add_argument("--policy", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.policy, args.groups, args.micro_batch, args.reps, args.threads)))
        return
    policy = make_policy(Path(tempfile.mkdtemp()) / "policy")
    res = {"machine": machine(), "versions": versions(), "torch_threads": args.threads, "groups": args.groups,
           "group_size": G, "micro_batch": args.micro_batch, "reps": args.reps, "arms": {}}
    for arm in ARMS:
        cmd = [sys.executable, "-m", "bench.bench_scale", "--arm", arm, "--policy", str(policy), "--groups",
               str(args.groups), "--micro-batch", str(args.micro_batch), "--reps", str(args.reps),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        res["arms"][arm] = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(res["arms"][arm]), flush=True)
    t = {a: res["arms"][a]["step_s_median"] for a in ARMS}
    res["ratios"] = {"ours_shared_over_trl": round(t["ours-shared"] / t["trl"], 3),
                     "shared_over_plain": round(t["ours-shared"] / t["ours-pack"], 3),
                     "ours_pack_over_trl": round(t["ours-pack"] / t["trl"], 3),
                     "ours_nopack_over_trl": round(t["ours-nopack"] / t["trl"], 3),
                     "pack_over_nopack": round(t["ours-pack"] / t["ours-nopack"], 3)}
    print(json.dumps(res["ratios"], indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
