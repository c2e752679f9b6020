"""SigLIP and SigLIP2: zero-shot classifiers trained with independent sigmoids, on text padded to 64 tokens
(other lengths shift their logits)."""

from __future__ import annotations

from pathlib import Path

from backend.models.families.spec import Family, LoaderKind
from backend.models.families.synthetic import IMG, save, tiny_tokenizer


def build_tiny(out: Path) -> Path:
    """SigLIP v1 architecture; the tokenizer is the tokenizers-backed Siglip2Tokenizer (the real v1
    checkpoints' SentencePiece tokenizer needs a model file that cannot be built from nothing)."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor, Siglip2Tokenizer

    tok = tiny_tokenizer(Siglip2Tokenizer, model_max_length=64)
    cfg = SiglipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMG, patch_size=32),
    )
    proc = SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": IMG, "width": IMG}), tokenizer=tok)
    return save(SiglipModel(cfg), proc, out)


def build_tiny_v2(out: Path) -> Path:
    """SigLIP2 (NaFlex): variable-resolution patches with a pixel attention mask."""
    from transformers import Siglip2Config, Siglip2ImageProcessor, Siglip2Model, Siglip2Processor, Siglip2Tokenizer

    tok = tiny_tokenizer(Siglip2Tokenizer, model_max_length=64)
    cfg = Siglip2Config(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           patch_size=16, num_patches=64),
    )
    proc = Siglip2Processor(image_processor=Siglip2ImageProcessor(patch_size=16, max_num_patches=64), tokenizer=tok)
    return save(Siglip2Model(cfg), proc, out)


FAMILY = Family(
    name="siglip",
    model_types=("siglip", "siglip2"),
    kind=LoaderKind.CLASSIFIER,
    sigmoid=True,
    text_length=64,
    tiny={"siglip": build_tiny, "siglip2": build_tiny_v2},
)
