"""A lean decode loop for the Qwen2-VL text decoder (the hf backend's fast path).

Why: on a 2-core CPU the tiny policy's decode step is ~1.5 ms of arithmetic, but
``model.generate`` spends ~7 ms per step in Python (generation bookkeeping, mask and position
builders, cache objects, module hooks). This module runs the same arithmetic with none of that.

Contract (``decode``):

* the prompt is prefilled by the real model forward (``model(**inputs, use_cache=True)``, vision
  tower and 3D M-RoPE included, exactly what teacher forcing runs), which also leaves the
  per-row ``rope_deltas`` on ``model.model``;
* every later token is text, whose three M-RoPE components are equal, so its rotary embedding is
  the plain 1D one at position ``P_b + k + rope_delta_b`` (``P_b`` real prompt tokens of row b,
  ``k`` tokens generated before it): the position transformers' own decode step computes;
* each step runs embed -> [RMSNorm, fused q/k/v, rotary, GQA attention over a preallocated KV
  cache with the left-padding mask, o_proj, RMSNorm, fused gate/up SiLU MLP] x layers -> norm ->
  lm_head with the model's current weights (fused copies are made per call, so a model that was
  trained in between is never stale), and hands the last-position logits to ``step(logits) ->
  token ids`` (the sampler);
* with ``rows``, several samples continue one prefilled prompt (a GRPO group's prompt is rendered
  and prefilled once; its KV rows, mask and positions are copied per sample);
* it stops when every row has produced ``eos`` or after ``max_new_tokens``; rows that finished
  keep being fed (their later tokens are discarded by the caller), so every row's random
  stream is consumed exactly as under ``generate``.

``supported(model, inputs)`` says whether the fast path applies (Qwen2-VL text decoder with the
default rope, SiLU MLP, no sliding window, every prompt carrying an image); otherwise the backend
uses ``generate``. Checked against transformers 5.19 and 5.24 (whose caches expose ``.layers``). Equivalence with ``generate`` (same tokens,
logprobs to 1e-5) is a test, so a transformers upgrade that changes the model's math fails
loudly instead of drifting.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dfgen.models import family_of


def supported(model, inputs) -> bool:
    cfg = getattr(model.config, "text_config", None)
    if cfg is None or not family_of(model).fast_decode:
        return False
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default" or getattr(cfg, "use_sliding_window", False):
        return False
    if getattr(cfg, "hidden_act", None) != "silu":
        return False
    if "image_grid_thw" not in inputs or "mm_token_type_ids" not in inputs:
        return False
    n_img = (inputs["input_ids"] == model.config.image_token_id).any(-1)
    return bool(n_img.all()) and hasattr(getattr(model, "model", None), "language_model")


def _fused(lm):
    layers = []
    for layer in lm.layers:
        a, m = layer.self_attn, layer.mlp
        layers.append(dict(
            n1=layer.input_layernorm, n2=layer.post_attention_layernorm,
            wqkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
            bqkv=torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]),
            wo=a.o_proj.weight, wgu=torch.cat([m.gate_proj.weight, m.up_proj.weight]), wd=m.down_proj.weight))
    return layers


def _rms(x, norm):  # Qwen2-VL's RMSNorm (statistics in float32) as one fused op
    return F.rms_norm(x.float(), (x.shape[-1],), norm.weight.float(), norm.variance_epsilon).to(x.dtype)


def _rot(x, cos, sin_signed):
    """apply_rotary_pos_emb: x*cos + rotate_half(x)*sin, with rotate_half(x)*sin written as
    roll(x, hd/2) * [-sin_lo, sin_hi] (one roll instead of two slices, a negation and a cat)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


