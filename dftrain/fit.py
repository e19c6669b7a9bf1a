"""``dftrain fit``: stream DF shards into the masked GRPO objective, write HF checkpoints.

One optimizer step reads ``groups_per_step`` prompt groups (x ``grad_accum``), builds model
inputs through the policy's own processor (the stored ``prompt_ids`` are checked against it),
computes current log-probs of the stored rollout tokens, and minimises ``dftrain.loss``:

* ``--objective grpo``: plain GRPO on the same data path (masks ignored, repaired samples off);
* ``--objective df-grpo``: failed rollouts with a verified repair get DF token weights
  (``--kappa``, ``--marked root|root+prop|edit``, ``--delta``, ``--mass keep|redistribute``);
  the default ``root`` puts full blame on the first edit only (the root cause) and ``kappa`` on
  the rest (``edit``, every edited token, gained nothing on the sighted policy: docs/RESULTS.md);
  with ``--repaired-weight A > 0`` (default 1) each group's distinct repaired trajectories join the batch as
  extra positive off-policy samples with advantage A (their behaviour log-probs come from the
  shards), tokens weighted ``mask_repaired + kappa_rep * (1 - mask_repaired)``;
  with ``--fail-advantage A > 0`` (default 1), in a group whose rollouts all failed (GRPO's advantage is 0
  there, so GRPO learns nothing from it) each rollout with a verified repair gets advantage -A on
  its root-cause token alone (every other token weight 0).

The surrogate is ``--policy-loss ppo|gspo|sapo|cispo`` (``dftrain.loss.POLICY_LOSSES``: PPO clip,
GSPO-token, SAPO's soft gate, CISPO), with ``--clip-high`` (clip-higher; CISPO's IS bound is
1 + clip-high) and ``--dual-clip C`` (ppo and gspo); DF's weights enter every one of them the same
way, in the per-token advantage, and ``--objective grpo`` is each surrogate without DF.

Advantages are per group over the *rollouts* (``--adv-scale group|batch|none``). The importance ratio
uses the stored behaviour logprobs, so the first update of a batch is exactly on-policy when the
checkpoint that sampled is the one being trained; ``--updates-per-batch`` > 1 reuses a batch
(the clip then matters). A step is one ``dftrain.batch.Batch`` (the shard columns, padded once,
with the step's denominators); its micro-batches (``--micro-batch`` rows) carry those denominators,
so their losses and gradients sum to the whole batch's (a memory knob; result unchanged); ``--pack``
(default) fills them with rows of like length (``pad_frac`` in the metrics: the padded share), and
``--shared-prefix`` (default) runs each group's prompt, image included, once per micro-batch, its
completions continuing the prompt's key/value cache (``policy_logprobs``; exact: tests/test_shared_prefix.py). Their
rendered prompts and images and the reference log-probs are built once for all updates. Optional frozen reference for ``beta * k3`` (loaded only
when ``--beta > 0``), LoRA (peft; the checkpoint is saved merged), gradient checkpointing, bf16.

Checkpoints: ``OUT/step_000020/`` (HF folder + ``trainer_state.json`` + ``optimizer.pt``), and
the final model in ``OUT/`` itself; ``--resume`` continues from the latest step folder with the
same data order, optimizer and RNG. Under ``torchrun`` each rank trains on disjoint groups (DDP,
or ``--fsdp``: FSDP2 shards; gloo on CPU) and a step is the one a single process takes on the same
groups (``dftrain.parallel``). Metrics go to ``OUT/metrics.jsonl``, one line per step (loss, reward,
grad norm, DF's mask density, repair rate and repairer tokens, padding, the loss's metrics), and to
TensorBoard or wandb with ``--report-to`` (``dftrain.tracking``).

Run: ``dftrain fit --data runs/r0/df --model runs/sft --out runs/r1 --steps 20``
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from dfgen.errors import UserError
from dftrain.settings import DTYPES, TrainSettings


@dataclass(kw_only=True)
class FitConfig(TrainSettings):
    """``dftrain fit``'s settings: what it optimises is inherited from ``dftrain.settings.TrainSettings``
    (objective, surrogate, aggregation, lr, ...) and its ``DFWeights`` (kappa, marked, delta, mass,
    repaired_weight, kappa_rep, fail_advantage), shared with ``dftrain loop``; the rest is fit's own."""

    data: Path  # DF shards (dfgen mask output); sample shards suffice for --objective grpo
    model: Path  # policy to train (HF folder); normally the checkpoint that sampled the shards
    out: Path  # output folder: final model + step_* checkpoints + metrics.jsonl
    steps: int = 20
    grad_accum: int = 1  # batches of groups accumulated per optimizer step
    micro_batch: int = 64  # sequences per forward/backward (memory knob; result unchanged: dftrain.batch)
    pack: bool = True  # micro-batches of rows of like length (less padding; the same loss: dftrain.batch)
    shared_prefix: bool = True  # run each group's prompt (image included) once, not once per completion, where exact
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    buffer_size: int = 256  # shuffle buffer (groups)
    freeze_vision: bool = True  # keep the vision tower (model.model.visual) fixed, as dftrain sft does
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: int = 16
    gradient_checkpointing: bool = False
    dtype: str = "float32"  # float32 | bfloat16 (GPU)
    save_every: int = 0  # checkpoint every N steps (0 = only at the end)
    resume: bool = False
    optimizer_from: Path | None = None  # previous fit's OUT (or step folder): continue its AdamW state
    log_every: int = 1
    threads: int = 0
    fsdp: bool = False  # under torchrun: shard parameters, gradients and AdamW state (FSDP2) instead of DDP replicas
    fsdp_mixed_precision: str = "none"  # none | bfloat16: --fsdp gathers parameters in bf16 for compute
    report_to: str = "jsonl"  # + tensorboard, wandb (comma-separated; dftrain.tracking): metrics.jsonl is always written

    def validate(self):
        from dftrain.loss import check_surrogate
        from dftrain.tracking import parse

        msg = self.check_training()
        if msg:
            raise UserError(msg)
        parse(self.report_to)
        try:
            check_surrogate(self.policy_loss, self.clip_low, self.clip_high, self.dual_clip)
        except ValueError as e:
            raise UserError(f"--policy-loss {self.policy_loss}: {e}".replace("dual_clip", "--dual-clip")
                            .replace("clip_high", "--clip-high").replace("clip_low", "--clip-low")) from None
        checks = [(self.steps > 0 and self.micro_batch > 0 and self.grad_accum > 0, "sizes must be positive"),
                  (self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}"),
                  (self.fsdp_mixed_precision in ("none", "bfloat16"), "--fsdp-mixed-precision must be none or bfloat16"),
                  (self.fsdp or self.fsdp_mixed_precision == "none", "--fsdp-mixed-precision needs --fsdp"),
                  (not (self.fsdp and self.lora_rank > 0), "--fsdp with --lora-rank is not supported: LoRA's "
                   "trainable weights are small enough for DDP (drop --fsdp)"),
                  (not (self.fsdp and self.optimizer_from), "--fsdp with --optimizer-from is not supported: "
                   "continue a sharded run with --resume")]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)


