"""The other open VLM families: Idefics3, SmolVLM, LLaVA-OneVision, Gemma 3 and InternVL.

Vision towers include their projector (and LLaVA-OneVision's ``image_newline``), as the Qwen
tower includes its merger. LoRA targets the text model's attention projections only (the vision
encoders name theirs ``out_proj``/``projection_layer`` and live outside these paths).
"""
from __future__ import annotations

from dfgen.models import Family

TEXT_MODEL = r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj)"  # Idefics3/SmolVLM's Llama text model
LANGUAGE_MODEL = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
FAMILIES = (
    Family("idefics3", ("idefics3",), "Idefics3Processor", ("model.vision_model", "model.connector"), TEXT_MODEL,
           "<end_of_utterance>"),
    # images nested per prompt; num2words: its processor imports it (for video prompts, unused here)
    Family("smolvlm", ("smolvlm",), "SmolVLMProcessor", ("model.vision_model", "model.connector"), TEXT_MODEL,
           "<end_of_utterance>", nest_images=True, packages=("num2words",)),
    Family("llava-onevision", ("llava_onevision",), "LlavaOnevisionProcessor",
           ("model.vision_tower", "model.multi_modal_projector", "model.image_newline"), LANGUAGE_MODEL, "<|im_end|>"),
    Family("gemma3", ("gemma3",), "Gemma3Processor", ("model.vision_tower", "model.multi_modal_projector"),
           LANGUAGE_MODEL, "<end_of_turn>", nest_images=True),
    Family("internvl", ("internvl",), "InternVLProcessor", ("model.vision_tower", "model.multi_modal_projector"),
           LANGUAGE_MODEL, "<|im_end|>"),
)
