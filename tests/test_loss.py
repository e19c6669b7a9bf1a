"""Tests for dftrain/loss.py: golden numbers from verl and TRL, hand-computed DF weights, slow loop
references for the vectorised code, and the direction of the gradient."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.conftest import DATA
from dftrain.loss import (
    AGG_MODES,
    LOSSES,
    aggregate,
    df_loss,
    df_token_weights,
    grpo_loss,
    group_advantages,
    kl_k3,
    policy_loss,
    repaired_term,
)

GOLDEN = DATA / "golden" / "grpo_peer_numbers.json"
TOL = 1e-5


@pytest.fixture(scope="module")
def golden():
    d = json.loads(GOLDEN.read_text())
    inputs = {k: torch.tensor(v, dtype=torch.float64) for k, v in d["inputs"].items() if k != "index"}
    inputs["index"] = torch.tensor(d["inputs"]["index"], dtype=torch.long)
    return d, inputs


def close(x, y, tol=TOL):
    return abs(float(x) - float(y)) <= tol * max(1.0, abs(float(y)))


# ---------------------------------------------------------------- golden: verl and TRL on fixed inputs


def test_golden_inputs_hold_every_key_we_use(golden):
    d, inp = golden
    assert {"rewards", "index", "mask", "old_log_prob", "log_prob", "ref_log_prob"} <= set(inp)
    B, T = inp["mask"].shape
    assert inp["rewards"].shape == (B,) and inp["log_prob"].shape == (B, T)


@pytest.mark.parametrize(
    "key, scale, eps",
    [
        ("verl_grpo_adv_per_seq", "group", 1e-6),
        ("verl_grpo_adv_noStd_per_seq", "none", 1e-6),
        ("trl_adv_group", "group", 1e-4),
        ("trl_adv_none", "none", 1e-4),
        ("trl_adv_batch", "batch", 1e-4),
    ],
)
def test_advantages_match_peer(golden, key, scale, eps):
    d, inp = golden
    adv = group_advantages(inp["rewards"], inp["index"], scale=scale, eps=eps)
    assert torch.allclose(adv, torch.tensor(d[key], dtype=adv.dtype), atol=TOL)


def test_verl_and_trl_advantages_differ_only_by_eps(golden):
    d, inp = golden
    a_verl = group_advantages(inp["rewards"], inp["index"], eps=1e-6)
    a_trl = group_advantages(inp["rewards"], inp["index"], eps=1e-4)
    assert close((a_verl - a_trl).abs().max(), d["max_abs_diff_verl_vs_trl_adv"], tol=1e-4)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_policy_loss_and_metrics_match_verl(golden, agg):
    d, inp = golden
    adv = group_advantages(inp["rewards"], inp["index"], eps=1e-6)
    loss, metrics = policy_loss(inp["log_prob"], inp["old_log_prob"], adv, inp["mask"], agg=agg)
    expected = d[f"verl_pg_loss[{agg}]"]
    if agg == "seq-mean-token-sum-norm":
        # verl divides the total by T only; we (and TRL's dr_grpo) divide by num_sequences * T.
        loss = loss * inp["mask"].shape[0]
    assert close(loss, expected)
    m = d[f"verl_pg_metrics[{agg}]"]
    assert close(metrics["clipfrac"], m["actor/pg_clipfrac"])
    assert close(metrics["ppo_kl"], m["actor/ppo_kl"])
    assert m["actor/pg_clipfrac_lower"] == 0.0  # dual clip never bites here, so leaving it out is exact


def test_k3_matches_verl_k3_and_low_var_kl(golden):
    d, inp = golden
    k3 = kl_k3(inp["log_prob"], inp["ref_log_prob"])
    mean = (k3 * inp["mask"]).sum() / inp["mask"].sum()
    assert close(mean, d["verl_kl[k3] token-mean"])
    assert close(mean, d["verl_kl[low_var_kl] token-mean"])
    assert k3.max() < 10  # verl's [-10, 10] clamp of low_var_kl never bites on these inputs


@pytest.mark.parametrize(
    "loss_type, agg",
    [
        ("grpo", "seq-mean-token-mean"),
        ("bnpo", "token-mean"),
        ("dapo", "token-mean"),
        ("dr_grpo", "seq-mean-token-sum-norm"),
    ],
)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_policy_loss_matches_trl(golden, loss_type, agg, beta):
    d, inp = golden
    adv = group_advantages(inp["rewards"], inp["index"], eps=1e-4)  # TRL's eps
    loss, _ = policy_loss(
        inp["log_prob"], inp["old_log_prob"], adv, inp["mask"], agg=agg, ref_logprobs=inp["ref_log_prob"], beta=beta
    )
    key = f"trl_loss[{loss_type}]" + (",beta=0.04" if beta else "")
    assert close(loss, d[key])


def test_peer_identities_hold(golden):
    d, _ = golden
    for key in d:
        if key.startswith("identity:"):
            a, b = d[key]
            assert close(a, b)


def test_df_loss_with_masks_off_equals_grpo_golden(golden):
    d, inp = golden
    B, T = inp["mask"].shape
    adv = group_advantages(inp["rewards"], inp["index"], eps=1e-6)
    w = df_token_weights(torch.zeros(B, T), inp["mask"], torch.zeros(B, dtype=torch.bool), kappa=0.1)
    for fn in (grpo_loss, df_loss):
        loss, _ = fn(inp["log_prob"], inp["old_log_prob"], adv, inp["mask"], token_weights=w)
        assert close(loss, d["verl_pg_loss[token-mean]"])


# ---------------------------------------------------------------- group advantages


def test_group_of_one_and_equal_rewards_give_exact_zero():
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 1.0, 0.0])
    index = torch.tensor([5, 5, 5, 9, 2, 2])
    for scale in ("group", "batch", "none"):
        adv = group_advantages(rewards, index, scale=scale)
        assert adv[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
        assert adv[4] > 0 > adv[5]


def test_group_advantages_accept_non_contiguous_interleaved_indices():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.5])
    index = torch.tensor([100, -3, 100, -3, 7, 7])
    adv = group_advantages(rewards, index)
    s = math.sqrt(0.5) + 1e-6  # unbiased std of {0, 1}
    assert torch.allclose(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / s)
    assert torch.allclose(adv[4:], torch.tensor([0.25, -0.25]) / (math.sqrt(0.125) + 1e-6))


def slow_group_advantages(rewards, index, scale, eps):
    out = []
    for i, g in enumerate(index):
        members = [r for r, j in zip(rewards, index) if j == g]
        mean = sum(members) / len(members)
        if len(members) < 2 or max(members) == min(members):
            out.append(0.0)
            continue
        std = math.sqrt(sum((r - mean) ** 2 for r in members) / (len(members) - 1))
        out.append((rewards[i] - mean) / (std + eps) if scale == "group" else rewards[i] - mean)
    return out


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("scale", ["group", "none"])
def test_group_advantages_match_slow_loop(seed, scale):
    g = torch.Generator().manual_seed(seed)
    B = 40
    index = torch.randint(-5, 12, (B,), generator=g)
    rewards = torch.randint(0, 3, (B,), generator=g).double() / 2  # ties and constant groups happen
    adv = group_advantages(rewards, index, scale=scale, eps=1e-6)
    ref = slow_group_advantages(rewards.tolist(), index.tolist(), scale, 1e-6)
    assert torch.allclose(adv, torch.tensor(ref, dtype=adv.dtype), atol=1e-9)


# ---------------------------------------------------------------- policy loss vs a slow loop


def slow_policy_loss(lp, old, adv, mask, w, clip_low, clip_high, agg, max_len, rows):
    B, T = len(lp), len(lp[0])
    row_sums, row_tokens = [], []
    for i in range(B):
        s, n = 0.0, 0
        for t in range(T):
            if mask[i][t] == 0:
                continue
            a = adv[i] * w[i][t]
            rho = math.exp(lp[i][t] - old[i][t])
            clipped = min(max(rho, 1 - clip_low), 1 + clip_high)
            s += -min(rho * a, clipped * a)
            n += 1
        row_sums.append(s)
        row_tokens.append(n)
    n_rows = sum(rows)
    if agg == "token-mean":
        return sum(row_sums) / sum(n for n, r in zip(row_tokens, rows) if r)
    if agg == "seq-mean-token-mean":
        return sum(s / max(n, 1) for s, n in zip(row_sums, row_tokens)) / n_rows
    if agg == "seq-mean-token-sum":
        return sum(row_sums) / n_rows
    return sum(row_sums) / (n_rows * max_len)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("agg", AGG_MODES)
def test_policy_loss_matches_slow_loop_with_signed_weights(seed, agg):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 9
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    old = lp + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5)  # ratios well outside the clip
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) < 0.8).double()
    mask[:, 0] = 1
    w = torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.5  # some negative weights
    rows = [True, True, False, True, True, False]
    max_len = 12
    loss, _ = policy_loss(
        lp, old, adv, mask, w, clip_low=0.2, clip_high=0.28, agg=agg, max_len=max_len,
        in_denominator=torch.tensor(rows),
    )
    lists = [x.tolist() for x in (lp, old, adv, mask, w)]
    ref = slow_policy_loss(*lists, 0.2, 0.28, agg, max_len, rows)
    assert math.isclose(float(loss), ref, rel_tol=1e-9, abs_tol=1e-12)


def test_negative_weight_equals_flipped_advantage():
    lp = torch.tensor([[-1.0, -0.2, -2.0]])
    old = torch.tensor([[-1.5, -0.1, -1.0]])
    mask = torch.ones(1, 3)
    a, _ = policy_loss(lp, old, torch.tensor([-0.7]), mask, token_weights=torch.full((1, 3), -0.5))
    b, _ = policy_loss(lp, old, torch.tensor([0.35]), mask)
    assert torch.allclose(a, b)


def test_aggregate_denominators_count_tokens_not_weights():
    loss_mat = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert aggregate(loss_mat, mask, "token-mean") == pytest.approx(7 / 3)
    assert aggregate(loss_mat, mask, "seq-mean-token-mean") == pytest.approx((1.5 + 4) / 2)
    assert aggregate(loss_mat, mask, "seq-mean-token-sum") == pytest.approx(7 / 2)
    assert aggregate(loss_mat, mask, "seq-mean-token-sum-norm") == pytest.approx(7 / (2 * 3))
    assert aggregate(loss_mat, mask, "seq-mean-token-sum-norm", max_len=10) == pytest.approx(7 / 20)
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(loss_mat, mask, "sum")


def test_garbage_logprobs_on_padding_do_not_make_nan():
    lp = torch.tensor([[-1.0, 50.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -60.0]])
    ref = torch.tensor([[-1.1, -70.0]])
    loss, metrics = policy_loss(lp, old, torch.tensor([-1.0]), torch.tensor([[1.0, 0.0]]), ref_logprobs=ref, beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())


def test_metrics_are_detached_scalars():
    lp = torch.randn(3, 4, requires_grad=True)
    old, ref = lp.detach() + 0.1, lp.detach()
    _, metrics = policy_loss(lp, old, torch.randn(3), torch.ones(3, 4), ref_logprobs=ref, beta=0.1)
    assert {"clipfrac", "ppo_kl", "ratio_mean", "ratio_max", "kl", "pg_loss"} <= set(metrics)
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())


# ---------------------------------------------------------------- gradient direction


def test_gradient_pushes_positive_advantage_tokens_up_and_negative_down():
    torch.manual_seed(0)
    B, T = 4, 5
    old = -torch.rand(B, T)
    lp = (old + 0.05 * torch.randn(B, T)).requires_grad_()  # inside the clip range
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0])
    loss, _ = policy_loss(lp, old, adv, torch.ones(B, T))
    loss.backward()
    assert (lp.grad[adv > 0] < 0).all()  # descending the loss raises logp
    assert (lp.grad[adv < 0] > 0).all()


def test_clipped_tokens_get_no_gradient():
    old = torch.zeros(1, 2)
    lp = torch.tensor([[0.5, -0.5]], requires_grad=True)  # rho = 1.65 and 0.61
    loss, metrics = policy_loss(lp, old, torch.tensor([1.0]), torch.ones(1, 2))
    loss.backward()
    assert lp.grad[0, 0] == 0 and lp.grad[0, 1] < 0  # A > 0 is clipped above, not below
    assert metrics["clipfrac"] == pytest.approx(0.5)


def test_df_gradient_on_failed_rollout_concentrates_on_marked_tokens():
    old = torch.full((1, 4), -1.0)
    lp = old.clone().requires_grad_()
    bad = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    w = df_token_weights(bad, torch.ones(1, 4), torch.tensor([True]), kappa=-0.1)
    loss, _ = df_loss(lp, old, torch.tensor([-1.0]), torch.ones(1, 4), token_weights=w)
    loss.backward()
    g = lp.grad[0]
    assert g[1] > 0  # marked: pushed down with full weight
    assert (g[[0, 2, 3]] < 0).all()  # verified steps: small positive credit
    assert torch.allclose(g[[0, 2, 3]], -0.1 * g[1])


# ---------------------------------------------------------------- DF token weights, hand-computed


def test_marked_bad_token_gets_full_advantage_unmarked_gets_kappa():
    bad = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0]])
    cm = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    w = df_token_weights(bad, cm, torch.tensor([True]), kappa=0.1)
    assert torch.allclose(w, torch.tensor([[0.1, 1.0, 1.0, 0.1, 0.0]]))
    old = torch.zeros(1, 5)
    lp = old.clone().requires_grad_()
    loss, _ = policy_loss(lp, old, torch.tensor([-2.0]), cm, w, agg="seq-mean-token-sum")
    loss.backward()  # at rho = 1, dL/dlogp_t = -A_t
    assert torch.allclose(lp.grad, torch.tensor([[0.2, 2.0, 2.0, 0.2, 0.0]]))


def test_root_and_root_plus_prop_weights():
    bad = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0, 0.0]])
    root = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0, 0.0]])
    cm = torch.ones(1, 6)
    failed = torch.tensor([True])
    w_root = df_token_weights(bad, cm, failed, kappa=0.1, root_mask=root, marked="root")
    assert torch.allclose(w_root, torch.tensor([[0.1, 1.0, 1.0, 0.1, 0.1, 0.1]]))
    w_prop = df_token_weights(bad, cm, failed, kappa=0.1, root_mask=root, marked="root+prop", delta=0.5)
    assert torch.allclose(w_prop, torch.tensor([[0.1, 1.0, 1.0, 0.1, 0.5, 0.1]]))
    w_edit = df_token_weights(bad, cm, failed, kappa=0.1)
    assert torch.allclose(df_token_weights(bad, cm, failed, 0.1, root, "root+prop", delta=1.0), w_edit)
    assert torch.allclose(df_token_weights(bad, cm, failed, 0.1, root, "root+prop", delta=0.1), w_root)
    with pytest.raises(ValueError, match="root_mask"):
        df_token_weights(bad, cm, failed, marked="root")


def test_negative_kappa_flips_sign_on_unmarked_tokens():
    bad = torch.tensor([[1.0, 0.0, 0.0]])
    w = df_token_weights(bad, torch.ones(1, 3), torch.tensor([True]), kappa=-0.2)
    assert torch.allclose(w, torch.tensor([[1.0, -0.2, -0.2]]))
    a_t = -1.5 * w  # per-token advantage of a failed rollout
    assert a_t[0, 0] < 0 and (a_t[0, 1:] > 0).all()


def test_non_failed_rows_are_untouched():
    bad = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    cm = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    for mass in ("keep", "redistribute"):
        w = df_token_weights(bad, cm, torch.tensor([False, False]), kappa=0.1, mass=mass)
        assert torch.equal(w, cm)


def test_redistribute_keeps_each_failed_rows_token_count():
    bad = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0]])
    cm = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    w = df_token_weights(bad, cm, torch.tensor([True, False]), kappa=0.1, mass="redistribute")
    s = 4 / (1 + 3 * 0.1)
    assert torch.allclose(w[0], torch.tensor([0.1 * s, s, 0.1 * s, 0.1 * s, 0.0]))
    assert torch.equal(w[1], cm[1])


@settings(max_examples=40, deadline=None)
@given(
    kappa=st.floats(-1.0, 1.0, allow_subnormal=False),
    seed=st.integers(0, 10_000),
    marked=st.sampled_from(["edit", "root", "root+prop"]),
    delta=st.floats(0.0, 1.0),
)
@example(kappa=0.0, seed=0, marked="root+prop", delta=2.225073858507e-311)  # subnormal: tokens/total was inf, 0*inf nan
def test_redistribute_abs_mass_equals_token_count(kappa, seed, marked, delta):
    g = torch.Generator().manual_seed(seed)
    B, T = 5, 8
    bad = (torch.rand(B, T, generator=g) < 0.3).double()
    root = bad * (torch.rand(B, T, generator=g) < 0.5).double()
    cm = (torch.rand(B, T, generator=g) < 0.9).double()
    failed = torch.rand(B, generator=g) < 0.7
    w = df_token_weights(bad, cm, failed, kappa, root, marked, delta, mass="redistribute")
    keep = df_token_weights(bad, cm, failed, kappa, root, marked, delta, mass="keep")
    mass = (w.abs() * cm).sum(-1)
    nonzero = (keep.abs() * cm).sum(-1) > 0
    rows = failed & nonzero
    assert torch.allclose(mass[rows], cm.sum(-1)[rows])
    assert torch.equal(w[~failed], cm[~failed])
    assert (torch.sign(w) == torch.sign(keep)).all()  # rescaling never flips a sign
    assert (w * (1 - cm) == 0).all()


def test_invalid_options_raise():
    bad, cm, failed = torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([True])
    for kwargs in ({"kappa": 1.5}, {"marked": "first"}, {"mass": "scale"}, {"delta": -0.1}):
        with pytest.raises(ValueError):
            df_token_weights(bad, cm, failed, **kwargs)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.ones(2), torch.zeros(2, dtype=torch.long), scale="std")


# ---------------------------------------------------------------- repaired samples


def test_repaired_tokens_get_the_positive_term():
    m_rep = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    cm = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, w = repaired_term(m_rep, cm, a_plus=0.8, kappa_rep=0.25)
    assert torch.allclose(adv, torch.tensor([0.8]))
    assert torch.allclose(w, torch.tensor([[0.25, 1.0, 1.0, 0.0]]))
    old = torch.full((1, 4), -1.0)
    lp = old.clone().requires_grad_()
    loss, _ = df_loss(lp, old, adv, cm, token_weights=w, is_repaired=torch.tensor([True]), rep_in_denominator=True)
    loss.backward()
    assert (lp.grad[0, :3] < 0).all() and lp.grad[0, 3] == 0
    assert torch.allclose(lp.grad[0, :3], -0.8 * w[0, :3] / 3)


def batch_with_one_repaired_row():
    old = torch.full((3, 4), -1.0)
    lp = old.clone()
    cm = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    bad = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0] * 4, [0.0] * 4])
    failed = torch.tensor([True, False, False])
    w_roll = df_token_weights(bad[:2], cm[:2], failed[:2], kappa=0.1)
    a_rep, w_rep = repaired_term(torch.tensor([[0.0, 1.0, 1.0, 0.0]]), cm[2:], a_plus=1.0)
    adv = torch.cat([torch.tensor([-1.0, 1.0]), a_rep])
    w = torch.cat([w_roll, w_rep])
    return lp, old, adv, cm, w, torch.tensor([False, False, True])


def test_rep_in_denominator_is_explicit():
    lp, old, adv, cm, w, is_rep = batch_with_one_repaired_row()
    numerator = -(-1.0 * (0.1 + 1.0)) - (1.0 * 4) - (1.0 * 2)  # at rho = 1, L_t = -A_t
    out, _ = df_loss(lp, old, adv, cm, token_weights=w, is_repaired=is_rep, rep_in_denominator=False)
    assert out == pytest.approx(numerator / 6)
    out, _ = df_loss(lp, old, adv, cm, token_weights=w, is_repaired=is_rep, rep_in_denominator=True)
    assert out == pytest.approx(numerator / 9)
    out, _ = df_loss(lp, old, adv, cm, token_weights=w, is_repaired=is_rep, agg="seq-mean-token-sum")
    assert out == pytest.approx(numerator / 2)


def test_grpo_ignores_weights_and_drops_repaired_rows():
    lp, old, adv, cm, w, is_rep = batch_with_one_repaired_row()
    out, _ = grpo_loss(lp, old, adv, cm, token_weights=w, is_repaired=is_rep)
    ref, _ = policy_loss(lp[:2], old[:2], adv[:2], cm[:2])
    assert out == pytest.approx(float(ref))
    df_kappa1, _ = df_loss(lp[:2], old[:2], adv[:2], cm[:2], token_weights=torch.ones(2, 4) * cm[:2])
    assert out == pytest.approx(float(df_kappa1))


def test_objectives_share_one_signature_logprobs_batch_cfg():
    sigs = {name: inspect.signature(fn) for name, fn in LOSSES.items()}
    assert set(sigs) == {"grpo", "df-grpo"}
    assert {tuple(s.parameters) for s in sigs.values()} == {("logprobs", "batch", "cfg")}
    tensor_sigs = {str(inspect.signature(fn)) for fn in (df_loss, grpo_loss)}
    assert len(tensor_sigs) == 1


def test_public_signatures_are_stable():
    assert list(inspect.signature(group_advantages).parameters)[:4] == ["rewards", "group_index", "scale", "eps"]
    assert list(inspect.signature(policy_loss).parameters)[:9] == [
        "logprobs", "old_logprobs", "advantages", "completion_mask", "token_weights",
        "clip_low", "clip_high", "agg", "max_len",
    ]
    assert list(inspect.signature(df_token_weights).parameters) == [
        "mask_bad", "completion_mask", "failed", "kappa", "root_mask", "marked", "delta", "mass",
    ]
    assert list(inspect.signature(aggregate).parameters)[:4] == ["loss_mat", "completion_mask", "agg", "max_len"]