# settings that may change on --resume without changing what is optimised
RESUME_FREE = ("steps", "resume", "save_every", "micro_batch", "pack", "report_to", "shared_prefix", "threads",
               "log_every", "gradient_checkpointing")


def _check_resume_settings(have: dict, cfg: "FitConfig", out: Path) -> None:
    """A resumed fit must optimise the same objective on the same data as the run it continues
    (e.g. a run begun with ``--marked edit`` is not silently continued under a new default)."""
    from dfgen.shards import config_json

    want = config_json(cfg)
    diff = sorted(k for k in set(have) | set(want) if k not in RESUME_FREE and have.get(k) != want.get(k))
    if diff:
        raise UserError(f"{out} holds a fit with other settings ({', '.join(f'{k}: {have.get(k)!r} there' for k in diff)}); "
                        f"pass the same settings to --resume, or use a new --out")


# ----------------------------------------------------------------------------- one step
def policy_logprobs(model, batch, processor, suppress, temperature, shared_prefix: bool):
    """Log-probs (B, T) of a micro-batch's completion tokens under ``model`` (padding 0). ``shared_prefix``:
    each prompt group's prompt, image included, runs once and its completions continue its key/value
    cache (``dfgen.policy.shared_prefix_logprobs``); else every row runs prompt + completion."""
    import torch

    from dfgen.policy import shared_prefix_logprobs, token_logprobs

    dev = model.device if hasattr(model, "device") else batch.token_ids.device
    T = batch.completion_mask.shape[1]
    pad = batch.completion_mask == 0  # padding is the pad token, a suppressed id: its logprob is -inf under
    # both models, and exp(-inf - -inf) in the KL would be NaN even behind the mask; zero it (no gradient there)
    if not shared_prefix:
        inputs = {k: v.to(dev) if hasattr(v, "to") else v for k, v in batch.model_inputs(processor).items()}
        return token_logprobs(model, inputs, T, suppress, temperature).masked_fill(pad, 0.0)
    lp = torch.zeros(batch.completion_mask.shape, device=dev)
    for rows, prompt in batch.prompt_groups(processor):
        prompt = {k: v.to(dev) if hasattr(v, "to") else v for k, v in prompt.items()}
        lp = lp.index_put((rows.to(dev),), shared_prefix_logprobs(model, prompt, batch.token_ids[rows].to(dev),
                                                                 suppress, temperature))
    return lp.masked_fill(pad, 0.0)


