"""LLaVA-1.5: a chat VLM for classification (not trained to ground boxes)."""

from __future__ import annotations

from pathlib import Path

from backend.models.families.spec import Family, LoaderKind, PromptStyle, llm_targets
from backend.models.families.synthetic import IMG, TXT, save, tiny_tokenizer

PROMPT = PromptStyle(chat=True, answer_prefix=" ", end_of_turn=None,
                     manual_prompt="USER: <image>\n{q} ASSISTANT:")

TEMPLATE = (  # the real checkpoints' chat template, for the tiny processor
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_tiny(out: Path) -> Path:
    from transformers import CLIPImageProcessor, LlamaTokenizer, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = tiny_tokenizer(LlamaTokenizer, new_special_tokens=["<image>", "<pad>"], pad_token="<pad>")
    tok.pad_token = "<pad>"
    patch = 32
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=IMG, patch_size=patch, projection_dim=32),
        text_config=dict(model_type="llama", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **TXT),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=(IMG // patch) ** 2,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    ip = CLIPImageProcessor(size={"shortest_edge": IMG}, crop_size={"height": IMG, "width": IMG})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=TEMPLATE)
    return save(LlavaForConditionalGeneration(cfg), proc, out)


FAMILY = Family(
    name="llava",
    model_types=("llava",),
    kind=LoaderKind.GENERATIVE,
    prompt=PROMPT,
    grounding=None,
    lora_targets=llm_targets("language_model"),
    tiny={"llava": build_tiny},
)
