"""Qwen2.5-VL (and Qwen2-VL, prompted and parsed the same way): a chat VLM that grounds boxes as JSON
`[{"bbox_2d": [x0, y0, x1, y1], "label": ...}]` in pixels of the image as resized by its processor.

No tiny Qwen2-VL is built: model type qwen2_vl shares this family's prompts, box format and LoRA targets.
"""

from __future__ import annotations

from pathlib import Path

from backend.models.families.spec import Family, LoaderKind, PromptStyle, llm_targets
from backend.models.families.synthetic import IMG, TXT, save, tiny_tokenizer
from backend.models.vlm.grounding import BoxFormat

PROMPT = PromptStyle(
    chat=True, answer_prefix="", end_of_turn="<|im_end|>",
    manual_prompt=("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                   "<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n"),
)

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
TEMPLATE = (  # the real checkpoints' chat template, for the tiny processor
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    tok = tiny_tokenizer(Qwen2Tokenizer, byte_level=True, new_special_tokens=SPECIALS)
    tok.eos_token = "<|im_end|>"
    return tok, {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}


def build_tiny(out: Path) -> Path:
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    tok, ids = tiny_qwen_tokenizer()
    cfg = Qwen2_5_VLConfig(
        text_config=dict(model_type="qwen2_5_vl_text", vocab_size=len(tok), rope_parameters=dict(
            rope_type="default", rope_theta=1e6, mrope_section=[2, 1, 1]),
            bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=ids["<|im_end|>"],
            pad_token_id=tok.pad_token_id, **TXT),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    ip = Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2,
                               size={"shortest_edge": 56 * 56, "longest_edge": IMG * IMG})
    vp = Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)
    proc = Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=TEMPLATE)
    return save(Qwen2_5_VLForConditionalGeneration(cfg), proc, out)


FAMILY = Family(
    name="qwen2_5_vl",
    model_types=("qwen2_5_vl", "qwen2_vl"),
    kind=LoaderKind.GENERATIVE,
    prompt=PROMPT,
    grounding=BoxFormat.QWEN_PIXELS,
    lora_targets=llm_targets("language_model"),
    tiny={"qwen2_5_vl": build_tiny},
)