def micro_loss(model, batch, cfg: FitConfig, processor, suppress, temperature, ref_model=None, shared_prefix=False):
    """Loss and metrics of one micro-batch (``dftrain.batch.Batch.split``) under the current weights:
    its share of the step's, since it carries the step's denominators. Returns (loss, metrics)."""
    import torch

    from dftrain.loss import LOSSES

    lp = policy_logprobs(model, batch, processor, suppress, temperature, shared_prefix)  # (B, T)
    if ref_model is not None and cfg.beta > 0 and batch.ref_logprobs is None:
        with torch.no_grad():  # the reference is frozen: once per step, not once per update
            batch.ref_logprobs = policy_logprobs(ref_model, batch, processor, suppress, temperature, shared_prefix)
    return LOSSES[cfg.objective](lp, batch, cfg)


@dataclass
class Trainer:
    """What every step of a fit uses: the module to call (the model, DDP around it, or FSDP-sharded),
    its trainable parameters and optimizer, the processor, the settings, the sampling's suppressed ids
    and temperature, the frozen reference (or None) and the data-parallel layout."""

    module: object
    params: list
    opt: object
    processor: object
    cfg: FitConfig
    suppress: list
    temperature: float
    ref_model: object
    par: object  # dftrain.parallel.Parallel
    shared_prefix: bool = False  # cfg.shared_prefix, where the model's family is served exactly (Family.shared_prefix)


def train_step(tr: Trainer, batch) -> dict:
    """One optimizer step (``--updates-per-batch`` updates) over a step's ``Batch``: split into
    micro-batches that carry the step's denominators, so the summed losses and gradients are the
    whole batch's (summed over ranks too: ``dftrain.parallel``). Returns the step's loss, grad norm,
    completion tokens, padding fraction and loss metrics."""
    from dftrain.loss import reduce_metrics

    cfg, par = tr.cfg, tr.par
    micro = [mb.to(tr.params[0].device)
             for mb in batch.split(cfg.micro_batch, by_length=cfg.pack, by_group=tr.shared_prefix)]
    pad_frac = batch.padding_fraction(micro)
    metrics: dict = {}
    for _upd in range(cfg.updates_per_batch):
        tr.opt.zero_grad(set_to_none=True)
        upd: dict = {}
        for k, mb in enumerate(micro):
            with par.sync(tr.module, last=k == len(micro) - 1):
                loss, met = micro_loss(tr.module, mb, cfg, tr.processor, tr.suppress, tr.temperature, tr.ref_model,
                                       tr.shared_prefix)
                (loss * par.loss_scale).backward()
            reduce_metrics(upd, {"loss": loss, **met})  # stays on the device: one sync per update, below
            if cfg.updates_per_batch == 1:
                mb.inputs = mb.groups = None  # one update: nothing reuses them, free the memory now
        grad_norm = par.clip_grad_norm(tr.params, cfg.max_grad_norm)
        tr.opt.step()
        upd = par.reduce_metrics({name: float(v) for name, v in upd.items()})
        step_loss = upd.pop("loss")  # the loss of the step's last update, as logged before
        for name, v in upd.items():  # the step's metrics: the mean over its updates
            metrics[name] = metrics.get(name, 0.0) + v / cfg.updates_per_batch
    return {"loss": step_loss, "grad_norm": grad_norm, "metrics": metrics, "pad_frac": pad_frac,
            "tokens": int(batch.completion_mask.sum()) * cfg.updates_per_batch}  # tokens trained through


