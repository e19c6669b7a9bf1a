"""Data parallelism for ``dftrain fit``: one process (``none``), DDP replicas, or FSDP2 shards.

Under ``torchrun`` every rank takes every world-th prompt group of the shared seeded order
(``dftrain.data.GroupStream``), so a step of W ranks with ``--groups-per-step G`` trains on the
same W x G groups as one process with ``--groups-per-step W*G``, and gives the same loss and update:

* **one denominator.** The step's ``StepNorm`` (``dftrain.batch``) is computed over the rows of all
  ranks (their completion lengths and repaired flags are gathered, a few numbers per row), so each
  rank's loss is its exact share of the whole step's, as a micro-batch's is of a rank's;
* **sum, not mean.** DDP and FSDP average gradients over ranks; each rank back-propagates
  ``world x`` its share, so the averaged gradient is the gradient of the summed loss. The logged
  loss and loss metrics are summed over ranks (``ratio_max``: the max), as over micro-batches;
* gradients are synchronised once per update, on its last micro-batch.

``--adv-scale batch`` takes the reward std over each rank's own groups (every other scale is per
group, hence the same on any number of ranks); the row counts in ``metrics.jsonl`` (reward,
mask density, repaired samples) are rank 0's.

``--fsdp``: ``torch.distributed.fsdp.fully_shard`` (FSDP2) on each block the model declares
unsplittable (transformers' ``_no_split_modules``: decoder layers and vision blocks), then on the
whole model; ``--fsdp-mixed-precision bfloat16`` gathers parameters in bf16 for compute and
reduces gradients in fp32 (``MixedPrecisionPolicy``); ``--gradient-checkpointing`` recomputes
activations. On CPU the process group is gloo. A checkpoint writes the model and AdamW state
sharded, each rank its own part, through ``torch.distributed.checkpoint`` (``dcp/`` in the step
folder), plus the full model as a plain HF folder (gathered on rank 0) that transformers and vLLM
load; ``--resume`` reads the shards back (same world size). The step folder appears by one
rename after every rank has written, so a rank killed mid-step or mid-save leaves the previous
checkpoint as it was.

Run (2 nodes x 8 GPUs): ``torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d
--rdzv-endpoint HOST:29500 -m dftrain.cli fit --fsdp --data DF --model M --out OUT``
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dfgen.errors import UserError

MODES = ("none", "ddp", "fsdp")


@dataclass
class Parallel:
    """How this process trains beside the others: ``mode`` (none | ddp | fsdp), ``rank``, ``world``."""

    mode: str = "none"
    rank: int = 0
    world: int = 1

    @classmethod
    def start(cls, fsdp: bool) -> "Parallel":
        """Join ``torchrun``'s process group (gloo on CPU, nccl on GPUs); ``none`` when run alone."""
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        if world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls("fsdp" if fsdp else "ddp" if world > 1 else "none", rank, world)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def stop(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    # ------------------------------------------------------------------ the model
    def wrap(self, model, mixed_precision: str = "none", device=None):
        """The module to train: the model itself, DDP around it, or the model sharded in place (FSDP2)."""
        if self.mode == "ddp":
            return torch.nn.parallel.DistributedDataParallel(model)
        if self.mode == "fsdp":
            shard(model, self.world, mixed_precision, device)
        return model

    def sync(self, module, last: bool):
        """Context of one micro-batch's backward: gradients are reduced across ranks on the last only."""
        if self.mode == "ddp" and not last:
            return module.no_sync()
        if self.mode == "fsdp":
            module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    @property
    def loss_scale(self) -> float:
        """DDP and FSDP average gradients over ranks: back-propagate this times a rank's share."""
        return float(self.world) if self.mode in ("ddp", "fsdp") else 1.0

    def clip_grad_norm(self, params, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor

    # ------------------------------------------------------------------ the step
    def gather_rows(self, lengths: torch.Tensor, is_repaired: torch.Tensor):
        """(completion lengths, repaired flags) of the rows of every rank's share of the step."""
        if self.world == 1:
            return lengths, is_repaired
        parts = [None] * self.world
        torch.distributed.all_gather_object(parts, (lengths.tolist(), is_repaired.tolist()))
        return (torch.tensor([n for p in parts for n in p[0]]), torch.tensor([r for p in parts for r in p[1]]))

    def reduce_metrics(self, values: dict) -> dict:
        """A step's loss and loss metrics (each a rank's share) summed over ranks; ``ratio_max``: the max."""
        if self.world == 1 or not values:
            return values
        from dftrain.loss import METRIC_REDUCE

        names = sorted(values)
        for op, pick in ((torch.distributed.ReduceOp.SUM, lambda n: n not in METRIC_REDUCE),
                         (torch.distributed.ReduceOp.MAX, lambda n: n in METRIC_REDUCE)):
            sel = [n for n in names if pick(n)]
            if sel:
                t = torch.tensor([float(values[n]) for n in sel], dtype=torch.float64)
                torch.distributed.all_reduce(t, op=op)
                values.update(dict(zip(sel, t.tolist())))
        return values

    # ------------------------------------------------------------------ checkpoints
    def full_state_dict(self, model) -> dict | None:
        """FSDP: the whole model's weights, gathered on rank 0 (None on the others). Else None: the
        model's own ``state_dict`` is whole."""
        if self.mode != "fsdp":
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        names: dict = {}  # a tied weight (e.g. lm_head = embed_tokens) is written once, as save_pretrained does
        for n, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(n)
        tied = {n for group in names.values() for n in group[1:]}
        return {k: v for k, v in sd.items() if k not in tied} if self.main else None

    def save_shards(self, model, opt, folder: Path) -> None:
        """FSDP: model and optimizer state, each rank its shard, into ``folder`` (torch.distributed.checkpoint)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder))

    def load_shards(self, model, opt, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def shard(model, world: int, mixed_precision: str = "none", device=None) -> int:
    """``fully_shard`` each block class in ``model._no_split_modules``, then the model; returns the
    number of blocks sharded. A model that declares no such block is refused (nothing to shard by)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or [])
    targets = [m for m in model.modules() if type(m).__name__ in blocks]
    if not targets:
        raise UserError(f"--fsdp: {type(model).__name__} declares no decoder blocks (_no_split_modules) to shard by")
    dev = "cuda" if device is not None and str(device).startswith("cuda") else "cpu"
    mesh = init_device_mesh(dev, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if mixed_precision == "bfloat16" else None,
                              reduce_dtype=torch.float32)
    for m in targets:
        fully_shard(m, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return len(targets)