def _rotary_tables(rotary_emb, pos0, steps: int, hd: int, dt):
    """cos and sin of every decode step at once, (steps, B, 1, 1, hd) each, computed in float32 as
    transformers computes them; sin carries the sign of rotate_half's first half."""
    B = pos0.shape[0]
    pos = (pos0.unsqueeze(0) + torch.arange(steps, device=pos0.device).unsqueeze(1)).float()  # (S, B)
    freqs = pos.unsqueeze(-1) * rotary_emb.inv_freq.float()
    emb = torch.cat((freqs, freqs), -1) * getattr(rotary_emb, "attention_scaling", 1.0)
    sin = emb.sin()
    sin[..., : hd // 2] *= -1
    return emb.cos().to(dt).view(-1, B, 1, 1, hd), sin.to(dt).view(-1, B, 1, 1, hd)


@torch.inference_mode()
def decode(model, inputs, max_new_tokens: int, eos_id: int, step, rows=None) -> list[list[int]]:
    """Prefill ``inputs`` (left-padded processor output) and decode; returns the sampled token
    ids per row (``max_new_tokens`` each, or fewer when all rows stopped). ``step(logits (B, V)
    float32) -> LongTensor (B,)`` picks each row's next token. ``rows`` (LongTensor, optional)
    decodes several samples per prompt from one prefill: output row r continues input row
    ``rows[r]`` (its KV cache, mask and positions are copied), so a GRPO group's prompt is
    rendered and prefilled once instead of once per sample."""
    cfg = model.config.text_config
    lm = model.model.language_model
    model.model.rope_deltas = None
    out = model(**inputs, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    deltas = model.model.rope_deltas
    am, logits0, kv = inputs["attention_mask"], out.logits[:, -1], [(c.keys, c.values) for c in cache.layers]
    if rows is not None:
        am, logits0, kv = am[rows], logits0[rows], [(k[rows], v[rows]) for k, v in kv]
        deltas = deltas[rows] if deltas is not None else None
    B, L = am.shape
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // nh
    layers = _fused(lm)
    dt, dev = layers[0]["wqkv"].dtype, layers[0]["wqkv"].device
    K = [torch.zeros(B, nkv, L + max_new_tokens, hd, dtype=dt, device=dev) for _ in layers]
    V = [torch.zeros_like(k) for k in K]
    for i, (k, v) in enumerate(kv):
        K[i][:, :, :L] = k
        V[i][:, :, :L] = v
    mask = torch.zeros(B, 1, 1, L + max_new_tokens, dtype=dt, device=dev)  # additive: -inf on left padding
    mask[:, 0, 0, :L].masked_fill_(am == 0, float("-inf"))
    pos0 = am.sum(-1) + (deltas.view(-1) if deltas is not None else 0)  # (B,) position of token 0
    COS, SIN = _rotary_tables(lm.rotary_emb, pos0, max_new_tokens, hd, dt)
    embed, norm, head = lm.embed_tokens.weight, lm.norm, model.lm_head.weight
    qd, kd, rep, scaling = nh * hd, nkv * hd, nh // nkv, hd ** -0.5

    tok = step(logits0.float())
    toks, done = [tok], tok == eos_id
    for k in range(max_new_tokens - 1):
        if bool(done.all()):
            break
        t, cos, sin = L + k, COS[k], SIN[k]
        x = embed[tok]  # (B, H)
        for i, w in enumerate(layers):
            qkv = F.linear(_rms(x, w["n1"]), w["wqkv"], w["bqkv"])
            qk = _rot(qkv[:, : qd + kd].view(B, nh + nkv, 1, hd), cos, sin)  # rotary on q and k at once
            K[i][:, :, t: t + 1] = qk[:, nh:]
            V[i][:, :, t: t + 1] = qkv[:, qd + kd:].view(B, nkv, 1, hd)
            # attention for one query: query head j reads kv head j // rep (transformers' repeat_kv)
            s_ = qk[:, :nh].reshape(B, nkv, rep, hd) @ K[i][:, :, : t + 1].transpose(-1, -2)
            a = torch.softmax(s_ * scaling + mask[..., : t + 1], -1) @ V[i][:, :, : t + 1]
            x = x + F.linear(a.view(B, qd), w["wo"])
            g, u = F.linear(_rms(x, w["n2"]), w["wgu"]).chunk(2, -1)
            x = x + F.linear(F.silu(g) * u, w["wd"])
        tok = step(F.linear(_rms(x, norm), head).float())
        toks.append(tok)
        done = done | (tok == eos_id)
    model.model.rope_deltas = None  # an inference-mode tensor; never let a later forward reuse it
    return torch.stack(toks, 1).tolist()