# ----------------------------------------------------------------------------- checkpoints
def _save_model(model, processor, folder: Path, lora: bool, state_dict=None) -> None:
    """The model as a plain HF folder in ``folder`` (LoRA: the adapter, and the merged model);
    ``state_dict``: its weights when the module holds only a shard of them (FSDP)."""
    import copy

    from dfgen.models import save_model, save_processor

    m = model.module if hasattr(model, "module") else model
    if lora:
        m.save_pretrained(folder / "adapter")
        m = copy.deepcopy(m).merge_and_unload()
    save_model(m, folder, state_dict=state_dict)
    save_processor(processor, folder)


def _rng_state():
    import torch

    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def save_checkpoint(tr: Trainer, step: int, position: int, out: Path, final=False):
    """``OUT/step_NNNNNN/``: the HF model, ``trainer_state.json`` (step, data position, settings) and
    the optimizer and RNG (``optimizer.pt``; FSDP: ``dcp/`` shards and ``rng.pt``). Every rank calls
    it; the folder is written under a temporary name and appears by one rename once all have written.
    ``final``: the model's files are also copied to OUT/ itself."""
    import shutil

    import torch

    from dfgen.shards import config_json, write_json_atomic

    par, name = tr.par, f"step_{step:06d}"
    tmp = out / f".{name}.tmp"
    full = par.full_state_dict(tr.module)  # FSDP: gathered on rank 0 (every rank takes part)
    if par.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    par.barrier()
    try:
        if par.mode == "fsdp":
            par.save_shards(tr.module, tr.opt, tmp / "dcp")
        if par.main:
            _save_model(tr.module, tr.processor, tmp, tr.cfg.lora_rank > 0, state_dict=full)
            if par.mode == "fsdp":
                torch.save({"rng": _rng_state()}, tmp / "rng.pt")
            else:
                torch.save({"optimizer": tr.opt.state_dict(), "rng": _rng_state()}, tmp / "optimizer.pt")
            write_json_atomic(tmp / "trainer_state.json", {"step": step, "data_position": position,
                                                           "config": config_json(tr.cfg)})
    except BaseException:
        if par.main:  # a failed save (disk full, a kill) leaves no half checkpoint folder
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    par.barrier()  # every shard written before the folder appears
    if par.main:
        shutil.rmtree(out / name, ignore_errors=True)
        os.replace(tmp, out / name)
        if final:  # the final model also sits at OUT/ itself, a plain HF folder for the next round
            # config.json last: a reader that takes it for "a model is here" never finds half a folder
            for f in sorted((out / name).iterdir(), key=lambda f: f.name == "config.json"):
                if f.is_file() and f.name not in ("optimizer.pt", "rng.pt"):
                    part = out / f".{f.name}.tmp"  # each file appears whole or not at all
                    shutil.copy2(f, part)
                    os.replace(part, out / f.name)


def _optimizer_state(src: Path, lr: float) -> dict:
    """AdamW state of a previous run (its OUT or one step folder), with this run's lr."""
    import torch

    ck = src / "optimizer.pt" if (src / "optimizer.pt").is_file() else None
    if ck is None:
        last = latest_checkpoint(src)
        ck = last / "optimizer.pt" if last is not None else None
    if ck is None or not ck.is_file():
        raise UserError(f"--optimizer-from {src}: no optimizer.pt there (expected a dftrain fit output)")
    state = torch.load(ck, weights_only=True, map_location="cpu")["optimizer"]
    for group in state["param_groups"]:
        group["lr"] = lr
    return state


def latest_checkpoint(out: Path):
    steps = sorted(p for p in Path(out).glob("step_*") if (p / "trainer_state.json").is_file())
    return steps[-1] if steps else None


# ----------------------------------------------------------------------------- loop
def _resume_point(cfg: FitConfig, out: Path):
    """The step folder ``--resume`` continues from (None: a fresh run), refusing a fresh run over
    checkpoints and a resume under other settings."""
    resume_from = latest_checkpoint(out) if cfg.resume else None
    if not cfg.resume and latest_checkpoint(out) is not None:
        raise UserError(f"{out} already holds checkpoints; pass --resume to continue or choose a new folder")
    if resume_from is not None and (out / "fit_config.json").is_file():
        _check_resume_settings(json.loads((out / "fit_config.json").read_text()), cfg, out)
    return resume_from


