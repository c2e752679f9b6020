"""SmolVLM (SmolVLM-256M/500M-Instruct are model_type idefics3; SmolVLM2 is smolvlm): a chat VLM for
classification (not trained to ground boxes); its language model is `text_model`."""

from __future__ import annotations

from pathlib import Path

from backend.models.families.spec import Family, LoaderKind, PromptStyle, llm_targets
from backend.models.families.synthetic import IMG, TXT, save, tiny_tokenizer

PROMPT = PromptStyle(chat=True, answer_prefix=" ", end_of_turn="<end_of_utterance>",
                     manual_prompt="<|im_start|>User:<image>{q}<end_of_utterance>\nAssistant:")

TEMPLATE = (  # the real checkpoints' chat template, for the tiny processor
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_tiny_idefics3(out: Path) -> Path:
    from transformers import (GPT2Tokenizer, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor,
                              Idefics3Processor)

    specials = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    specials += [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tok = tiny_tokenizer(GPT2Tokenizer, byte_level=True, new_special_tokens=specials)
    tok.eos_token = "<end_of_utterance>"
    tok.pad_token = "<|endoftext|>"
    patch, scale = 16, 2
    cfg = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMG, patch_size=patch),
        text_config=dict(model_type="llama", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **TXT),
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=scale,
    )
    ip = Idefics3ImageProcessor(size={"longest_edge": IMG}, max_image_size={"longest_edge": IMG}, do_image_splitting=False)
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=(IMG // patch) ** 2 // scale**2,
                             chat_template=TEMPLATE)
    return save(Idefics3ForConditionalGeneration(cfg), proc, out)


FAMILY = Family(
    name="smolvlm",
    model_types=("idefics3", "smolvlm"),
    kind=LoaderKind.GENERATIVE,
    prompt=PROMPT,
    grounding=None,
    lora_targets=llm_targets("text_model"),
    tiny={"idefics3": build_tiny_idefics3},
)
