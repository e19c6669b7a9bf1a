"""The shared-prefix forward (``dftrain fit --shared-prefix``, the default): each prompt group's prompt,
image included, runs once and its completions continue its key/value cache. Loss and gradients
equal the plain forward's (every row runs prompt + completion) to 1e-5: for every objective and
policy loss, with KL to a reference, with LoRA, with repaired rows, packed micro-batches, in
``dftrain fit`` end to end, and for every model family."""
import copy
import itertools
import json

import pytest
import torch

from dftrain.batch import Batch, build_rows
from dftrain.fit import FitConfig, micro_loss
from dftrain.loss import POLICY_LOSSES
from tests.conftest import misread_pair, run_cli


def _groups(tok, n_groups=3, seed=7):
    """Prompt groups with a correct rollout, a misread one with its verified repair (so DF weights and
    a repaired row), and an all-fail group (the --fail-advantage row); images of two sizes."""
    from dfgen.images import decode_image
    from dfgen.synth.grid import make_problems

    groups = []
    for n, p in enumerate(make_problems(n_groups, seed=seed)):
        good, bad, a = misread_pair(tok, p)
        fail = {"token_ids": bad, "logprobs": [-1.0] * len(bad), "reward": 0.0, "repair_status": "ok",
                "mask_bad": a.mask_bad, "root_bad": a.root_bad, "repaired_ids": good,
                "repaired_logprobs": [-0.5] * len(good), "mask_repaired": a.mask_repaired}
        other = {"token_ids": good[:-3] + [tok.eos_token_id], "logprobs": [-0.7] * (len(good) - 2),
                 "reward": float(n > 0), "repair_status": None}
        groups.append({"id": f"g{n}", "question": p.question(), "_image": decode_image(p.render()),
                       "rollouts": [other, fail, copy.deepcopy(other)]})
    return groups


def _loss_and_grad(model, batch, cfg, proc, shared, size, ref=None):
    model.zero_grad(set_to_none=True)
    total = 0.0
    for mb in batch.split(size, by_length=True, by_group=shared):
        mb.ref_logprobs = None
        loss, _ = micro_loss(model, mb, cfg, proc, [], 1.0, ref, shared_prefix=shared)
        loss.backward()
        total += float(loss.detach())
    return total, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _same(a, b):
    assert a[0] == pytest.approx(b[0], abs=1e-5)
    assert torch.allclose(a[1], b[1], atol=1e-5, rtol=1e-5), float((a[1] - b[1]).abs().max())


@pytest.fixture(scope="module")
def policy(sft_model):
    from dfgen.policy import load_policy

    model, proc = load_policy(sft_model)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():  # a reference that differs, so the KL term and its gradient are not 0
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.train(), proc, ref


@pytest.mark.parametrize("objective,surrogate,beta", list(itertools.product(("df-grpo", "grpo"), sorted(POLICY_LOSSES),
                                                                            (0.0, 0.05))))
def test_every_objective_gets_the_plain_forwards_loss_and_gradient(policy, objective, surrogate, beta):
    model, proc, ref = policy
    cfg = FitConfig(data=".", model=".", out=".", objective=objective, policy_loss=surrogate, beta=beta)
    batch = Batch.from_rows(build_rows(_groups(proc.tokenizer), cfg), cfg)
    assert objective == "grpo" or (batch.is_repaired.any() and batch.root_only.any())
    g = torch.Generator().manual_seed(3)  # off-policy behaviour log-probs: clips and gates act
    batch.logprobs = (batch.logprobs - torch.rand(batch.logprobs.shape, generator=g)) * batch.completion_mask
    for size in (len(batch), 4):
        _same(_loss_and_grad(model, batch, cfg, proc, True, size, ref), _loss_and_grad(model, batch, cfg, proc, False,
                                                                                        len(batch), ref))


def test_lora_gets_the_plain_forwards_loss_and_gradient(policy):
    from peft import LoraConfig, get_peft_model

    from dfgen.models import lora_targets

    model, proc, _ = policy
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=lora_targets(model)))
    with torch.no_grad():  # B starts at 0: move it so the adapters take part in the forward
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.05)
    cfg = FitConfig(data=".", model=".", out=".")
    batch = Batch.from_rows(build_rows(_groups(proc.tokenizer), cfg), cfg)
    shared, plain = (_loss_and_grad(lora, batch, cfg, proc, s, len(batch)) for s in (True, False))
    assert plain[1].numel() < sum(p.numel() for p in model.parameters())  # the adapters' gradient only
    _same(shared, plain)