def _open_data(cfg: FitConfig, load_dir: Path):
    """The shard set, checked against the policy's tokenizer before the (possibly large) weights load."""
    from dfgen.policy import check_policy_dir, load_processor, tokenizer_fingerprint
    from dfgen.shards import open_shards

    from dftrain.loss import OBJECTIVES

    stages = OBJECTIVES[cfg.objective].stages
    try:
        shards = open_shards(cfg.data, stage=stages,
                             tokenizer_fp=tokenizer_fingerprint(load_processor(check_policy_dir(load_dir)).tokenizer))
    except UserError as e:
        if "needs mask" in str(e):
            raise UserError(f"{cfg.data} has no masks: --objective df-grpo needs shards from `dfgen repair` then "
                            f"`dfgen mask` (or use --objective grpo)") from None
        raise
    if shards.num_rows() == 0:
        raise UserError(f"{cfg.data} holds no groups")
    return shards


def _load_models(cfg: FitConfig, par, load_dir: Path, resume_from):
    """(policy to train, processor, frozen reference or None) on this rank's device (FSDP: on the
    meta device but on rank 0, until sharded): vision tower frozen, LoRA and gradient checkpointing
    applied as configured."""
    import torch

    from dfgen.models import lora_targets, vision_parameters

    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    model, processor = par.load_policy(load_dir, dtype=dtype)
    if cfg.freeze_vision:  # RL on a trained tower broke perception (docs/RESULTS.md); no tower is an error
        for q in vision_parameters(model):
            q.requires_grad_(False)
    if cfg.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                 target_modules=lora_targets(model)))
        if resume_from is not None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(resume_from / "adapter" / "adapter_model.safetensors"))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    ref_model = None
    if cfg.beta > 0:
        ref_model, _ = par.load_policy(cfg.model, dtype=dtype)
        ref_model.eval().requires_grad_(False)
    model.train()
    return model, processor, ref_model


def _restore(tr: Trainer, resume_from, log) -> tuple[int, int]:
    """Seed the RNGs, then restore optimizer, RNG and data position from ``resume_from`` (a step
    folder; FSDP: model and optimizer shards from its ``dcp/``) or only the AdamW state of
    ``--optimizer-from``. Returns (first step, data position)."""
    import torch

    cfg = tr.cfg
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if resume_from is not None:
        state = json.loads((resume_from / "trainer_state.json").read_text())
        if tr.par.mode == "fsdp":
            tr.par.load_shards(tr.module, tr.opt, resume_from / "dcp")
            ck = torch.load(resume_from / "rng.pt", weights_only=True)
        else:
            ck = torch.load(resume_from / "optimizer.pt", weights_only=True)
            tr.opt.load_state_dict(ck["optimizer"])
        random.setstate(ck["rng"]["python"])
        torch.set_rng_state(ck["rng"]["torch"])
        log(f"resumed from {resume_from} (step {state['step']})")
        return state["step"], state["data_position"]
    if cfg.optimizer_from is not None:
        tr.opt.load_state_dict(_optimizer_state(Path(cfg.optimizer_from), cfg.lr))
    return 0, 0


def _truncate_metrics(out: Path, last_step: int) -> None:
    """On resume, steps after the checkpoint are recomputed: drop their lines so each step is logged once."""
    f = out / "metrics.jsonl"
    if not f.exists():
        return
    keep = [ln for ln in f.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= last_step]
    (out / "metrics.jsonl.tmp").write_text("".join(ln + "\n" for ln in keep))
    os.replace(out / "metrics.jsonl.tmp", f)


def _check_prompt_render(processor, group: dict) -> None:
    """The stored ``prompt_ids`` are what this processor renders (else the log-probs are of another prompt)."""
    from dfgen.policy import prompt_inputs

    pi = prompt_inputs(processor, [group["question"]], [group["_image"]])
    if group.get("prompt_ids") is not None and pi["input_ids"][0].tolist() != list(group["prompt_ids"]):
        raise UserError("the policy's processor renders prompts differently from the shards' prompt_ids; "
                        "train the checkpoint family that sampled them")


def _repair_stats(groups: list) -> dict:
    """Failed rollouts of these groups, those with a verified repair, and the tokens their repairer generated."""
    failed = [r for g in groups for r in g["rollouts"] if r["reward"] < 1]
    return {"failed": len(failed), "repaired": sum(r.get("repair_status") == "ok" for r in failed),
            "repair_gen_tokens": sum(r.get("repair_gen_tokens") or 0 for g in groups for r in g["rollouts"])}


