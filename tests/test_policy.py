import json
import subprocess
import sys

import pytest
import torch

from dfgen.errors import UserError
from dfgen.images import decode_image
from dfgen.policy import completion_inputs, load_policy, model_fingerprint, prompt_inputs, suppress_ids, token_logprobs, tokenizer_fingerprint
from dfgen.synth.grid import make_problems


def test_tiny_model_is_about_one_million_parameters_and_digits_are_single_tokens(tiny_model):
    model, proc = load_policy(tiny_model)
    n = sum(p.numel() for p in model.parameters())
    assert 5e5 < n < 2e6
    toks = proc.tokenizer.tokenize("Step 3: 12 + 405 = 417")
    assert all(len(t) == 1 for t in toks if t.isdigit())
    assert "<|image_pad|>" in proc.tokenizer.convert_ids_to_tokens(suppress_ids(proc.tokenizer))
    assert proc.tokenizer.eos_token_id not in suppress_ids(proc.tokenizer)


def test_tiny_model_reloads_offline_without_torchvision_and_generates_from_an_image(tiny_model):
    code = f"""
import os, sys
os.environ['HF_HUB_OFFLINE'] = '1'
sys.modules['torchvision'] = None  # as on a machine without torchvision
from transformers import AutoModelForImageTextToText
from dfgen.images import decode_image
from dfgen.policy import load_processor, prompt_inputs
from dfgen.synth.grid import make_problems
m = AutoModelForImageTextToText.from_pretrained({str(tiny_model)!r})
proc = load_processor({str(tiny_model)!r})
p = next(make_problems(1, seed=0))
inp = prompt_inputs(proc, [p.question()], [decode_image(p.render())])
assert (inp['input_ids'] == m.config.image_token_id).sum().item() == 9, inp['input_ids']
out = m.generate(**inp, max_new_tokens=5, do_sample=False)
print(out.shape[1] - inp['input_ids'].shape[1])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.strip().splitlines()[-1]) >= 1


def test_teacher_forced_logprobs_match_a_plain_forward_pass(tiny_model):
    model, proc = load_policy(tiny_model)
    probs = list(make_problems(3, seed=1))
    inp = prompt_inputs(proc, [p.question() for p in probs], [decode_image(p.render()) for p in probs])
    comps = [[10, 11, 12], [13], [14, 15]]
    full, cmask = completion_inputs(inp, comps, proc.tokenizer.pad_token_id)
    lp = token_logprobs(model, full, cmask.shape[1])
    for i, c in enumerate(comps):  # unpadded single-sequence reference
        one = prompt_inputs(proc, [probs[i].question()], [decode_image(probs[i].render())])
        ids = torch.cat([one["input_ids"], torch.tensor([c])], 1)
        ref_in = {**one, "input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "mm_token_type_ids": torch.cat([one["mm_token_type_ids"], torch.zeros(1, len(c), dtype=torch.long)], 1)}
        logits = model(**ref_in).logits[0, -len(c) - 1:-1].float()
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c).unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(lp[i, : len(c)], ref, atol=1e-4)


def test_fingerprints_identify_tokenizer_and_weights(tiny_model, tmp_path):
    from dfgen.tiny import build_tiny

    other = build_tiny(tmp_path / "other", seed=1)
    _, p1 = load_policy(tiny_model)
    _, p2 = load_policy(other)
    assert model_fingerprint(tiny_model) == model_fingerprint(tiny_model)
    assert model_fingerprint(tiny_model) != model_fingerprint(other)
    assert tokenizer_fingerprint(p1.tokenizer) == tokenizer_fingerprint(load_policy(tiny_model)[1].tokenizer)
    assert len(tokenizer_fingerprint(p2.tokenizer)) == 16


def test_a_folder_that_is_not_a_vlm_is_refused_clearly(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_policy(tmp_path / "missing")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 8}))
    with pytest.raises(UserError, match="not a vision-language model"):
        load_policy(tmp_path / "text")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_policy(tmp_path / "empty")


def test_image_decoding_refuses_bombs_corrupt_and_empty_data():
    import io

    from PIL import Image

    with pytest.raises(UserError, match="empty"):
        decode_image(b"")
    with pytest.raises(UserError, match="undecodable"):
        decode_image(b"\x89PNG\r\n\x1a\nnot really")
    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, format="PNG")
    with pytest.raises(UserError, match="too large"):
        decode_image(buf.getvalue(), max_pixels=1_000_000)
    buf = io.BytesIO()
    Image.new("P", (20, 20)).save(buf, format="PNG")  # unexpected mode -> converted
    assert decode_image(buf.getvalue()).mode == "RGB"
