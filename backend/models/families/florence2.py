"""Florence-2 (transformers' own Florence2 class: florence-community/Florence-2-*): an encoder-decoder asked
with task tokens (<CAPTION>, <OD>, <CAPTION_TO_PHRASE_GROUNDING>), boxes as `label<loc_x0><loc_y0><loc_x1><loc_y1>`
in 1000 bins. microsoft/'s trust_remote_code checkpoints are refused (their code would come from the hub)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from backend.models.families.spec import Asks, Family, LoaderKind, PromptStyle
from backend.models.families.synthetic import IMG, save, tiny_tokenizer
from backend.models.vlm.grounding import BoxFormat


def classify_question(vlm: Asks, prompts: Sequence[str]) -> str:
    return "<CAPTION>"


def detect_question(vlm: Asks, prompts: Sequence[str]) -> str:
    return "<OD>" if vlm.florence_task == "<OD>" else vlm.florence_task + ". ".join(prompts) + "."


def refuse(config: Mapping[str, Any], source: str) -> str | None:
    if config.get("auto_map"):
        return (f"{source} is a trust_remote_code Florence-2 checkpoint (its code would be fetched from the hub); "
                "use florence-community/Florence-2-base or -large, which load with transformers' own Florence2 class")
    return None


PROMPT = PromptStyle(chat=False, answer_prefix="", end_of_turn=None, nested_images=False,
                     classify=classify_question, detect=detect_question)

POST_PROCESSOR = {
    "ocr": {"pattern": r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>",
            "area_threshold": 0.0},
    "phrase_grounding": {"banned_grounding_tokens": ["the image", "image", "images", "the", "a", "an", "a group",
                                                     "other objects", "lots", "a set"]},
    "pure_text": {}, "description_with_bboxes": {}, "description_with_polygons": {}, "polygons": {},
    "bboxes": {}, "description_with_bboxes_or_polygons": {},
}


def build_tiny(out: Path) -> Path:
    """The native class (florence-community/Florence-2-*), not microsoft/'s trust_remote_code repos."""
    from transformers import (BartTokenizer, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor)

    loc = [f"<loc_{i}>" for i in range(1000)]
    tok = tiny_tokenizer(BartTokenizer, byte_level=True, new_special_tokens=["<image>"] + loc,
                         named_tokens={"image_token": "<image>"})
    vision = dict(in_channels=3, depths=[1, 1, 1, 1], patch_size=[7, 3, 3, 3], patch_stride=[4, 2, 2, 2],
                  patch_padding=[3, 1, 1, 1], patch_prenorm=[False, True, True, True], embed_dim=[8, 16, 16, 32],
                  num_heads=[1, 1, 1, 2], num_groups=[1, 1, 1, 2], window_size=7, projection_dim=32,
                  max_temporal_embeddings=2, max_position_embeddings=50)
    text = dict(model_type="bart", vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1,
                encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                max_position_embeddings=1024, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id)
    cfg = Florence2Config(vision_config=vision, text_config=text, image_token_id=tok.image_token_id)
    ip = CLIPImageProcessor(size={"height": IMG, "width": IMG}, crop_size={"height": IMG, "width": IMG},
                            do_center_crop=False)
    ip.image_seq_length = (IMG // 32) ** 2 + 1
    proc = Florence2Processor(image_processor=ip, tokenizer=tok, post_processor_config=POST_PROCESSOR)
    return save(Florence2ForConditionalGeneration(cfg), proc, out)


FAMILY = Family(
    name="florence2",
    model_types=("florence2",),
    kind=LoaderKind.GENERATIVE,
    prompt=PROMPT,
    grounding=BoxFormat.FLORENCE2,
    lora_targets=r".*language_model.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)",
    refuse=refuse,
    tiny={"florence2": build_tiny},
)