def _step_record(step: int, batch, res: dict, dt: float, rep: dict, par) -> dict:
    """The metrics.jsonl line of one step (rep: ``_repair_stats`` of its groups). Its counts are
    summed over data-parallel ranks, so the line describes the whole step, as one process's would;
    ``pad_frac`` is the ranks' mean and ``tok_per_s`` the whole job's."""
    roll = ~batch.is_repaired  # (B,) sampled rollouts
    df = batch.df_weighted  # (B,) failed with a verified repair
    c = par.reduce_metrics({
        "rollouts": int(roll.sum()), "reward": float(batch.reward[roll].sum()),
        "adv_abs": float(batch.advantages[roll].abs().sum()), "df_rows": int(df.sum()),
        "df_marked": float(batch.mask_bad[df].sum()), "df_tokens": float(batch.completion_mask[df].sum()),
        "repaired_samples": int(batch.is_repaired.sum()), "tokens": res["tokens"], "pad_frac": res["pad_frac"],
        **rep})
    return {"step": step, "loss": round(res["loss"], 6), "reward": c["reward"] / c["rollouts"],
            "adv_abs_mean": c["adv_abs"] / c["rollouts"],
            "mask_density": c["df_marked"] / max(1.0, c["df_tokens"]) if c["df_rows"] else None,
            "repaired_samples": int(c["repaired_samples"]), "grad_norm": round(res["grad_norm"], 5),
            "repair_rate": round(c["repaired"] / c["failed"], 4) if c["failed"] else None,
            "repair_gen_tokens": int(c["repair_gen_tokens"]),
            "tok_per_s": round(c["tokens"] / dt, 1), "step_s": round(dt, 4),
            "pad_frac": round(c["pad_frac"] / par.world, 4), **{k: round(v, 6) for k, v in res["metrics"].items()}}


def _log_step(metrics_f, rec: dict, cfg: FitConfig, log) -> None:
    metrics_f.write(json.dumps(rec) + "\n")
    metrics_f.flush()
    if rec["step"] % cfg.log_every == 0 or rec["step"] == cfg.steps:
        log(f"step {rec['step']}/{cfg.steps} | loss {rec['loss']:.4f} | reward {rec['reward']:.3f} | "
            f"clip {rec.get('clipfrac', 0):.3f} | {rec['tok_per_s']:.0f} tok/s")


def _ddp_audit(model, seen_ids: list, cfg: FitConfig, n_groups: int, out: Path, rank: int, world: int) -> None:
    """Data-parallel contract, checked by the ranks themselves (only they hold their replica and the
    ids they trained on): identical replicas, disjoint data; rank 0 writes ``ddp_check.json``."""
    import torch

    from dfgen.shards import write_json_atomic

    with torch.no_grad():
        checksum = float(sum(p.double().sum() for p in model.parameters()))
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, (checksum, seen_ids))
    if rank == 0:
        sums, ids = [g[0] for g in gathered], [set(g[1]) for g in gathered]
        write_json_atomic(out / "ddp_check.json", {
            "world": world, "checksums": sums,
            "replicas_identical": max(sums) - min(sums) <= 1e-6 * max(1.0, abs(sums[0])),
            "disjoint_data": all(not (ids[i] & ids[j]) for i in range(world) for j in range(i + 1, world))
            if cfg.steps * cfg.groups_per_step * world <= n_groups else None})


def _next_batch(stream, cfg: FitConfig, processor, seen_ids: list, check: bool, par):
    """The next step's Batch: ``grad_accum`` takes of ``groups_per_step`` groups (advantages per take,
    as adv_scale batch defines them: its std over every rank's take), its denominators over every
    rank's rows (``dftrain.parallel``); the first take of a run checks the shards' prompt rendering.
    Returns (batch, ``_repair_stats``)."""
    import torch

    from dftrain.batch import Batch, build_rows, norm_of

    rows, taken = [], []
    for k in range(cfg.grad_accum):
        groups = stream.take(cfg.groups_per_step)
        if check and k == 0:
            _check_prompt_render(processor, groups[0])
        seen_ids.extend(g["id"] for g in groups)
        std = None
        if par.world > 1 and cfg.adv_scale == "batch":
            (every,) = par.gather([float(r["reward"]) for g in groups for r in g["rollouts"]])
            std = torch.tensor(every).std().item() if len(every) > 1 else 0.0
        rows.extend(build_rows(groups, cfg, std))
        taken.extend(groups)
    batch = Batch.from_rows(rows, cfg)
    if par.world > 1:
        lengths, repaired = par.gather(batch.completion_mask.sum(-1).long().tolist(),
                                       batch.is_repaired.tolist())
        batch.norm = norm_of(torch.tensor(lengths), torch.tensor(repaired), cfg)
    return batch, _repair_stats(taken)


