"""A step is one typed Batch; its micro-batches carry the step's denominators, so the micro-batch size
changes memory, never the loss, the gradient or the logged metrics."""
import itertools

import pytest
import torch

from dftrain.batch import Batch, TrainRow
from dftrain.fit import FitConfig
from dftrain.loss import AGG_MODES, LOSSES, POLICY_LOSSES, reduce_metrics
from tests.conftest import misread_pair

SIZES = (1, 2, 3, None)  # None: the whole step in one micro-batch


def _rows(repaired: bool, seed: int = 0) -> list[TrainRow]:
    """Seven rollouts of mixed lengths (some DF-weighted, one --fail-advantage row) and, with
    ``repaired``, three repaired rows at the END, so micro-batches of 1-3 rows hold only repaired rows."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(7):
        n = int(torch.randint(1, 10, (1,), generator=g))
        bad = (torch.rand(n, generator=g) < 0.4).long().tolist()
        root = [0] * n
        root[int(torch.randint(0, n, (1,), generator=g))] = 1
        weighted = i % 2 == 1
        rows.append(TrainRow(prompt=None, token_ids=list(range(3, 3 + n)),
                             logprobs=(-torch.rand(n, generator=g) * 3).tolist(),
                             advantage=float(torch.randn(1, generator=g)), reward=float(i % 3 == 0),
                             df_weighted=weighted, mask_bad=bad if weighted else None,
                             root_bad=root if weighted else None, root_only=i == 5))
    for _ in range(3 if repaired else 0):
        n = int(torch.randint(1, 12, (1,), generator=g))
        rows.append(TrainRow(prompt=None, token_ids=list(range(5, 5 + n)),
                             logprobs=(-torch.rand(n, generator=g) * 3).tolist(), advantage=1.0, reward=1.0,
                             repaired=True, mask_repaired=(torch.rand(n, generator=g) < 0.5).long().tolist()))
    return rows


def _step(batch: Batch, lp: torch.Tensor, cfg, size, packed=False):
    """Loss, gradient w.r.t. the current log-probs, and metrics of one step at micro-batch ``size``."""
    loss, metrics = 0.0, {}
    for mb in batch.split(size or len(batch), by_length=packed):
        T = mb.completion_mask.shape[1]
        part, met = LOSSES[cfg.objective](lp[mb.index, :T], mb, cfg)
        loss = loss + part
        reduce_metrics(metrics, met)
    (grad,) = torch.autograd.grad(loss, lp)
    return float(loss.detach()), grad, {name: float(v) for name, v in metrics.items()}


@pytest.mark.parametrize("objective,agg,surrogate,repaired,beta",
                         list(itertools.product(("df-grpo", "grpo"), AGG_MODES, sorted(POLICY_LOSSES), (True, False),
                                                (0.0, 0.1))))
def test_loss_gradient_and_metrics_of_a_step_do_not_depend_on_the_micro_batch_size(objective, agg, surrogate,
                                                                                     repaired, beta):
    for rep_in_den in (False, True):
        cfg = FitConfig(data=".", model=".", out=".", objective=objective, agg=agg, policy_loss=surrogate, beta=beta,
                        rep_in_denominator=rep_in_den, kappa=0.1, marked="root+prop", mass="redistribute")
        batch = Batch.from_rows(_rows(repaired), cfg)
        g = torch.Generator().manual_seed(1)
        noise = torch.randn(batch.logprobs.shape, generator=g) * 0.3  # off-policy: clips and gates act
        lp = ((batch.logprobs + noise) * batch.completion_mask).requires_grad_(True)
        batch.ref_logprobs = (batch.logprobs + torch.randn(batch.logprobs.shape, generator=g) * 0.2) * batch.completion_mask
        whole = _step(batch, lp, cfg, None)
        assert abs(whole[0]) > 1e-4 and whole[1].abs().sum() > 0  # a step that trains something
        for size, packed in itertools.product(SIZES, (False, True)):
            loss, grad, metrics = _step(batch, lp, cfg, size, packed)
            assert loss == pytest.approx(whole[0], abs=1e-6), (size, rep_in_den)
            assert torch.allclose(grad, whole[1], atol=1e-6, rtol=0), (size, rep_in_den)
            assert metrics.keys() == whole[2].keys()
            for name, v in metrics.items():
                assert v == pytest.approx(whole[2][name], abs=1e-6), (name, size)


def test_a_repaired_only_micro_batch_keeps_its_sign_and_share():
    """The bug this object fixed: micro-batches scaled by their own share of the denominator gave a
    micro-batch of repaired rows (out of the denominator) a share of 0, and flipped the step's sign."""
    cfg = FitConfig(data=".", model=".", out=".", kappa=0.1)
    batch = Batch.from_rows(_rows(True, seed=3), cfg)
    lp = batch.logprobs.clone().requires_grad_(True)
    parts = [float(LOSSES["df-grpo"](lp[k: k + 1, : mb.completion_mask.shape[1]], mb, cfg)[0])
             for k, mb in enumerate(batch.split(1))]
    rep = [p for p, r in zip(parts, batch.is_repaired) if r]
    assert len(rep) == 3 and all(p < 0 for p in rep)  # positive advantage, on-policy: a negative loss each
    assert sum(parts) == pytest.approx(_step(batch, lp, cfg, None)[0], abs=1e-6)


