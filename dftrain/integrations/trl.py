"""Differential Feedback inside TRL's ``GRPOTrainer``: ``DFGRPOTrainer`` (``pip install '.[trl]'``, trl 1.16).

A TRL user adds DF to a GRPO run by changing the trainer class and naming a repairer; the rest of
the script (model, reward functions, ``GRPOConfig``, dataset) stays as it is::

    from dftrain.integrations.trl import DFConfig, DFGRPOTrainer
    trainer = DFGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=ds,
                            processing_class=processor, df=DFConfig(), repairer="oracle")

What happens to each generation batch, after TRL has generated, scored and computed its advantages:

1. Every completion with advantage A_i < 0 is repaired: ``repairer="oracle"`` uses the dataset's
   ``solution`` column (the synthetic task's step solution, ``dfgen.repairers.oracle``: the smallest
   correct line edit); ``repairer="sibling"`` takes the group's best completion nearest to it in token
   edit distance (no generation, no solution; groups that span processes are gathered); any callable
   ``(row, completion_text) -> repaired text or None`` works too (a model prompted to repair).
   ``row`` is the dataset row of that prompt.
2. The completion's token ids and the repair's (the repair text tokenized, EOS appended when the
   completion ended with one) are aligned by ``dfgen.align.align`` (token Levenshtein): the edited
   tokens (``mask_bad``) and the first edit (``root_bad``).
3. The advantages become (B, T): A_i * w_t with w = ``dftrain.loss.df_token_weights`` (``kappa``,
   ``marked``, ``delta``, ``mass``, as ``dftrain fit``) on repaired rows and 1 on every other token,
   times the completion mask. TRL's own ``_compute_loss`` accepts (B, T) advantages (its comment says
   so), so the loss, its aggregation and the clip stay TRL's.

TRL's metrics gain ``df/repaired_frac`` (repaired share of the negative-advantage completions),
``df/mask_density`` (the tokens ``marked`` puts at full weight, per completion token of the repaired
ones) and ``df/repair_errors`` (rows whose repairer raised or returned a non-str: each a skip with one
warning naming the repairer and the row; ``DFConfig(strict_repairs=True)`` stops instead).
``repairer="oracle"`` on a ``train_dataset`` without a ``solution`` column is refused at construction.
A repair counts only if it rewrites at most ``max_edit_ratio`` of the completion's tokens (``dfgen
repair``'s limit) and, with ``verify_repairs`` (default), TRL's own reward functions give it its
group's top reward (``verify_repairs``: one more reward call per batch, on the repairs; reward
functions that log see it too). ``df/verified_frac`` is the counted share of proposed repairs.

Where DF weights are meaningful, and what is refused at construction (one-line ``ValueError``):
the token-level losses (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``cispo``, ``sapo``) take them per
token. ``vespo`` and ``luspo`` turn the advantage into a per-sequence weight, and
``importance_sampling_level="sequence"`` differentiates the sequence ratio, which spreads each
token's weight over the whole sequence (``dftrain/loss.py``, "gspo"): refused (``dftrain fit
--policy-loss gspo`` is GSPO with per-token credit).

Equal to stock ``GRPOTrainer`` when kappa = 1 (same loss and gradients), and its advantages equal
``df_token_weights`` for the same rows: ``tests/test_trl_integration.py``.
Not done: a built-in ``model`` or ``resample`` repairer (pass a callable).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from trl import GRPOTrainer

from dfgen.repair import RepairConfig as _RepairDefaults  # dfgen repair's limit, one declaration
from dftrain.integrations import repair_masks, resolve_repairer
from dftrain.settings import DFWeights

TOKEN_LEVEL_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")


@dataclass(frozen=True)
class DFConfig:
    """The DF token-weight settings this trainer carries, with ``dftrain fit``'s defaults
    (``dftrain.settings.DFWeights``). Repaired samples and all-fail blame are not carried yet."""

    kappa: float = DFWeights.kappa  # weight of the unmarked tokens of a repaired failed completion (1 = GRPO)
    marked: str = DFWeights.marked  # root | root+prop | edit, as dftrain fit
    delta: float = DFWeights.delta  # root+prop: weight of the later edited tokens
    mass: str = DFWeights.mass  # keep | redistribute
    strict_repairs: bool = False  # a repairer that raises or returns a non-str stops training (default: skip it)
    verify_repairs: bool = True  # a repair counts only if the reward functions give it its group's top reward
    max_edit_ratio: float = _RepairDefaults.max_edit_ratio  # and it rewrites at most this share of the tokens


def check_trl_args(args) -> None:
    """One-line ValueError for TRL settings under which per-token DF weights are not per-token."""
    if args.loss_type not in TOKEN_LEVEL_LOSSES:
        raise ValueError(f"DF needs a token-level loss; loss_type={args.loss_type!r} weighs whole sequences "
                         f"(use one of {', '.join(TOKEN_LEVEL_LOSSES)})")
    if args.importance_sampling_level != "token":
        raise ValueError("DF needs importance_sampling_level='token': TRL's sequence-level ratio spreads each "
                         "token's weight over the sequence (dftrain fit --policy-loss gspo keeps it per token)")
    if getattr(args, "use_liger_kernel", False):
        raise ValueError("DF needs TRL's own loss: use_liger_kernel's fused loss takes one advantage per sequence")


class DFGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose advantages carry DF token weights (module docstring)."""

    def __init__(self, *args, df: DFConfig | None = None, repairer="oracle", **kwargs):
        from dftrain.loss import df_token_weights

        self.df = df or DFConfig()
        df_token_weights(torch.zeros(1, 1), torch.ones(1, 1), torch.tensor([True]), kappa=self.df.kappa,
                         root_mask=torch.zeros(1, 1), marked=self.df.marked, delta=self.df.delta,
                         mass=self.df.mass)  # refuses bad DF settings before TRL loads anything
        self.repairer = resolve_repairer(repairer, builtin=("sibling",))
        data = kwargs.get("train_dataset", args[3] if len(args) > 3 else None)
        cols = getattr(data, "column_names", None)
        if repairer == "oracle" and cols is not None and "solution" not in cols:
            raise ValueError("repairer='oracle' needs a 'solution' column (dfgen synth's step solutions); the "
                             f"train_dataset has {', '.join(cols)}: pass a callable repairer")
        targs = kwargs.get("args", args[2] if len(args) > 2 else None)
        if targs is not None:
            check_trl_args(targs)  # before TRL loads the model or the reference
        super().__init__(*args, **kwargs)
        check_trl_args(self.args)

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        adv = out["advantages"]
        if adv.dim() != 1:  # already per token (another subclass): leave it alone
            return out
        mask_bad, root, failed, stats = self.df_masks(inputs, out["completion_ids"], out["completion_mask"], adv)
        out["advantages"] = adv[:, None] * self.df_weights(mask_bad, root, failed, out["completion_mask"])
        mode = "train" if self.model.training else "eval"
        for k, v in stats.items():
            self._metrics[mode][k].append(v)
        return out

    def df_masks(self, rows: list[dict], completion_ids, completion_mask, advantages):
        """(mask_bad, root_bad) as (B, T) float, failed (B,) bool (A < 0 and repaired), and metrics."""
        tok = getattr(self.processing_class, "tokenizer", self.processing_class)
        verify = (lambda texts, ids, cands: self.verify_repairs(rows, texts, ids, cands)) \
            if self.df.verify_repairs else None
        lengths = completion_mask.sum(-1).tolist()
        repairer = self.sibling_proposals(tok, completion_ids, lengths, advantages) \
            if self.repairer == "sibling" else self.repairer
        return repair_masks(tok, rows, completion_ids, lengths, (advantages < 0).tolist(),
                            repairer, marked=self.df.marked, strict=self.df.strict_repairs,
                            max_edit_ratio=self.df.max_edit_ratio, verify=verify)

    def _group_size(self) -> int:
        """G of the batch being scored (TRL's eval batches may use ``num_generations_eval``)."""
        return self.num_generations if self.model.training else (getattr(self, "num_generations_eval", None)
                                                                  or self.num_generations)

    def sibling_proposals(self, tok, completion_ids, lengths, advantages) -> dict[int, str]:
        """``repairer="sibling"``: for each completion with A < 0, the completion of its group with the
        group's top advantage (above zero) nearest to it in token edit distance. Groups may span
        processes, so every process gathers the batch's ids and advantages (TRL's gathered order)."""
        from accelerate.utils import gather_object
        from rapidfuzz.distance import Levenshtein

        B = len(lengths)
        mine = [(completion_ids[i, : int(lengths[i])].tolist(), float(advantages[i])) for i in range(B)]
        every = gather_object(mine) if self.accelerator.num_processes > 1 else mine
        G = self._group_size()
        base, out = self.accelerator.process_index * B, {}
        for i, (ids, a) in enumerate(mine):
            if a >= 0:
                continue
            g = (base + i) // G
            group = every[g * G:(g + 1) * G]
            top = max(x[1] for x in group)
            best = [x[0] for x in group if x[1] > 0 and x[1] >= top - 1e-6]
            if best:
                out[i] = tok.decode(min(best, key=lambda s: Levenshtein.distance(ids, s)), skip_special_tokens=True)
        return out

    def verify_repairs(self, rows: list[dict], texts: list[str], ids: list[list[int]], cands: dict) -> set[int]:
        """The rows whose repair TRL's own reward functions (with ``reward_weights``) score at least as
        high as the best completion of its group. One ``_calculate_rewards`` call on this process's
        completions followed by their repairs (the completion itself where there is none), so every
        process makes the same call and TRL's gather lines up; groups are read in TRL's gathered order."""
        from trl.data_utils import is_conversational

        B = len(rows)
        rep = [cands[i][0] if i in cands else texts[i] for i in range(B)]
        rep_ids = [cands[i][1] if i in cands else ids[i] for i in range(B)]
        conv = is_conversational(rows[0])
        comps = [[{"role": "assistant", "content": t}] if conv else t for t in texts + rep]
        prompts = [r["prompt"] for r in rows] * 2
        per_func = self._calculate_rewards(list(rows) * 2, prompts, comps, ids + rep_ids)  # gathered: (P * 2B, F)
        r = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1).view(-1, 2, B)
        G = self._group_size()
        top = r[:, 0].reshape(-1, G).max(dim=1).values  # each group's best completion, all processes
        base = self.accelerator.process_index * B
        mine = r[self.accelerator.process_index, 1]
        return {i for i in cands if float(mine[i]) >= float(top[(base + i) // G]) - 1e-6}

    def df_weights(self, mask_bad, root, failed, completion_mask):
        from dftrain.loss import df_token_weights

        cm = completion_mask.to(mask_bad.device, torch.float32)
        w = df_token_weights(mask_bad, cm, failed, kappa=self.df.kappa, root_mask=root, marked=self.df.marked,
                             delta=self.df.delta, mass=self.df.mass)  # (B, T)
        return w.to(completion_mask.device)
