"""Data parallelism for ``dftrain fit``: one process (``none``), DDP replicas, or FSDP2 shards.

Under ``torchrun`` every rank takes every world-th prompt group of the shared seeded order
(``dftrain.data.GroupStream``), so a step of W ranks with ``--groups-per-step G`` trains on the
same W x G groups as one process with ``--groups-per-step W*G``, and gives the same loss and update:

* **one denominator.** The step's ``StepNorm`` (``dftrain.batch``) is computed over the rows of all
  ranks (their completion lengths and repaired flags are gathered, a few numbers per row), so each
  rank's loss is its exact share of the whole step's, as a micro-batch's is of a rank's;
* **sum, not mean.** DDP and FSDP average gradients over ranks; each rank back-propagates
  ``world x`` its share, so the averaged gradient is the gradient of the summed loss. The logged
  loss and loss metrics are summed over ranks (``ratio_max``: the max), as over micro-batches,
  and so are the counts behind ``metrics.jsonl``'s reward, mask density and repair figures;
* gradients are synchronised once per update, on its last micro-batch.

``--adv-scale batch`` takes the reward std over every rank's groups of the take (the other scales
are per group).

``--fsdp``: ``torch.distributed.fsdp.fully_shard`` (FSDP2) on each block the model declares
unsplittable (transformers' ``_no_split_modules``: decoder layers and vision blocks), then on the
whole model. Rank 0 alone reads the checkpoint: every other rank builds the model on the meta
device (no memory), and after sharding receives its shard of rank 0's weights (and a copy of its
buffers) by broadcast, so no rank but 0 ever holds the whole model. ``--fsdp-mixed-precision
bfloat16`` gathers parameters in bf16 for compute and reduces gradients in fp32
(``MixedPrecisionPolicy``); ``--gradient-checkpointing`` recomputes activations. On CPU the
process group is gloo. A checkpoint writes the model and AdamW state sharded, each rank its own
part, through ``torch.distributed.checkpoint`` (``dcp/`` in the step folder), plus the full model
as a plain HF folder (gathered on rank 0) that transformers and vLLM load; ``--resume`` reads the
shards back (same world size). The step folder appears by one rename after every rank has
written, so a rank killed mid-step or mid-save leaves the previous checkpoint as it was.

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

    @property
    def device(self) -> str:
        """This rank's device: its local GPU (``LOCAL_RANK``) where torch sees one, else the CPU."""
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"

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
    def load_policy(self, path: Path, dtype=None):
        """``(model, processor)`` on this rank's device. FSDP: ranks other than 0 build the model on
        the meta device from the checkpoint's config, without reading its weights (``wrap`` fills
        their shards)."""
        from dfgen.policy import load_policy, load_processor

        if self.mode != "fsdp" or self.main:
            return load_policy(path, dtype=dtype, device=self.device)
        import transformers

        config = transformers.AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = transformers.AutoModelForImageTextToText.from_config(config, dtype=dtype or torch.float32)
        return model, load_processor(path)

    def wrap(self, model, mixed_precision: str = "none"):
        """The module to train: the model itself, DDP around it, or the model sharded in place (FSDP2;
        a model built on the meta device receives rank 0's weights and buffers)."""
        if self.mode == "ddp":
            return torch.nn.parallel.DistributedDataParallel(model)
        if self.mode == "fsdp":
            full = model.state_dict() if self.main else {}  # the whole tensors, kept until broadcast
            self._match_rank0(model)
            shard(model, self.world, mixed_precision, self.device)
            self._fill_from_rank0(model, full)
        return model

    def _match_rank0(self, model) -> None:
        """Every rank's model has rank 0's tensor names and shapes; a meta tensor takes rank 0's dtype
        (from_pretrained may keep some modules in float32)."""
        mine = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        spec = [[(n, tuple(t.shape), str(t.dtype)) for n, t in mine.items()]]
        torch.distributed.broadcast_object_list(spec, src=0)
        for name, shape, dtype in spec[0]:
            t = mine.pop(name, None)
            if t is None or tuple(t.shape) != shape:
                raise UserError(f"--fsdp: rank {self.rank} built a model unlike rank 0's checkpoint (at {name})")
            if t.is_meta and str(t.dtype) != dtype:
                t.data = t.data.to(getattr(torch, dtype.removeprefix("torch.")))
        if mine:
            raise UserError(f"--fsdp: rank {self.rank} built a model unlike rank 0's checkpoint "
                            f"(at {next(iter(mine))})")

    def _fill_from_rank0(self, model, full: dict) -> None:
        """Materialise a meta-built model's shards and buffers, then broadcast rank 0's weights into
        every rank's shard and rank 0's buffers (non-persistent ones included) over the others'."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
            model.to_empty(device=self.device)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for b in model.buffers():
            torch.distributed.broadcast(b, src=0)

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
    def gather(self, *lists: list) -> tuple[list, ...]:
        """Each list concatenated over every rank's, in rank order (a few numbers per row: a step's
        completion lengths and repaired flags, a take's rewards)."""
        if self.world == 1:
            return lists
        parts = [None] * self.world
        torch.distributed.all_gather_object(parts, lists)
        return tuple([x for p in parts for x in p[i]] for i in range(len(lists)))

    def reduce_metrics(self, values: dict) -> dict:
        """A step's loss and loss metrics (each a rank's share), or its row counts, summed over ranks;
        ``ratio_max``: the max."""
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


def shard(model, world: int, mixed_precision: str = "none", device: str = "cpu") -> int:
    """``fully_shard`` each block class in ``model._no_split_modules``, then the model; returns the
    number of blocks sharded. A model that declares no such block is refused (nothing to shard by)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or [])
    targets = [m for m in model.modules() if type(m).__name__ in blocks]
    if not targets:
        raise UserError(f"--fsdp: {type(model).__name__} declares no decoder blocks (_no_split_modules) to shard by")
    in_block = {id(p) for m in targets for p in m.parameters()}
    for unit in [*targets, model]:  # FSDP2 needs one dtype for the trainable parameters of a unit
        train = [(n, p) for n, p in unit.named_parameters()
                 if p.requires_grad and (unit is not model or id(p) not in in_block)]
        odd = next(((n, p.dtype) for n, p in train if p.dtype != train[0][1].dtype), None)
        if odd:
            raise UserError(f"--fsdp: a shard unit's trainable parameters mix {train[0][1].dtype} and {odd[1]} "
                            f"({odd[0]}, kept so by the checkpoint): use --dtype float32, with "
                            "--fsdp-mixed-precision bfloat16 for bf16 compute")
    mesh = init_device_mesh("cuda" if str(device).startswith("cuda") else "cpu", (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if mixed_precision == "bfloat16" else None,
                              reduce_dtype=torch.float32)
    for m in targets:
        fully_shard(m, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return len(targets)
