"""One optimizer step of ``dftrain fit`` as one typed object: ``Batch``.

From shard to loss under one name
---------------------------------
``build_rows`` flattens a step's prompt groups into ``TrainRow`` s, one per training sequence: a
sampled rollout, or the verified repair of one (its ``repaired_ids``/``repaired_logprobs`` become the
row's ``token_ids``/``logprobs``). ``Batch.from_rows`` pads them once into (B, T) tensors that keep
the shard column names (``dfgen.shards.ROLLOUT``) all the way to the loss:

    token_ids, logprobs (behaviour), mask_bad, root_bad, mask_repaired     as the shard columns
    completion_mask                                                         1 on completion tokens
    advantages, reward, is_repaired, df_weighted, root_only                 one per row, (B,)

``dftrain.loss.batch_token_weights`` turns the masks into DF's token weights inside the objective;
every objective has one signature, ``(logprobs, batch, cfg) -> (loss, metrics)``.

The step's denominator
----------------------
Every aggregation of ``dftrain.loss`` is a sum over rows divided by one number of the step: its
completion tokens (token-mean), its sequences (seq-mean-*), or sequences x its longest completion
(seq-mean-token-sum-norm), counting repaired rows only where asked. ``Batch.from_rows`` computes that
number (``norm``, a ``dftrain.loss.StepNorm``) once over *all* the step's rows; ``Batch.split(n)``
cuts the rows into micro-batches that carry the same ``norm``. Each micro-batch's loss is therefore
its exact share of the step's loss, the shares sum to it, and so do their gradients and metrics
(``dftrain.loss.reduce_metrics``): ``--micro-batch`` changes memory, never the objective.
(``tests/test_batch.py`` checks this for every aggregation, policy loss, KL on and off, with and
without repaired rows, at micro-batch sizes 1, 2, 3 and whole, rows in step order and packed.)

Packing: ``split(n, by_length=True)`` (``dftrain fit --pack``, the default) orders the step's rows by
completion length before cutting, so a micro-batch holds rows of like length and little padding.
Completion lengths of a GRPO step are long-tailed: in step order every micro-batch pads to its
longest row; packed, only the last one does.

Model inputs (the rendered prompt, image included, with the completion appended) stay opaque
(STYLE 6): ``model_inputs(processor)`` builds them per micro-batch from ``prompts`` and
``token_ids`` and keeps them for the step's further updates.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from dfgen.errors import UserError


@dataclass
class TrainRow:
    """One training sequence of a step, its fields named as the shard columns they come from
    (``dfgen.shards.ROLLOUT``): a sampled rollout, or (``repaired``) the verified repair of one,
    whose ``token_ids``/``logprobs`` are the rollout's ``repaired_ids``/``repaired_logprobs``."""

    prompt: tuple  # (question, decoded image) of its prompt group
    token_ids: list
    logprobs: list  # behaviour log-probs of token_ids (the loss's old_logprobs)
    advantage: float  # group-relative; a repaired sample's is --repaired-weight
    reward: float
    repaired: bool = False
    df_weighted: bool = False  # df-grpo, failed, with a verified repair: DF token weights apply
    mask_bad: list | None = None  # edit mask of a df_weighted rollout
    root_bad: list | None = None  # root-cause mask of a df_weighted rollout
    mask_repaired: list | None = None  # edit mask of a repaired sample
    root_only: bool = False  # --fail-advantage: an all-fail group's repaired rollout, weight on its root token only


def _all_fail(g: dict) -> bool:
    """Every rollout of the group failed with the same reward: GRPO's advantages are all 0 there."""
    rewards = [r["reward"] for r in g["rollouts"]]
    return all(x < 1 for x in rewards) and len(set(rewards)) == 1


