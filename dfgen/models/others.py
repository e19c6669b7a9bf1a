"""The other open VLM families: Idefics3, SmolVLM, LLaVA-OneVision, Gemma 3 and InternVL.

Vision towers include their projector (and LLaVA-OneVision's ``image_newline``), as the Qwen
tower includes its merger. LoRA targets the text model's attention projections only (the vision
encoders name theirs ``out_proj``/``projection_layer`` and live outside these paths).
"""
from __future__ import annotations

from dfgen.models import Family

TEXT_MODEL = r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj)"  # Idefics3/SmolVLM's Llama text model
LANGUAGE_MODEL = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
# the hub's (and vLLM's) name for a SigLIP/CLIP tower's weights; transformers 5.25 saves them without
# `vision_model.` and reads either (see dfgen.models's save_renames)
SIGLIP_HUB = (r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model.")

FAMILIES = (
    Family("idefics3", ("idefics3",), "Idefics3Processor", ("model.vision_model", "model.connector"), TEXT_MODEL,
           "<end_of_utterance>", shared_prefix=True),
    # images nested per prompt; num2words: its processor imports it (for video prompts, unused here)
    Family("smolvlm", ("smolvlm",), "SmolVLMProcessor", ("model.vision_model", "model.connector"), TEXT_MODEL,
           "<end_of_utterance>", nest_images=True, packages=("num2words",), shared_prefix=True),
    Family("llava-onevision", ("llava_onevision",), "LlavaOnevisionProcessor",
           ("model.vision_tower", "model.multi_modal_projector", "model.image_newline"), LANGUAGE_MODEL, "<|im_end|>",
           save_renames=(SIGLIP_HUB,), shared_prefix=True),
    Family("gemma3", ("gemma3",), "Gemma3Processor", ("model.vision_tower", "model.multi_modal_projector"),
           LANGUAGE_MODEL, "<end_of_turn>", nest_images=True, save_renames=(SIGLIP_HUB,), shared_prefix=True),
    Family("internvl", ("internvl",), "InternVLProcessor", ("model.vision_tower", "model.multi_modal_projector"),
           LANGUAGE_MODEL, "<|im_end|>", shared_prefix=True),
)
