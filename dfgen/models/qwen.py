"""The Qwen-VL families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), and the tiny Qwen2-VL policy's model.

Image tensors are patch rows sized by ``image_grid_thw``; the vision tower (patch embedding,
blocks and merger) is ``model.visual``; generation ends at ``<|im_end|>``.
"""
from __future__ import annotations

from dfgen.models import Family

LORA = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
FAMILIES = (
    Family("qwen2-vl", ("qwen2_vl",), "Qwen2VLProcessor", ("model.visual",), LORA, "<|im_end|>",
           grid_split=True, fast_decode=True, shared_prefix=True),
    Family("qwen2.5-vl", ("qwen2_5_vl",), "Qwen2_5_VLProcessor", ("model.visual",), LORA, "<|im_end|>",
           grid_split=True, shared_prefix=True),
    Family("qwen3-vl", ("qwen3_vl",), "Qwen3VLProcessor", ("model.visual",), LORA, "<|im_end|>",
           grid_split=True, shared_prefix=True),
)


def tiny_qwen2_vl(tok, ids: dict, hidden: int, layers: int, heads: int, vision_depth: int,
                  min_pixels: int, max_pixels: int, chat_template: str):
    """(model, processor) of a random-init Qwen2-VL with the given tokenizer (``ids``: its special tokens)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    from dfgen.models import _allow_missing

    head_dim = hidden // heads
    vocab = (len(tok) + 63) // 64 * 64
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 2), max_position_embeddings=1024,
                         # mrope_section must sum to head_dim/2 (the default assumes head_dim 128)
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                          "mrope_section": [head_dim // 8, 3 * head_dim // 16,
                                                            3 * head_dim // 16]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=vision_depth, embed_dim=64, hidden_size=hidden, num_heads=4, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    model = Qwen2VLForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    with _allow_missing():
        proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels),
                                tokenizer=tok, video_processor=None, chat_template=chat_template)
    return model, proc