def build_rows(groups: list[dict], cfg, batch_std: float | None = None) -> list[TrainRow]:
    """Flatten prompt groups (decoded: ``_image``) into training sequences: rollouts, then each
    group's distinct verified repairs when the objective is DF's and ``cfg.repaired_weight > 0``.
    cfg: the fit settings (objective, adv_scale, DF weights, dedup_repaired); batch_std: adv_scale
    batch's reward std over a batch larger than ``groups`` (every data-parallel rank's share)."""
    from dftrain.loss import OBJECTIVES, group_advantages

    rewards = torch.tensor([float(r["reward"]) for g in groups for r in g["rollouts"]])
    gidx = torch.tensor([k for k, g in enumerate(groups) for _ in g["rollouts"]])
    adv = iter(group_advantages(rewards, gidx, scale=cfg.adv_scale, batch_std=batch_std).tolist())
    use_df = OBJECTIVES[cfg.objective].token_weights
    rows = []
    for g in groups:
        seen, prompt = set(), (g["question"], g["_image"])
        all_fail = use_df and cfg.fail_advantage > 0 and _all_fail(g)
        for r in g["rollouts"]:
            a = next(adv)
            ok = use_df and r.get("repair_status") == "ok" and r.get("mask_bad") is not None
            if ok and (cfg.marked != "edit" or all_fail) and r.get("root_bad") is None:
                need = f"--marked {cfg.marked}" if cfg.marked != "edit" else "--fail-advantage"
                raise UserError(f"{need} needs the root_bad mask, which a rollout of prompt "
                                f"{g.get('id')!r} lacks: rerun dfgen mask on these shards, or pass --marked edit")
            weighted = ok and r["reward"] < 1
            root_only = weighted and all_fail
            rows.append(TrainRow(prompt, r["token_ids"], r["logprobs"], -cfg.fail_advantage if root_only else a,
                                 r["reward"], df_weighted=weighted, mask_bad=r["mask_bad"] if weighted else None,
                                 root_bad=r.get("root_bad") if weighted else None, root_only=root_only))
            if weighted and cfg.repaired_weight > 0 and not (cfg.dedup_repaired and tuple(r["repaired_ids"]) in seen):
                seen.add(tuple(r["repaired_ids"]))
                rows.append(TrainRow(prompt, r["repaired_ids"], r["repaired_logprobs"], cfg.repaired_weight, 1.0,
                                     repaired=True, mask_repaired=r["mask_repaired"]))
    return rows


def _pad(seqs: list, T: int, dtype=torch.float32) -> Tensor:
    """(B, T) right-padded with 0; a None row is all 0."""
    t = torch.zeros((len(seqs), T), dtype=dtype)
    for i, s in enumerate(seqs):
        if s is not None and len(s):
            t[i, : len(s)] = torch.as_tensor(s, dtype=dtype)
    return t


def norm_of(lengths: Tensor, is_repaired: Tensor, cfg):
    """The denominators (``dftrain.loss.StepNorm``) of a step whose rows have these completion
    lengths (B,) and repaired flags (B,), under cfg (objective, agg, rep_in_denominator). Under data
    parallelism the rows are every rank's (``dftrain.parallel``)."""
    from dftrain.loss import OBJECTIVES, step_norm

    T = max(1, int(lengths.max()))
    cm = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(-1)).float()  # (B, T)
    return step_norm(cm, is_repaired, cfg.agg, rep_in_denominator=cfg.rep_in_denominator,
                     trains_repaired=OBJECTIVES[cfg.objective].token_weights)


