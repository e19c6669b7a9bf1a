"""Supervised warm start: teach the policy the step format before RL (``dftrain sft``).

A randomly initialised tiny policy never produces ``Answer: N``, so every reward is 0 and GRPO
has nothing to learn from. SFT trains on the canonical solutions of a prompt set (records with a
``solution``; others fall back to ``Answer: <answer>``), chat-formatted with the image, and the
loss is the mean cross-entropy over the *completion* tokens only (solution lines + EOS): the
prompt and image tokens are context, never targets. AdamW with linear warm-up and cosine decay
to ``min_lr_ratio * lr``; gradient clipping at 1.

Run: ``dftrain sft --data runs/demo/train --model runs/demo/tiny --out runs/demo/sft --steps 2000``
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class SFTConfig:
    data: Path  # prompt set (dfgen synth output)
    model: Path  # policy folder to start from
    out: Path  # where the trained HF folder goes
    steps: int = 2000  # 600 steps only taught the format: right answers were guesses (docs/RESULTS.md)
    batch_size: int = 16  # 600 x 32 at lr 2e-3 reached only 27.4% in twice the time
    lr: float = 3e-3  # tiny models tolerate (and need) a high lr; 1e-4 barely moves in 600 steps
    warmup: int = 20  # linear warm-up steps
    min_lr_ratio: float = 0.05  # cosine floor: a cooled-down end is a steadier RL start
    seed: int = 0
    eval_data: Path | None = None  # held-out prompts for a greedy accuracy check (optional)
    eval_n: int = 200  # held-out problems scored at the end
    log_every: int = 50
    threads: int = 0  # torch threads; 0 = torch default
    device: str = "cpu"  # cpu | cuda | cuda:N | auto (cuda when available)


def target_text(rec: dict) -> str:
    from dfgen.synth.grid import solution_text

    if rec.get("solution"):
        sol = json.loads(rec["solution"])
        if "steps" in sol:
            return solution_text(sol["steps"], sol["answer"])
    return f"Answer: {rec['answer']}"


def _lr_at(step: int, cfg: SFTConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def sft_loss(model, processor, recs: list[dict], images: list):
    """Mean completion-token cross-entropy of a batch (scalar tensor) and its token count."""
    from dfgen.policy import completion_inputs, prompt_inputs, token_logprobs

    tok = processor.tokenizer
    comps = [tok(target_text(r), add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in recs]
    inputs, cmask = completion_inputs(prompt_inputs(processor, [r["question"] for r in recs], images),
                                      comps, tok.pad_token_id)
    inputs = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in inputs.items()}
    lp = token_logprobs(model, inputs, cmask.shape[1])  # (B, Tc)
    cmask = cmask.to(lp.device)
    n = cmask.sum()
    return -(lp * cmask).sum() / n, int(n)


def run_sft(cfg: SFTConfig, progress=None) -> dict:
    import torch

    from dfgen.policy import decode_image, load_policy, save_processor_files
    from dfgen.records import load_prompts
    from dfgen.shards import write_json_atomic

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    recs, _ = load_prompts(cfg.data)
    images = [decode_image(r["image"]) if r["image"] is not None else None for r in recs]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    model, processor = load_policy(cfg.model, device=device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(cfg.seed)
    order: list[int] = []
    log, t0 = [], time.time()
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:
            order += rng.sample(range(len(recs)), len(recs))
        idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        loss, ntok = sft_loss(model, processor, [recs[i] for i in idx], [images[i] for i in idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            rec = {"step": step + 1, "loss": round(loss.item(), 4), "lr": _lr_at(step, cfg),
                   "elapsed_s": round(time.time() - t0, 2)}
            log.append(rec)
            if progress:
                progress(rec)
    train_s = time.time() - t0
    model.eval().to("cpu")
    result = {"steps": cfg.steps, "train_seconds": round(train_s, 2),
              "steps_per_s": round(cfg.steps / train_s, 2), "final_loss": log[-1]["loss"], "log": log}
    if cfg.eval_data:
        from dftrain.evaluate import greedy_accuracy

        result["heldout_accuracy"] = greedy_accuracy(model, processor, cfg.eval_data, limit=cfg.eval_n)
    out = Path(cfg.out)
    tmp = out.with_name(out.name + ".tmp")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    save_processor_files(tmp, processor.tokenizer, processor.image_processor)
    write_json_atomic(tmp / "sft_config.json", {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()})
    write_json_atomic(tmp / "sft_metrics.json", result)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return result
