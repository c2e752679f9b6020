"""Qwen3-VL: Qwen2.5-VL's JSON boxes, in 0..1000 relative coordinates; no default system turn."""

from __future__ import annotations

from pathlib import Path

from backend.models.families.qwen2_5_vl import TEMPLATE as QWEN2_5_TEMPLATE
from backend.models.families.qwen2_5_vl import tiny_qwen_tokenizer
from backend.models.families.spec import Family, LoaderKind, PromptStyle, llm_targets
from backend.models.families.synthetic import IMG, TXT, save
from backend.models.vlm.grounding import BoxFormat

PROMPT = PromptStyle(
    chat=True, answer_prefix="", end_of_turn="<|im_end|>",
    manual_prompt="<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n",
)


def build_tiny(out: Path) -> Path:
    from transformers import (Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                              Qwen3VLProcessor, Qwen3VLVideoProcessor)

    tok, ids = tiny_qwen_tokenizer()
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tok), head_dim=8, rope_parameters=dict(
            rope_type="default", rope_theta=5e6, mrope_section=[2, 1, 1], mrope_interleaved=True),
            bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=ids["<|im_end|>"],
            pad_token_id=tok.pad_token_id, **TXT),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    ip = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                               size={"shortest_edge": 64 * 64, "longest_edge": IMG * IMG},
                               image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    vp = Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2)
    template = QWEN2_5_TEMPLATE.replace("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", "")
    proc = Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=template)
    return save(Qwen3VLForConditionalGeneration(cfg), proc, out)


FAMILY = Family(
    name="qwen3_vl",
    model_types=("qwen3_vl",),
    kind=LoaderKind.GENERATIVE,
    prompt=PROMPT,
    grounding=BoxFormat.QWEN_1000,
    lora_targets=llm_targets("language_model"),
    tiny={"qwen3_vl": build_tiny},
)
