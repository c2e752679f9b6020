"""OWLv2 and OWL-ViT: zero-shot detectors scoring every image patch against every text query.

OWLv2 pads images to a square, so its boxes can reach past the image (the adapter clips them); a query is
valid only when input_ids[:, 0] > 0, hence the tiny tokenizer's pad id 0 is "!".
"""

from __future__ import annotations

from pathlib import Path

from backend.models.families.spec import Family, LoaderKind
from backend.models.families.synthetic import IMG, save, tiny_tokenizer


def build_tiny(out: Path) -> Path:
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    tok = tiny_tokenizer(CLIPTokenizer, byte_level=True, model_max_length=16,
                         vocab={"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}, pad_token="!")
    cfg = Owlv2Config(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMG, patch_size=32),
        projection_dim=32,
    )
    proc = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": IMG, "width": IMG}), tokenizer=tok)
    return save(Owlv2ForObjectDetection(cfg), proc, out)


FAMILY = Family(
    name="owlv2",
    model_types=("owlv2", "owlvit"),
    kind=LoaderKind.DETECTOR,
    threshold=0.1,
    tiny={"owlv2": build_tiny},
)
