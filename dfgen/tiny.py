"""The tiny offline policy: ``build_tiny(out)`` makes, fully offline in about a second, a
~1M-parameter Qwen2-VL policy: a byte-level BPE tokenizer trained on the synthetic corpus (every
digit its own token, so a wrong number is one masked token), a Qwen-style chat template, a Qwen2-VL
image processor sized for 56-112 px images (4-16 image tokens, one per 28-px cell), and random
weights. It is saved as a standard HF folder that ``transformers`` and vLLM load
(``dfgen.policy.load_policy``). ``hidden=256, layers=4`` gives the ~5M variant.

No torch at import (the CLI reads ``build_tiny``'s defaults for ``--help``).

Run: ``dfgen tiny --out runs/tiny``.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112


def train_bpe(texts: list[str], specials: list[str], vocab_size: int = 1024):
    """A byte-level BPE (every digit its own token) trained on ``texts``, ``specials`` first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    return tk


def build_tokenizer(texts: list[str], vocab_size: int = 1024):
    from transformers import PreTrainedTokenizerFast

    tk = train_bpe(texts, SPECIAL, vocab_size)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=SPECIAL[1:])
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def build_tiny(out: Path, seed: int = 0, hidden: int = 128, layers: int = 2, heads: int = 4,
               vision_depth: int = 2) -> Path:
    """Build and save the tiny policy. ``hidden=256, layers=4`` gives the ~5M variant."""
    import torch

    from dfgen.models import save_processor
    from dfgen.models.qwen import tiny_qwen2_vl
    from dfgen.synth.grid import corpus_texts

    out = Path(out)
    torch.manual_seed(seed)
    tok = build_tokenizer(corpus_texts(seed=seed))
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    model, processor = tiny_qwen2_vl(tok, ids, hidden, layers, heads, vision_depth, MIN_PIXELS, MAX_PIXELS,
                                     CHAT_TEMPLATE)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    save_processor(processor, tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