def test_split_keeps_shard_names_and_trims_padding():
    cfg = FitConfig(data=".", model=".", out=".")
    rows = _rows(True)
    batch = Batch.from_rows(rows, cfg)
    micro = batch.split(4)
    assert [len(m) for m in micro] == [4, 4, 2]
    for m, chunk in zip(micro, (rows[:4], rows[4:8], rows[8:])):
        assert m.norm is batch.norm  # the step's denominators, not the micro-batch's
        assert m.completion_mask.shape[1] == max(len(r.token_ids) for r in chunk)
        for i, r in enumerate(chunk):
            n = len(r.token_ids)
            assert m.token_ids[i, :n].tolist() == r.token_ids
            assert m.logprobs[i, :n].tolist() == pytest.approx(r.logprobs)
            assert m.root_bad[i, :n].tolist() == (r.root_bad or [0] * n)
            assert bool(m.is_repaired[i]) == r.repaired


def test_packing_orders_rows_by_length_and_pads_less():
    cfg = FitConfig(data=".", model=".", out=".")
    batch = Batch.from_rows(_rows(True), cfg)
    lengths = batch.completion_mask.sum(-1)
    packed, plain = batch.split(3, by_length=True), batch.split(3)
    assert sorted(torch.cat([m.index for m in packed]).tolist()) == list(range(len(batch)))  # every row once
    cut = [lengths[m.index] for m in packed]
    assert all(a.max() <= b.min() for a, b in zip(cut, cut[1:]))  # like lengths together
    for m in packed:  # each row is the step's row it names
        for i, j in enumerate(m.index.tolist()):
            n = int(lengths[j])
            assert m.token_ids[i, :n].tolist() == batch.token_ids[j, :n].tolist()
            assert m.completion_mask.shape[1] == int(lengths[m.index].max())
    assert batch.padding_fraction(packed) < batch.padding_fraction(plain)
    assert batch.padding_fraction([batch]) == pytest.approx(1 - float(lengths.sum()) / batch.completion_mask.numel())


def test_a_model_step_has_the_same_loss_and_gradient_at_every_micro_batch_size(sft_model):
    """End to end through the policy: prompts and images rendered per micro-batch, padding trimmed."""
    from dfgen.images import decode_image
    from dfgen.policy import load_policy
    from dfgen.synth.grid import make_problems
    from dftrain.batch import build_rows
    from dftrain.fit import micro_loss

    model, proc = load_policy(sft_model)
    tok = proc.tokenizer
    groups = []
    for n, p in enumerate(make_problems(2, seed=5)):
        ids_good, ids_bad, a = misread_pair(tok, p)
        fail = {"token_ids": ids_bad, "logprobs": [-1.0] * len(ids_bad), "reward": 0.0, "repair_status": "ok",
                "mask_bad": a.mask_bad, "root_bad": a.root_bad, "repaired_ids": ids_good,
                "repaired_logprobs": [-0.5] * len(ids_good), "mask_repaired": a.mask_repaired}
        right = {"token_ids": ids_good[:-3] + [tok.eos_token_id], "logprobs": [-0.7] * (len(ids_good) - 2),
                 "reward": float(n), "repair_status": None}
        groups.append({"id": f"g{n}", "question": p.question(), "_image": decode_image(p.render()),
                       "rollouts": [right, fail]})  # g0: all failed (--fail-advantage), g1: mixed
    results = {}
    for agg in ("token-mean", "seq-mean-token-sum-norm"):
        cfg = FitConfig(data=".", model=".", out=".", agg=agg)
        batch = Batch.from_rows(build_rows(groups, cfg), cfg)
        assert bool(batch.is_repaired[-1]) and bool(batch.root_only.any())  # a repaired row ends the step
        for size, packed in itertools.product(SIZES, (False, True)):
            model.zero_grad(set_to_none=True)
            total = 0.0
            for mb in batch.split(size or len(batch), by_length=packed):
                loss, _ = micro_loss(model, mb, cfg, proc, [], 1.0)
                loss.backward()
                total += float(loss.detach())
            grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            results[agg, size, packed] = (total, grad)
        whole = results[agg, None, False]
        for size, packed in itertools.product(SIZES, (False, True)):
            assert results[agg, size, packed][0] == pytest.approx(whole[0], abs=1e-6)
            assert torch.allclose(results[agg, size, packed][1], whole[1], atol=1e-6, rtol=1e-5)