@dataclass
class Batch:
    """A step (``from_rows``) or one micro-batch of it (``split``). Tensors are (B, T) or (B,)."""

    token_ids: Tensor  # (B, T) int64, 0 past each row's end
    logprobs: Tensor  # (B, T) behaviour log-probs (shard `logprobs`, or `repaired_logprobs` of repaired rows)
    mask_bad: Tensor  # (B, T) 0/1, DF-weighted rollouts only (else 0)
    root_bad: Tensor  # (B, T) 0/1, DF-weighted rollouts only (else 0)
    mask_repaired: Tensor  # (B, T) 0/1, repaired rows only (else 0)
    completion_mask: Tensor  # (B, T) float 0/1
    advantages: Tensor  # (B,) float
    reward: Tensor  # (B,) float (a repaired row's is 1)
    is_repaired: Tensor  # (B,) bool
    df_weighted: Tensor  # (B,) bool: failed with a verified repair, DF weights apply
    root_only: Tensor  # (B,) bool: --fail-advantage row, weight on root_bad alone
    prompts: list  # (question, image) per row
    norm: object  # dftrain.loss.StepNorm of the whole step, shared by its micro-batches
    ref_logprobs: Tensor | None = None  # (B, T) of the frozen reference, filled on first use
    inputs: dict | None = field(default=None, repr=False)  # processor output, filled by model_inputs
    index: Tensor | None = None  # (B,) a micro-batch's rows' positions in its step (None: the step itself)
    groups: list | None = field(default=None, repr=False)  # [(rows, one prompt's inputs)], filled by prompt_groups

    @classmethod
    def from_rows(cls, rows: list[TrainRow], cfg) -> "Batch":
        """Pad a step's rows once and compute its denominators under cfg (objective, agg, rep_in_denominator)."""
        if not rows:
            raise ValueError("a batch needs at least one row")
        T = max(1, max(len(r.token_ids) for r in rows))
        flag = lambda name: torch.tensor([bool(getattr(r, name)) for r in rows])  # noqa: E731
        b = cls(token_ids=_pad([r.token_ids for r in rows], T, torch.long),
                logprobs=_pad([r.logprobs for r in rows], T), mask_bad=_pad([r.mask_bad for r in rows], T),
                root_bad=_pad([r.root_bad for r in rows], T), mask_repaired=_pad([r.mask_repaired for r in rows], T),
                completion_mask=_pad([[1] * len(r.token_ids) for r in rows], T),
                advantages=torch.tensor([float(r.advantage) for r in rows]),
                reward=torch.tensor([float(r.reward) for r in rows]), is_repaired=flag("repaired"),
                df_weighted=flag("df_weighted"), root_only=flag("root_only"), prompts=[r.prompt for r in rows],
                norm=None)
        b.norm = norm_of(b.completion_mask.sum(-1).long(), b.is_repaired, cfg)
        return b

    def __len__(self) -> int:
        return self.token_ids.shape[0]

    def split(self, size: int, by_length: bool = False, by_group: bool = False) -> list["Batch"]:
        """Micro-batches of ``size`` rows (the last may be shorter), each trimmed to its own longest
        completion, all carrying this step's ``norm`` and their rows' positions in the step (``index``).
        ``by_length``: rows are first ordered by completion length (stable), so that rows of like
        length share a micro-batch and little of it is padding; the loss is a sum over rows divided
        by the step's ``norm``, so the order changes nothing but the float summation order.
        ``by_group``: the rows of a prompt group stay together (ordered by length within it when
        ``by_length``), so that a micro-batch runs each of its prompts once (``prompt_groups``)."""
        lengths = self.completion_mask.sum(-1)  # (B,)
        order = torch.sort(lengths, stable=True).indices if by_length else torch.arange(len(self))
        if by_group:
            first: dict = {}
            gid = torch.tensor([first.setdefault(id(self.prompts[i]), len(first)) for i in range(len(self))])
            order = order[torch.sort(gid[order], stable=True).indices]
        out = []
        for k in range(0, len(self), size):
            idx = order[k: k + size]
            T = max(1, int(lengths[idx].max()))
            kw = {f.name: getattr(self, f.name) for f in fields(self)}
            for name, v in kw.items():
                if name in ("inputs", "groups"):
                    kw[name] = None  # rendered per micro-batch
                elif isinstance(v, Tensor):
                    kw[name] = v[idx, :T] if v.dim() == 2 else v[idx]
                elif isinstance(v, list):
                    kw[name] = [v[i] for i in idx.tolist()]
            kw["index"] = idx if self.index is None else self.index[idx]
            out.append(Batch(**kw))
        return out

    def padding_fraction(self, micro: list["Batch"]) -> float:
        """Share of the completion cells of ``micro`` (this step's micro-batches) that are padding."""
        cells = sum(mb.completion_mask.numel() for mb in micro)
        return 1.0 - float(self.completion_mask.sum()) / max(1, cells)

    def to(self, device) -> "Batch":
        """This batch with its tensors on ``device`` (the model's); model inputs are moved when used."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, v in kw.items():
            if isinstance(v, Tensor):
                kw[name] = v.to(device)
        return Batch(**kw)

    def prompt_groups(self, processor) -> list:
        """[(row positions (n,), the inputs of their one prompt, image included)]: the rows grouped by
        prompt (a group's rollouts and repairs share its prompt object), each prompt rendered once;
        built once and kept for the step's further updates (the shared-prefix forward)."""
        if self.groups is None:
            from dfgen.policy import prompt_inputs

            rows: dict = {}
            for i, p in enumerate(self.prompts):
                rows.setdefault(id(p), (p, []))[1].append(i)
            self.groups = [(torch.tensor(idx), prompt_inputs(processor, [p[0]], [p[1]])) for p, idx in rows.values()]
        return self.groups

    def model_inputs(self, processor) -> dict:
        """The processor's inputs for these rows (prompt and image rendered, completion appended), built
        once and kept for the step's further updates."""
        if self.inputs is None:
            from dfgen.policy import completion_inputs, prompt_inputs

            lengths = self.completion_mask.sum(-1).long().tolist()
            completions = [ids[:n].tolist() for ids, n in zip(self.token_ids, lengths)]
            qs, ims = zip(*self.prompts)
            self.inputs, cm = completion_inputs(prompt_inputs(processor, list(qs), list(ims)), completions,
                                                processor.tokenizer.pad_token_id)
            assert cm.shape == self.completion_mask.shape, "completion_inputs pads as Batch does"
        return self.inputs
