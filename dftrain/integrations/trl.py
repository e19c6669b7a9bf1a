"""Differential Feedback inside TRL's ``GRPOTrainer``: ``DFGRPOTrainer`` (``pip install '.[trl]'``, trl 1.16).

A TRL user adds DF to a GRPO run by changing the trainer class and naming a repairer; the rest of
the script (model, reward functions, ``GRPOConfig``, dataset) stays as it is::

    from dftrain.integrations.trl import DFConfig, DFGRPOTrainer
    trainer = DFGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=ds,
                            processing_class=processor, df=DFConfig(), repairer="oracle")

``DFConfig()`` is ``dftrain fit``'s default variant, its fields and defaults inherited from
``dftrain.settings.DFWeights`` (one declaration): root-cause token weights, repaired samples and
all-fail blame. What happens to each generation batch, after TRL has generated, scored and computed
its advantages:

1. **Repair.** DF blames every completion with advantage A < 0 and, where repairs are verified,
   every completion of a group whose rewards are all equal (GRPO's A = 0: it learns nothing there).
   ``repairer="oracle"`` uses the dataset's ``solution`` column (the synthetic task's step solution,
   ``dfgen.repairers.oracle``: the smallest correct line edit); ``repairer="sibling"`` takes the
   group's best completion nearest to it in token edit distance (no generation, no solution; mixed
   groups only; groups that span processes are gathered); ``repairer="resample"`` (or
   ``Resample(...)``) runs ``dfgen``'s first-error search with the trainer's own policy (no solution;
   the dataset needs ``answer`` columns); any callable ``(row, completion_text) -> repaired text or
   None`` works too (a model prompted to repair), its signature checked at construction. ``row`` is
   the dataset row.
2. **Verify.** A repair counts only if it rewrites at most ``max_edit_ratio`` of the completion's
   tokens (``dfgen repair``'s limit) and, with ``verify_repairs`` (default), TRL's own reward
   functions (with ``reward_weights``) give it its group's top reward, or strictly more than the
   group where all rewards are equal (one more reward call per batch; reward functions that log see
   it too). A repairer that raises or returns a non-str is a counted skip with one warning naming the
   repairer and the row (``strict_repairs=True``: ``RepairerError``).
3. **Align.** The completion's token ids and the repair's (the text tokenized, EOS appended when the
   completion ended with one) are aligned by ``dfgen.align.align``: the edited tokens
   (``mask_bad``), the first edit (``root_bad``) and the tokens the repair wrote (``mask_repaired``).
4. **Weigh** (``dftrain.loss`` on (B, T) advantages, which TRL's ``_compute_loss`` accepts):
   a repaired completion with A < 0 gets A * ``df_token_weights`` (``kappa``, ``marked``, ``delta``,
   ``mass``); a repaired completion of an all-equal group gets -``fail_advantage`` on its root-cause
   tokens and 0 elsewhere; every other token keeps TRL's A.
5. **Repaired samples** (``repaired_weight`` > 0): each distinct counted repair of a group joins the
   batch as an extra positive sequence on its completion's row, as ``rep_*`` keys that TRL's shuffle
   and split carry along: advantage ``repaired_weight`` x (``mask_repaired`` + ``kappa_rep`` x the
   rest), behaviour log-probs from the generating policy (one no-grad forward, where TRL keeps old
   log-probs), reference log-probs when beta > 0. The loss is TRL's own ``_compute_loss`` run once
   more on them: the same surrogate, clip and KL, adding their numerator to the rollouts' loss and
   nothing to its denominators (``dftrain fit``'s default ``--no-rep-in-denominator``).

Equal to ``dftrain fit`` term by term: for the same completions, rewards and repairs, the per-token
advantages of rollouts and repaired samples, the loss and its gradient equal ``dftrain.batch`` +
``dftrain.loss``'s to 1e-5 (loss_type ``dapo`` = fit's token-mean, ``grpo`` = seq-mean-token-mean,
with and without KL), and with ``kappa=1, repaired_weight=0, fail_advantage=0`` it is stock
``GRPOTrainer`` (``tests/test_trl_integration.py``).

TRL's metrics gain ``df/repaired_frac`` (counted repairs per blamed completion), ``df/verified_frac``
(counted per proposed), ``df/mask_density`` (the tokens ``marked`` puts at full weight, per token of
the repaired completions), ``df/repair_errors``, ``df/all_fail_blamed``, ``df/repaired_samples`` and
``df/repair_gen_tokens`` (tokens the repairer generated: ``resample``'s probes; 0 for the others),
per generation batch of this process. A batch in which no group has a success or a counted repair
(every advantage 0: DF and GRPO both learn nothing) is reported once, with a warning.

What is refused (one-line ``ValueError``, at construction): bad DF settings; ``fail_advantage`` > 0
without ``verify_repairs`` (only the reward functions tell an all-fail group from an all-success
one); ``repairer="oracle"`` on a ``train_dataset`` without a ``solution`` column; TRL settings where
the weights are not per token: ``vespo`` and ``luspo`` turn the advantage into a per-sequence weight,
``importance_sampling_level="sequence"`` differentiates the sequence ratio, which spreads each
token's weight over the whole sequence (``dftrain/loss.py``, "gspo"; ``dftrain fit --policy-loss
gspo`` is GSPO with per-token credit), and liger's fused loss takes one advantage per sequence.
Not built in: a ``model`` repairer (pass a callable that prompts one).
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from trl import GRPOTrainer

from dfgen.repair import RepairConfig as _RepairDefaults  # dfgen repair's limit, one declaration
from dfgen.repairers import RepairEnv as _RepairEnv  # the resample search's defaults, one declaration
from dftrain.integrations import Repairs, repair_masks, resolve_repairer
from dftrain.settings import DFWeights

TOKEN_LEVEL_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
# what TRL's _compute_loss passes to the model besides the token ids (the prompt's, shared by its repair)
MM_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
           "image_sizes", "image_position_ids")
TYPE_KEYS = ("token_type_ids", "mm_token_type_ids")  # (B, P + C): re-extended to the repair's length
REP = "rep_"  # the repaired samples' keys in TRL's batch dict: rep_completion_ids, rep_advantages, ...


@dataclass(kw_only=True)
class DFConfig(DFWeights):
    """DF's settings in TRL: every ``dftrain.settings.DFWeights`` field with ``dftrain fit``'s default
    (kappa, marked, delta, mass, repaired_weight, kappa_rep, fail_advantage: one declaration), plus
    how repairs are checked. Repaired samples never join the loss's denominators and are deduplicated
    per group (``dftrain fit``'s defaults ``--no-rep-in-denominator --dedup-repaired``)."""

    strict_repairs: bool = False  # a repairer that raises or returns a non-str stops training (default: skip it)
    verify_repairs: bool = True  # a repair counts only if the reward functions give it its group's top reward
    max_edit_ratio: float = _RepairDefaults.max_edit_ratio  # and it rewrites at most this share of the tokens

    def check(self) -> str | None:
        """The first thing wrong with these settings, one line naming the DFConfig field; None if fine."""
        msg = self.check_weights()
        if msg is not None:
            return re.sub(r"--([a-z-]+)", lambda m: m[1].replace("-", "_"), msg)  # DFConfig's names, not the CLI's
        if self.fail_advantage > 0 and not self.verify_repairs:
            return ("fail_advantage blames all-fail groups, which only the reward functions can tell from all-success "
                    "ones: keep verify_repairs=True, or set fail_advantage=0")
        if not self.max_edit_ratio > 0:
            return "max_edit_ratio must be > 0 (token edits per completion token)"
        return None


@dataclass(kw_only=True)
class Resample:
    """``repairer=Resample(...)`` (or ``"resample"``): ``dfgen.repairers.resample``'s first-error
    search, continued by the trainer's own model (the current policy): the longest line prefix of a
    failed completion from which some of ``n`` continuations reach the right answer, then the
    continuation nearest the failure. Defaults are ``dfgen repair``'s (``RepairEnv``); continuations run
    at TRL's ``temperature`` for at most ``max_completion_length`` tokens. Probes are scored by the
    prompt records' own scorer (``dfgen.benchmarks.reward``), so the dataset needs ``answer`` (and
    ``answer_type``) columns and single-message prompts; the repair is then verified by TRL's reward
    functions like any other. Every generated token is counted (``df/repair_gen_tokens``)."""

    n: int = _RepairEnv.resample_n  # continuations per probe
    search: str = _RepairEnv.search  # backward | binary
    min_wins: int = _RepairEnv.min_wins  # right continuations that make a prefix salvageable
    max_probes: int = _RepairEnv.max_probes  # probes per failed completion
    token_budget: int = _RepairEnv.token_budget  # no probe starts once a completion's search generated this many


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


def _question(prompt) -> str:
    """The text of a single-message chat prompt (what ``dfgen``'s rendering takes as the question)."""
    if isinstance(prompt, str):
        return prompt
    content = prompt[-1]["content"]
    return content if isinstance(content, str) else "".join(c.get("text", "") for c in content if c.get("type") == "text")


def check_resample(r: Resample, data) -> None:
    """One-line ValueError where ``Resample`` cannot run: bad settings, or a dataset without the records'
    scorer columns or with prompts ``dfgen`` would render differently from TRL (more than one message)."""
    if r.search not in ("backward", "binary") or min(r.n, r.min_wins, r.max_probes, r.token_budget) < 1 \
            or r.min_wins > r.n:
        raise ValueError(f"Resample settings: search backward|binary, n >= min_wins >= 1, max_probes and "
                         f"token_budget >= 1; got {r}")
    cols = getattr(data, "column_names", None)
    if cols is None:
        return
    if "answer" not in cols:
        raise ValueError("repairer='resample' scores its probes with the records' scorer: the train_dataset needs "
                         f"an 'answer' column (and answer_type); it has {', '.join(cols)}")
    prompt = data[0]["prompt"]
    if not isinstance(prompt, str) and len(prompt) != 1:
        raise ValueError("repairer='resample' continues prompts as dfgen renders them: one user message per "
                         f"prompt, not {len(prompt)}")


@contextmanager
def _swapped(obj, **attrs):
    """Set attributes for the duration of a block, then restore them."""
    old = {k: getattr(obj, k) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


class DFGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with DF's token weights, repaired samples and all-fail blame (module docstring)."""

    def __init__(self, *args, df: DFConfig | None = None, repairer="oracle", **kwargs):
        self.df = df or DFConfig()
        msg = self.df.check()
        if msg is not None:
            raise ValueError(msg)  # before TRL loads anything
        repairer = Resample() if repairer == "resample" else repairer
        self.repairer = repairer if isinstance(repairer, Resample) else resolve_repairer(repairer, builtin=("sibling",))
        data = kwargs.get("train_dataset", args[3] if len(args) > 3 else None)
        cols = getattr(data, "column_names", None)
        if repairer == "oracle" and cols is not None and "solution" not in cols:
            raise ValueError("repairer='oracle' needs a 'solution' column (dfgen synth's step solutions); the "
                             f"train_dataset has {', '.join(cols)}: pass a callable repairer")
        if isinstance(repairer, Resample):
            check_resample(repairer, data)
        targs = kwargs.get("args", args[2] if len(args) > 2 else None)
        if targs is not None:
            check_trl_args(targs)  # before TRL loads the model or the reference
        super().__init__(*args, **kwargs)
        check_trl_args(self.args)

    # ------------------------------------------------------------------ after generation: weights and repairs
    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if out["advantages"].dim() != 1:  # already per token (another subclass): leave it alone
            return out
        adv, cm = out["advantages"], out["completion_mask"]
        const = self._constant_groups(adv)
        rep = self.df_masks(inputs, out["completion_ids"], cm, adv, const)
        blame_all_fail = rep.repaired & const & (self.df.fail_advantage > 0)  # (B,) dftrain's root_only rows
        w = self.df_weights(rep.mask_bad, rep.root_bad, rep.repaired, cm)  # (B, T)
        fail = -self.df.fail_advantage * rep.root_bad.to(w.device) * cm.to(w.dtype)  # (B, T)
        out["advantages"] = torch.where(blame_all_fail.to(w.device)[:, None], fail, adv[:, None] * w)
        stats = dict(rep.stats)
        stats["df/all_fail_blamed"] = float(blame_all_fail.sum())
        if self.df.repaired_weight > 0:
            keep = self._first_in_group(rep)
            out.update(self.repaired_inputs(out, rep, keep))
            stats["df/repaired_samples"] = float(sum(keep))
        mode = "train" if self.model.training else "eval"
        for k, v in stats.items():
            self._metrics[mode][k].append(v)
        self._warn_if_no_signal(out)
        return out

    def _warn_if_no_signal(self, out: dict) -> None:
        """One warning, the first time a generation batch (all processes) has no success and no counted
        repair: every advantage is 0, so DF and GRPO both learn nothing from it."""
        if getattr(self, "_warned_no_signal", False):
            return
        live = (out["advantages"] != 0).any() or (REP + "completion_mask" in out and out[REP + "completion_mask"].any())
        if not any(self._gathered([bool(live)])):
            import warnings

            warnings.warn("no group of this batch has a success or a repair: DF and GRPO both learn nothing here "
                          "(a start that never succeeds needs a warm start first, e.g. dftrain sft)", stacklevel=2)
            self._warned_no_signal = True

    def _group_size(self) -> int:
        """G of the batch being scored (TRL's eval batches may use ``num_generations_eval``)."""
        return self.num_generations if self.model.training else (getattr(self, "num_generations_eval", None)
                                                                  or self.num_generations)

    def _gathered(self, objs: list) -> list:
        from accelerate.utils import gather_object

        return gather_object(objs) if self.accelerator.num_processes > 1 else objs

    def _constant_groups(self, advantages) -> torch.Tensor:
        """(B,) bool: the completion's group has one reward for all (TRL's advantages all 0: GRPO learns
        nothing there). Groups may span processes, so the batch's advantages are gathered."""
        every = torch.tensor(self._gathered(advantages.tolist()))
        G, B = self._group_size(), advantages.shape[0]
        const = (every.view(-1, G).abs().max(dim=1).values < 1e-6).repeat_interleave(G)  # (P * B,)
        base = self.accelerator.process_index * B
        return const[base:base + B]

    def df_masks(self, rows: list[dict], completion_ids, completion_mask, advantages, const=None) -> Repairs:
        """The counted repairs (``Repairs``) of the completions DF blames: those with A < 0 and, where
        repairs are verified and DF uses them (``fail_advantage`` or ``repaired_weight``), those of
        constant-reward groups, where only a repair that beats the group counts."""
        tok = getattr(self.processing_class, "tokenizer", self.processing_class)
        lengths = completion_mask.sum(-1).tolist()
        const = torch.zeros(len(lengths), dtype=torch.bool) if const is None else const
        use_const = self.df.verify_repairs and (self.df.fail_advantage > 0 or self.df.repaired_weight > 0) \
            and self.repairer != "sibling"  # a constant group has no better sibling
        blamed = [bool(a < 0) or (use_const and bool(c)) for a, c in zip(advantages.tolist(), const.tolist())]
        verify = (lambda texts, ids, cands: self.verify_repairs(rows, texts, ids, cands)) \
            if self.df.verify_repairs else None
        gen_tokens = 0
        if self.repairer == "sibling":
            repairer = self.sibling_proposals(tok, completion_ids, lengths, advantages)
        elif isinstance(self.repairer, Resample):
            repairer, gen_tokens = self.resample_proposals(rows, completion_ids, lengths, blamed)
        else:
            repairer = self.repairer
        rep = repair_masks(tok, rows, completion_ids, lengths, blamed, repairer, marked=self.df.marked,
                           strict=self.df.strict_repairs, max_edit_ratio=self.df.max_edit_ratio, verify=verify)
        rep.stats["df/repair_gen_tokens"] = float(gen_tokens)
        return rep

    def resample_proposals(self, rows: list[dict], completion_ids, lengths, blamed) -> tuple[dict[int, str], int]:
        """``Resample``: ``dfgen.repairers.resample`` on the blamed completions that the records' scorer
        says failed, continued by the current policy (eval mode, no grad); ({row: repair text}, tokens
        the search generated)."""
        import io

        from dfgen.backends.hf import HFBackend
        from dfgen.benchmarks import reward
        from dfgen.repairers import RepairEnv
        from dfgen.repairers.resample import propose

        tok = getattr(self.processing_class, "tokenizer", self.processing_class)
        step, rank = self.state.global_step, self.accelerator.process_index
        jobs = []
        for i in (i for i in range(len(rows)) if blamed[i]):
            ids = completion_ids[i, : int(lengths[i])].tolist()
            rec = {k: v for k, v in rows[i].items() if k not in ("prompt", "image")}
            rec |= {"id": f"{step}:{rank}:{i}", "question": _question(rows[i]["prompt"]), "image": None,
                    "rollouts": [{"token_ids": ids}]}
            if reward(rec, tok.decode(ids, skip_special_tokens=True))[1] >= 1:
                continue  # right by the records' scorer: nothing to search for
            if rows[i].get("image") is not None:
                buf = io.BytesIO()
                rows[i]["image"].save(buf, format="PNG")
                rec["image"] = buf.getvalue()
            jobs.append((i, rec))
        if not jobs:
            return {}, 0
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        r = self.repairer
        env = RepairEnv(make_gen=lambda: HFBackend(None, model=model, processor=self.processing_class),
                        tokenizer=tok, max_new_tokens=self.max_completion_length, seed=self.args.seed,
                        temperature=self.temperature, search=r.search, resample_n=r.n, min_wins=r.min_wins,
                        max_probes=r.max_probes, token_budget=r.token_budget)
        try:
            props = propose([(rec, 0) for _, rec in jobs], env)
        finally:
            model.train(was_training)
        out = {i: p.text for (i, _), p in zip(jobs, props) if p.text is not None}
        return out, sum(p.cost.get("repair_gen_tokens", 0) for p in props)

    def sibling_proposals(self, tok, completion_ids, lengths, advantages) -> dict[int, list[int]]:
        """``repairer="sibling"``: for each completion with A < 0, the token ids of the completion of its
        group with the group's top advantage (above zero) nearest to it in token edit distance (ids, not
        text: the repair is exactly what the sibling sampled). Groups may span processes, so every
        process gathers the batch's ids and advantages (TRL's gathered order)."""
        from rapidfuzz.distance import Levenshtein

        B = len(lengths)
        mine = [(completion_ids[i, : int(lengths[i])].tolist(), float(advantages[i])) for i in range(B)]
        every = self._gathered(mine)
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
                out[i] = list(min(best, key=lambda s: Levenshtein.distance(ids, s)))
        return out

    def verify_repairs(self, rows: list[dict], texts: list[str], ids: list[list[int]], cands: dict) -> set[int]:
        """The rows whose repair TRL's own reward functions (with ``reward_weights``) score at least as
        high as the best completion of its group, and strictly higher where the whole group scored the
        same (an all-fail group). One ``_calculate_rewards`` call on this process's completions followed
        by their repairs (the completion itself where there is none), so every process makes the same
        call and TRL's gather lines up; groups are read in TRL's gathered order."""
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
        grouped = r[:, 0].reshape(-1, G)  # each group's completions, all processes
        top, low = grouped.max(dim=1).values, grouped.min(dim=1).values
        base = self.accelerator.process_index * B
        mine = r[self.accelerator.process_index, 1]
        ok = set()
        for i in cands:
            g = (base + i) // G
            margin = 1e-6 if float(top[g] - low[g]) < 1e-6 else -1e-6  # all-fail group: the repair must beat it
            if float(mine[i]) >= float(top[g]) + margin:
                ok.add(i)
        return ok

    def df_weights(self, mask_bad, root, failed, completion_mask):
        from dftrain.loss import df_token_weights

        cm = completion_mask.to(mask_bad.device, torch.float32)
        w = df_token_weights(mask_bad, cm, failed, kappa=self.df.kappa, root_mask=root, marked=self.df.marked,
                             delta=self.df.delta, mass=self.df.mass)  # (B, T)
        return w.to(completion_mask.device)

    # ------------------------------------------------------------------ repaired samples
    def _first_in_group(self, rep: Repairs) -> list[bool]:
        """(B,) the counted repairs to train on: one copy of each distinct repair per group (the first in
        TRL's gathered order, as ``dftrain fit --dedup-repaired``)."""
        B, G = len(rep.ids), self._group_size()
        every = self._gathered([tuple(x) if x is not None else None for x in rep.ids])
        base = self.accelerator.process_index * B
        keep = []
        for i, x in enumerate(rep.ids):
            j, g0 = base + i, (base + i) // G * G
            keep.append(x is not None and tuple(x) not in every[g0:j])
        return keep

    def repaired_inputs(self, out: dict, rep: Repairs, keep: list[bool]) -> dict:
        """The batch's repaired samples as ``rep_*`` keys beside TRL's (one per row, (B, T2), empty where
        the row has none): each shares its row's prompt and image. ``rep_advantages`` is
        ``repaired_weight`` x (``mask_repaired`` + ``kappa_rep`` x the rest) (``dftrain.loss.repaired_term``);
        ``rep_old_per_token_logps`` (the generating policy's teacher-forced log-probs, computed where TRL
        keeps old log-probs: otherwise the current ones are the behaviour's, as for TRL's rows) and
        ``rep_ref_per_token_logps`` (beta > 0) come from one no-grad forward each."""
        from dftrain.loss import repaired_term

        dev, B = out["completion_ids"].device, len(keep)
        T2 = max([len(rep.ids[i]) for i in range(B) if keep[i]] or [1])
        ids = torch.full((B, T2), self._tokenizer.pad_token_id, dtype=torch.long)
        mask, m = torch.zeros((B, T2), dtype=torch.long), torch.zeros((B, T2))
        for i in (i for i in range(B) if keep[i]):
            n = len(rep.ids[i])
            ids[i, :n], mask[i, :n] = torch.tensor(rep.ids[i]), 1
            m[i, :n] = torch.tensor(rep.mask_repaired[i], dtype=torch.float32)
        _, w = repaired_term(m, mask, self.df.repaired_weight, self.df.kappa_rep)  # (B, T2)
        res = {REP + "completion_ids": ids.to(dev), REP + "completion_mask": mask.to(dev),
               REP + "advantages": (self.df.repaired_weight * w).to(dev)}
        with torch.no_grad():
            if "old_per_token_logps" in out:
                res[REP + "old_per_token_logps"] = self._logps(self.model, out, res)
            if "ref_per_token_logps" in out:
                res[REP + "ref_per_token_logps"] = self._ref_logps(out, res)
        return res

    def _model_kwargs(self, inputs: dict, rep: dict) -> dict:
        """The prompt's model inputs for its repair: TRL's multimodal keys as they are, the token-type
        ids cut to the prompt and extended by zeros over the repair."""
        P, T2 = inputs["prompt_ids"].shape[1], rep[REP + "completion_ids"].shape[1]
        kw = {k: inputs.get(k) for k in MM_KEYS}
        for k in TYPE_KEYS:
            v = inputs.get(k)
            kw[k] = None if v is None else torch.cat([v[:, :P], v.new_zeros((v.shape[0], T2))], dim=1)
        return kw

    def _logps(self, model, inputs: dict, rep: dict):
        from trl.models.utils import disable_gradient_checkpointing

        ids, mask = rep[REP + "completion_ids"], rep[REP + "completion_mask"]
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            lp, _, _ = self._get_per_token_logps_and_entropies(
                model, torch.cat([inputs["prompt_ids"], ids], 1), torch.cat([inputs["prompt_mask"], mask], 1),
                ids.shape[1], batch_size=self.args.per_device_train_batch_size, **self._model_kwargs(inputs, rep))
        return lp

    def _ref_logps(self, inputs: dict, rep: dict):
        if self.ref_model is not None:
            return self._logps(self.ref_model, inputs, rep)
        from trl.trainer.utils import use_adapter  # a PEFT model: the base (or the "ref" adapter), as TRL

        model = self.accelerator.unwrap_model(self.model)
        with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
            return self._logps(self.model, inputs, rep)

    # ------------------------------------------------------------------ the loss: TRL's, on both kinds of rows
    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        if REP + "completion_ids" not in inputs:
            return loss
        n = inputs[REP + "completion_mask"].sum().reshape(1)
        if self.accelerator.num_processes > 1:  # every process runs the repaired pass or none does (collectives)
            n = self.accelerator.gather(n)
        if int(n.sum()) == 0:
            return loss
        return loss + self._repaired_loss(model, inputs)

    def _repaired_loss(self, model, inputs: dict):
        """TRL's own ``_compute_loss`` on the repaired samples of this micro-batch (the same surrogate,
        clip, KL and normaliser), so that they add their numerator to the rollouts' loss but nothing to its
        denominators: ``dapo``/``cispo`` divide by the generation batch's rollout tokens, ``grpo``/``sapo``
        by its rollout rows, ``dr_grpo`` by rows x max length, all as for the rollouts; ``bnpo`` divides by
        the micro-batch's tokens, so it is rescaled from the repairs' to the rollouts'. TRL's metrics of
        this pass are dropped (they describe the rollouts); the entropy bonus and aux loss are not
        applied twice. Repairs have no sampling-engine log-probs: their vLLM importance ratio is 1."""
        drop = ("old_per_token_logps", "ref_per_token_logps", "sampling_per_token_logps", "importance_sampling_ratio",
                "tool_mask")
        rep = {k: v for k, v in inputs.items() if not k.startswith(REP) and k not in drop}
        mask = inputs[REP + "completion_mask"]
        rep.update(completion_ids=inputs[REP + "completion_ids"], completion_mask=mask,
                   advantages=inputs[REP + "advantages"], **{k: v for k, v in self._model_kwargs(inputs, inputs).items()
                                                             if k in TYPE_KEYS and v is not None})
        for k in ("old_per_token_logps", "ref_per_token_logps"):
            if REP + k in inputs:
                rep[k] = inputs[REP + k]
        if "importance_sampling_ratio" in inputs:
            rep["importance_sampling_ratio"] = torch.ones_like(mask, dtype=torch.float32)
        mode = "train" if self.model.training else "eval"
        logged = {k: len(v) for k, v in self._metrics[mode].items()}
        with _swapped(self, _entropy_bonus_enabled=False, aux_loss_enabled=False):
            loss = super()._compute_loss(model, rep)
        for k in list(self._metrics[mode]):
            if k not in logged:
                del self._metrics[mode][k]
            else:
                del self._metrics[mode][k][logged[k]:]
        if self.loss_type == "bnpo":
            rollout = inputs["completion_mask"] if "tool_mask" not in inputs else \
                inputs["completion_mask"] * inputs["tool_mask"]
            loss = loss * mask.sum().clamp(min=1.0) / rollout.sum().clamp(min=1.0)
        return loss