def test_fit_trains_the_same_with_and_without_it(df_shards, sft_model, tmp_path):
    from safetensors.torch import load_file

    common = ["--data", df_shards / "m", "--model", sft_model, "--steps", 2, "--groups-per-step", 4, "--lr", 1e-4,
              "--micro-batch", 5, "--beta", 0.02]
    run_cli("dftrain", "fit", *common, "--out", tmp_path / "shared")
    run_cli("dftrain", "fit", *common, "--out", tmp_path / "plain", "--no-shared-prefix")
    losses = [[json.loads(ln)["loss"] for ln in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("shared", "plain")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    wa, wb = (load_file(tmp_path / d / "model.safetensors") for d in ("shared", "plain"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_every_family_gets_the_plain_forwards_log_probs_and_gradient(tmp_path):
    """The tiny checkpoint of each family (tests/tiny_families.py): the family layer declares
    ``shared_prefix`` for all of them, and this is the test that lets it."""
    from dfgen.models import family_of
    from dfgen.policy import completion_inputs, load_policy, prompt_inputs, shared_prefix_logprobs, token_logprobs
    from dfgen.policy import suppress_ids
    from dfgen.images import decode_image
    from dfgen.synth.grid import make_problems
    from tests.tiny_families import FAMILIES, build_family

    p = next(iter(make_problems(1, seed=3)))
    q, im = p.question(), decode_image(p.render())
    for fam in FAMILIES:
        model, proc = load_policy(build_family(fam, tmp_path / fam))
        assert family_of(model).shared_prefix, fam
        model.train()
        sup = suppress_ids(proc.tokenizer)
        allowed = [i for i in range(len(proc.tokenizer)) if i not in set(sup)]
        g = torch.Generator().manual_seed(0)
        comps = [[allowed[j] for j in torch.randint(0, len(allowed), (n,), generator=g).tolist()] for n in (5, 9, 7)]
        inputs, cm = completion_inputs(prompt_inputs(proc, [q] * 3, [im] * 3), comps, proc.tokenizer.pad_token_id)
        ids = inputs["input_ids"][:, -cm.shape[1]:].masked_fill(cm == 0, proc.tokenizer.pad_token_id)
        out = []
        for shared in (True, False):
            model.zero_grad(set_to_none=True)
            lp = (shared_prefix_logprobs(model, prompt_inputs(proc, [q], [im]), ids, sup) if shared
                  else token_logprobs(model, inputs, cm.shape[1], sup)).masked_fill(cm == 0, 0.0)
            lp.sum().backward()
            out.append((lp.detach(), torch.cat([x.grad.flatten() for x in model.parameters() if x.grad is not None])))
        assert torch.allclose(out[0][0], out[1][0], atol=1e-5), fam
        scale = float(out[1][1].abs().max())  # float32 noise grows with the gradient: 1e-5 of its largest entry
        assert float((out[0][1] - out[1][1]).abs().max()) <= 1e-5 * scale, (fam, scale)


def test_a_family_not_served_by_it_gets_the_plain_forward_and_is_told_once(df_shards, sft_model, tmp_path, monkeypatch):
    import dataclasses

    import dfgen.models
    from dftrain.fit import run_fit

    real = dfgen.models.family_of
    monkeypatch.setattr(dfgen.models, "family_of", lambda m: dataclasses.replace(real(m), shared_prefix=False))
    said = []
    kw = dict(data=df_shards / "m", model=sft_model, steps=2, groups_per_step=2, lr=1e-4)
    run_fit(FitConfig(out=tmp_path / "fallback", **kw), log=said.append)
    monkeypatch.undo()
    run_fit(FitConfig(out=tmp_path / "plain", shared_prefix=False, **kw), log=lambda m: None)
    told = [m for m in said if "shared-prefix" in m]
    assert len(told) == 1 and "qwen2-vl family is not served by the shared-prefix forward" in told[0]
    losses = [[json.loads(ln)["loss"] for ln in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("fallback", "plain")]
    assert losses[0] == losses[1]  # the plain forward, bit for bit
    said.clear()
    run_fit(FitConfig(out=tmp_path / "ckpt", gradient_checkpointing=True, **kw), log=said.append)
    assert len([m for m in said if "--gradient-checkpointing recomputes layers" in m]) == 1