def _setup(cfg: FitConfig, par, resume_from, log):
    """(Trainer, shards): data checked, models loaded and wrapped for the data-parallel mode, the
    optimizer built over the (possibly sharded) trainable parameters, the shared-prefix forward on
    where the model's family is served by it exactly (else the plain forward, said once)."""
    import torch

    from dfgen.models import family_of
    from dfgen.policy import suppress_ids

    load_dir = resume_from if resume_from and cfg.lora_rank == 0 else cfg.model
    shards = _open_data(cfg, load_dir)
    model, processor, ref_model = _load_models(cfg, par, load_dir, resume_from)
    module = par.wrap(model, cfg.fsdp_mixed_precision)  # FSDP shards in place: before the optimizer
    if ref_model is not None and par.mode == "fsdp":
        par.wrap(ref_model, cfg.fsdp_mixed_precision)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    temperature = float(shards.meta.get("sampling", {}).get("temperature", 1.0)) or 1.0
    why = None if not cfg.shared_prefix else (
        f"the {family_of(model).name} family is not served by the shared-prefix forward"
        if not family_of(model).shared_prefix else
        "--gradient-checkpointing recomputes layers, and with them the prompt's key/value cache, so the "
        "shared-prefix forward is off" if cfg.gradient_checkpointing else None)
    if why and par.main:
        log(f"{why}: every completion runs its own prompt (plain forward)")
    shared = cfg.shared_prefix and why is None
    return Trainer(module, params, opt, processor, cfg, suppress_ids(processor.tokenizer), temperature,
                   ref_model, par, shared), shards


def run_fit(cfg: FitConfig, log=print) -> dict:
    """Train as configured; returns {"losses": per step, "seconds", "steps": steps run here}."""
    import torch

    from dfgen.shards import clear_done, config_json, mark_done, write_json_atomic
    from dftrain.data import GroupStream
    from dftrain.parallel import Parallel
    from dftrain.tracking import Reporter

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise UserError("--fsdp shards over processes: launch with torchrun --nproc-per-node N (N >= 2)")
    par = Parallel.start(cfg.fsdp)
    out = Path(cfg.out)
    resume_from = _resume_point(cfg, out)
    tr, shards = _setup(cfg, par, resume_from, log)
    start, position = _restore(tr, resume_from, log)
    stream = GroupStream(shards, seed=cfg.seed, buffer_size=cfg.buffer_size, rank=par.rank, world=par.world,
                         skip=position, decode=True)
    if par.main:
        out.mkdir(parents=True, exist_ok=True)
        clear_done(out)
        write_json_atomic(out / "fit_config.json", config_json(cfg))
        if cfg.resume:
            _truncate_metrics(out, start)
    metrics_f = open(out / "metrics.jsonl", "a") if par.main else None
    reporter = Reporter(out, cfg.report_to, config_json(cfg), start) if par.main else None
    losses, seen_ids, t_start = [], [], time.time()
    try:
        for step in range(start, cfg.steps):
            t0 = time.time()
            batch, rep = _next_batch(stream, cfg, tr.processor, seen_ids, step == start, par)
            res = train_step(tr, batch)
            rec = _step_record(step + 1, batch, res, time.time() - t0, rep, par)
            losses.append(res["loss"])
            if par.main:
                _log_step(metrics_f, rec, cfg, log)
                reporter.log(rec)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                save_checkpoint(tr, step + 1, stream.position, out)
        save_checkpoint(tr, cfg.steps, stream.position, out, final=True)
    finally:
        if par.main:
            metrics_f.close()
            reporter.close()
    if par.main:
        mark_done(out, {"steps": cfg.steps, "final_loss": losses[-1] if losses else None})
    if par.mode == "ddp":
        _ddp_audit(tr.module.module, seen_ids, cfg, shards.num_rows(), out, par.rank, par.world)
    par.stop()
    return {"losses": losses, "seconds": round(time.time() - t_start, 2), "steps": cfg.steps - start}
