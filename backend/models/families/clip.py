"""CLIP and its relatives (MetaCLIP 2, Chinese-CLIP, AltCLIP, ALIGN): zero-shot classifiers trained with a
softmax over texts."""

from __future__ import annotations

from pathlib import Path

from backend.models.families.spec import Family, LoaderKind
from backend.models.families.synthetic import IMG, save, tiny_tokenizer


def build_tiny(out: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tok = tiny_tokenizer(CLIPTokenizer, byte_level=True, model_max_length=32)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMG, patch_size=32),
        projection_dim=32,
    )
    ip = CLIPImageProcessor(size={"shortest_edge": IMG}, crop_size={"height": IMG, "width": IMG})
    return save(CLIPModel(cfg), CLIPProcessor(image_processor=ip, tokenizer=tok), out)


FAMILY = Family(
    name="clip",
    model_types=("clip", "metaclip_2", "chinese_clip", "altclip", "align"),
    kind=LoaderKind.CLASSIFIER,
    tiny={"clip": build_tiny},
)
