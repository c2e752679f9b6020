"""PaliGemma: task prefixes instead of a chat ("answer en ...", "detect a ; b"), boxes as
`<locY0><locX0><locY1><locX1> label ; ...` in 1024 bins, y first. Its processor adds <image>, 1,024 <locDDDD>
and 128 <segDDD> tokens, and masks the prompt itself when given the answer as `suffix`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from backend.models.families.spec import Asks, Family, LoaderKind, PromptStyle, llm_targets
from backend.models.families.synthetic import IMG, TXT, save, tiny_tokenizer
from backend.models.vlm.grounding import BoxFormat


def classify_question(vlm: Asks, prompts: Sequence[str]) -> str:
    return "answer en " + vlm.classify_question.format(options=", ".join(prompts))


def detect_question(vlm: Asks, prompts: Sequence[str]) -> str:
    return "detect " + " ; ".join(prompts)


PROMPT = PromptStyle(chat=False, answer_prefix="", end_of_turn=None, prompt_prefix="<image>", nested_images=False,
                     answer_as_suffix=True, classify=classify_question, detect=detect_question)


def build_tiny(out: Path) -> Path:
    from transformers import (GemmaTokenizer, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor,
                              SiglipImageProcessor)

    tok = tiny_tokenizer(GemmaTokenizer)
    patch = 32
    ip = SiglipImageProcessor(size={"height": IMG, "width": IMG})
    ip.image_seq_length = (IMG // patch) ** 2
    proc = PaliGemmaProcessor(image_processor=ip, tokenizer=tok)  # adds <image>, 1024 <locDDDD>, 128 <segDDD>
    tok = proc.tokenizer
    cfg = PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=IMG, patch_size=patch, projection_dim=32),
        text_config=dict(model_type="gemma", vocab_size=len(tok), head_dim=8, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **TXT),
        image_token_index=proc.image_token_id, projection_dim=32,
    )
    return save(PaliGemmaForConditionalGeneration(cfg), proc, out)


FAMILY = Family(
    name="paligemma",
    model_types=("paligemma",),
    kind=LoaderKind.GENERATIVE,
    prompt=PROMPT,
    grounding=BoxFormat.PALIGEMMA,
    lora_targets=llm_targets("language_model"),
    tiny={"paligemma": build_tiny},
)
