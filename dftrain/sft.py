"""Supervised warm start: teach the policy the step format before RL (``dftrain sft``).

A randomly initialised tiny policy never produces ``Answer: N``, so every reward is 0 and GRPO
has nothing to learn from. SFT trains on the canonical solutions of a prompt set (records with a
``solution``, or a verbatim target in its ``{"text": ...}``; others fall back to ``Answer: <answer>``), chat-formatted with the image, and the
loss is the mean cross-entropy over the *completion* tokens only (solution lines + EOS): the
prompt and image tokens are context, never targets. AdamW with linear warm-up and cosine decay
to ``min_lr_ratio * lr``; gradient clipping at 1.

The vision tower (``model.model.visual``: patch embedding, blocks and merger) trains at
``vision_lr_scale * lr``; the default 0 freezes it. Measured (docs/RESULTS.md, "The policy that
sees"): the untrained tower's features already let a linear probe read every colour count, and
training it together with the LM destroys that (the policy then counts near chance), while with
the tower frozen the LM learns to count. ``eval_every`` > 0 records a held-out greedy curve
(``curve`` in the metrics) so the late jump in accuracy can be seen; ``save_every`` > 0 keeps the
policy at those steps too (``OUT/steps/step_NNNNNN/``, standard HF folders, each with the held-out
profile of that step when one was scored), so a point of the curve can be used as an RL start
without rebuilding a schedule that ends there.

Run: ``dftrain sft --data runs/demo/train --model runs/demo/tiny --out runs/demo/sft --eval-data runs/demo/val``
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class SFTConfig:
    data: Path  # prompt set (dfgen synth output)
    model: Path  # policy folder to start from
    out: Path  # where the trained HF folder goes
    steps: int = 6000  # counting forms late, in a jump (docs/RESULTS.md, "The policy that sees")
    schedule_steps: int = 0  # > 0: the lr schedule's length when longer than steps (stop early on it)
    batch_size: int = 16
    lr: float = 1e-3  # 3e-3 erased the question's effect on the first read (the policy named one colour)
    vision_lr_scale: float = 0.0  # vision tower lr = this * lr; 0 freezes it (training it broke counting)
    warmup: int = 20  # linear warm-up steps
    min_lr_ratio: float = 0.05  # cosine floor: a cooled-down end is a steadier RL start
    seed: int = 0
    eval_data: Path | None = None  # held-out prompts for a greedy accuracy check (optional)
    eval_n: int = 200  # held-out problems scored at the end
    eval_every: int = 0  # > 0: also score eval_n held-out problems every this many steps (a curve)
    save_every: int = 0  # > 0: also keep OUT/steps/step_NNNNNN every this many steps (intermediate starts)
    log_every: int = 50
    threads: int = 0  # torch threads; 0 = torch default
    device: str = "cpu"  # cpu | cuda | cuda:N | auto (cuda when available)
    report_to: str = "jsonl"  # + tensorboard, wandb (dftrain.tracking): logged steps and held-out scores, in OUT/tb, OUT/wandb


def target_text(rec: dict) -> str:
    from dfgen.synth.grid import solution_text

    if rec.get("solution"):
        sol = json.loads(rec["solution"])
        if isinstance(sol.get("text"), str):  # a target given verbatim (e.g. a repair, studies/repair_model.py)
            return sol["text"]
        if "steps" in sol:
            return solution_text(sol["steps"], sol["answer"])
    return f"Answer: {rec['answer']}"


def _lr_at(step: int, cfg: SFTConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, (cfg.schedule_steps or cfg.steps) - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


IMAGE_PREFIX = "image:"  # an encoded row's per-image tensors (concatenated, not padded, by collate_prompts)


def encode_examples(processor, recs: list[dict], images: list, chunk: int = 256) -> list[dict]:
    """Each record's prompt inputs (unpadded, batch dimension 1) and target ids, built once before
    training: on the tiny policy the processor costs a sixth of a step (images, chat template).
    Memory: the pixel patches are float32, ~170 KB per 84-px board (8,000 records ~1.4 GB), so
    this suits the embedded task's prompt sets, not 100k-image corpora."""
    from dfgen.models import processor_family, split_images
    from dfgen.policy import prompt_inputs

    tok, fam = processor.tokenizer, processor_family(processor)
    out = []
    for k in range(0, len(recs), chunk):
        rs, ims = recs[k: k + chunk], images[k: k + chunk]
        enc = prompt_inputs(processor, [r["question"] for r in rs], ims)
        per_image = split_images(enc, [im is not None for im in ims], fam)
        for i, r in enumerate(rs):
            if per_image is None:  # image rows that are tiles, patches or prompts: this prompt alone
                row = _unpadded(prompt_inputs(processor, [r["question"]], [ims[i]]), 0)
            else:
                row = _unpadded(enc, i) | {IMAGE_PREFIX + key: v for key, v in per_image[i].items()}
            row["target"] = tok(target_text(r), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            out.append(row)
    return out


def _unpadded(enc, i: int) -> dict:
    """Row ``i`` of a processor batch without its padding (batch dimension 1); a batch of one also
    keeps its image tensors (under ``IMAGE_PREFIX``)."""
    shape = tuple(enc["input_ids"].shape)
    keep = enc["attention_mask"][i].bool()
    row = {key: v[i][keep].unsqueeze(0) for key, v in enc.items() if tuple(v.shape[:2]) == shape}
    if shape[0] == 1:
        row |= {IMAGE_PREFIX + key: v for key, v in enc.items() if tuple(v.shape[:2]) != shape}
    return row


def collate_prompts(rows: list[dict], pad_id: int) -> dict:
    """Left-pad encoded rows into one batch, exactly as the processor pads a batch of prompts."""
    import torch

    L = max(r["input_ids"].shape[1] for r in rows)
    batch = {}
    for key in (k for k in rows[0] if k != "target" and not k.startswith(IMAGE_PREFIX)):
        fill = pad_id if key == "input_ids" else 0
        batch[key] = torch.stack([torch.nn.functional.pad(r[key][0], (L - r[key].shape[1], 0), value=fill)
                                  for r in rows])
    for key in dict.fromkeys(k for r in rows for k in r if k.startswith(IMAGE_PREFIX)):
        batch[key.removeprefix(IMAGE_PREFIX)] = _cat_padded([r[key] for r in rows if key in r])
    return batch


def _cat_padded(ts: list):
    """Concatenate along dim 0, zero-padding the other dims to the largest (tiles or patches per image,
    as the processor pads a batch of images)."""
    import torch

    shape = [max(t.shape[d] for t in ts) for d in range(1, ts[0].dim())]
    out = []
    for t in ts:
        pad = [x for d in reversed(range(1, t.dim())) for x in (0, shape[d - 1] - t.shape[d])]
        out.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
    return torch.cat(out)


def encoded_loss(model, processor, rows: list[dict]):
    """Mean completion-token cross-entropy of a batch of :func:`encode_examples` rows, and its token count."""
    from dfgen.policy import completion_inputs, token_logprobs

    pad = processor.tokenizer.pad_token_id
    inputs, cmask = completion_inputs(collate_prompts(rows, pad), [r["target"] for r in rows], pad)
    inputs = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in inputs.items()}
    lp = token_logprobs(model, inputs, cmask.shape[1])  # (B, Tc)
    cmask = cmask.to(lp.device)
    n = cmask.sum()
    return -(lp * cmask).sum() / n, int(n)


def sft_loss(model, processor, recs: list[dict], images: list):
    """Mean completion-token cross-entropy of a batch of records (scalar tensor) and its token count."""
    return encoded_loss(model, processor, encode_examples(processor, recs, images))


def _param_groups(model, vision_lr_scale: float) -> list[dict]:
    """AdamW groups: the LM at the base lr, the vision tower at ``vision_lr_scale`` of it (frozen at 0)."""
    from dfgen.models import vision_parameters

    visual = vision_parameters(model)
    vis = {id(q) for q in visual}
    if vision_lr_scale == 0:
        for q in visual:
            q.requires_grad_(False)
    groups = [{"params": [q for q in model.parameters() if id(q) not in vis], "lr_scale": 1.0}]
    if vision_lr_scale > 0:
        groups.append({"params": visual, "lr_scale": vision_lr_scale})
    return groups


def _heldout(model, processor, cfg: SFTConfig) -> dict:
    from dftrain.evaluate import greedy_profile

    model.eval()
    p = greedy_profile(model, processor, cfg.eval_data, limit=cfg.eval_n)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in p.items()}


def run_sft(cfg: SFTConfig, progress=None) -> dict:
    import torch

    from dfgen.images import decode_image
    from dfgen.policy import load_policy, resolve_device
    from dfgen.records import load_prompts

    from dfgen.shards import config_json
    from dftrain.tracking import Reporter, parse

    parse(cfg.report_to)  # refused before any work
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    recs, _ = load_prompts(cfg.data)
    images = [decode_image(r["image"]) if r["image"] is not None else None for r in recs]
    model, processor = load_policy(cfg.model, device=resolve_device(cfg.device))
    encoded = encode_examples(processor, recs, images)
    del images
    model.train()
    opt = torch.optim.AdamW(_param_groups(model, cfg.vision_lr_scale), lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(cfg.seed)
    out = Path(cfg.out)
    staging = out.with_name(out.name + ".steps")  # intermediate folders, moved into OUT/steps at the end
    shutil.rmtree(staging, ignore_errors=True)
    report_dir = out.with_name(out.name + ".report")  # moved into OUT at the end, as the step folders
    shutil.rmtree(report_dir, ignore_errors=True)
    reporter = Reporter(report_dir, cfg.report_to, config_json(cfg), name=out.name)
    order: list[int] = []
    log, curve, t0 = [], [], time.time()
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:
            order += rng.sample(range(len(recs)), len(recs))
        idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
        loss = _sft_step(model, processor, opt, [encoded[i] for i in idx], _lr_at(step, cfg))
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            rec = {"step": step + 1, "loss": round(loss.item(), 4), "lr": _lr_at(step, cfg),
                   "elapsed_s": round(time.time() - t0, 2)}
            log.append(rec)
            reporter.log(rec)
            if progress:
                progress(rec)
        if cfg.eval_data and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            t_eval = time.time()
            curve.append({"step": step + 1, **_heldout(model, processor, cfg)})
            reporter.log({"heldout": curve[-1]}, step=step + 1)
            model.train()
            t0 += time.time() - t_eval  # train_seconds counts training only
            if progress:
                progress({"step": step + 1, "loss": log[-1]["loss"], "lr": _lr_at(step, cfg),
                          "elapsed_s": round(time.time() - t0, 2), "heldout": curve[-1]})
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            t_save = time.time()
            at = curve[-1] if curve and curve[-1]["step"] == step + 1 else None
            _save(model, processor, staging / f"step_{step + 1:06d}", cfg,
                  {"step": step + 1, "loss": log[-1]["loss"], **({"heldout": at} if at else {})})
            model.train()
            t0 += time.time() - t_save
    return _finish(model, processor, cfg, time.time() - t0, log, curve, staging, (reporter, report_dir))


def _sft_step(model, processor, opt, rows: list[dict], lr: float):
    """One optimizer step on encoded examples at learning rate ``lr`` (times each group's scale)."""
    import torch

    for g in opt.param_groups:
        g["lr"] = lr * g["lr_scale"]
    loss, _ = encoded_loss(model, processor, rows)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([q for g in opt.param_groups for q in g["params"]], 1.0)
    opt.step()
    return loss


def _finish(model, processor, cfg: SFTConfig, train_s: float, log: list, curve: list, staging: Path,
            report: tuple) -> dict:
    """The final held-out score and save: OUT appears whole (weights, steps/, reports, done marker) or
    not at all. report: (the Reporter, the folder it writes)."""
    from dfgen.shards import mark_done

    out = Path(cfg.out)
    model.eval()
    result = {"steps": cfg.steps, "train_seconds": round(train_s, 2),
              "steps_per_s": round(cfg.steps / train_s, 2), "final_loss": log[-1]["loss"], "log": log}
    if cfg.eval_data:
        curve.append({"step": cfg.steps, **_heldout(model, processor, cfg)})
        result["heldout_accuracy"] = curve[-1]["accuracy"]
        result["heldout"] = curve[-1]
        result["curve"] = curve
        report[0].log({"heldout": curve[-1]}, step=cfg.steps)
    report[0].close()
    tmp = out.with_name(out.name + ".tmp")
    _save(model, processor, tmp, cfg, result)
    if staging.exists():
        staging.rename(tmp / "steps")
    if report[1].exists():
        for f in report[1].iterdir():
            f.rename(tmp / f.name)
        report[1].rmdir()
    mark_done(tmp, {k: v for k, v in result.items() if k not in ("log", "curve")})  # then OUT appears whole
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return result


def _save(model, processor, d: Path, cfg: SFTConfig, metrics: dict) -> None:
    """A standard HF folder (weights, processor files) with the SFT config and ``metrics`` beside it."""
    from dfgen.models import save_model, save_processor
    from dfgen.shards import config_json, write_json_atomic

    device = model.device
    shutil.rmtree(d, ignore_errors=True)
    save_model(model.to("cpu"), d)
    model.to(device)
    save_processor(processor, d)
    write_json_atomic(d / "sft_config.json", config_json(cfg))
    write_json_atomic(d / "sft_metrics.json", metrics)
