"""Grounding DINO (and MM-Grounding-DINO): a zero-shot detector whose boxes come with decoded phrases
('' or 'cat dog' happen), mapped back onto the labels; its BERT text encoder hard-codes ids 101/102/1012/1029."""

from __future__ import annotations

import string
from pathlib import Path

from backend.models.families.spec import Family, LoaderKind
from backend.models.families.synthetic import IMG, save


def bert_vocab() -> dict[str, int]:
    vocab = [f"[unused{i}]" for i in range(1030)]
    vocab[0], vocab[100], vocab[101], vocab[102], vocab[103] = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
    vocab[1012], vocab[1029] = ".", "?"  # Grounding DINO splits phrases on these hard-coded BERT ids
    free = iter(i for i, v in enumerate(vocab) if v.startswith("[unused") and i > 103)
    chars = [c for c in string.ascii_lowercase + string.digits + string.punctuation if c not in ".?"]
    words = ["a", "photo", "of", "cat", "dog", "square", "circle", "triangle", "person", "car", "the"]
    for tok in words + chars + ["##" + c for c in string.ascii_lowercase + string.digits]:
        vocab[next(free)] = tok
    return {t: i for i, t in enumerate(vocab)}


def build_tiny(out: Path) -> Path:
    from transformers import (BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    tok = BertTokenizer(vocab=bert_vocab(), do_lower_case=True, model_max_length=32)
    cfg = GroundingDinoConfig(
        backbone_config=SwinConfig(window_size=7, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                   image_size=IMG, out_indices=[2, 3, 4]),
        text_config=dict(model_type="bert", vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=16, max_position_embeddings=32),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=20, encoder_n_points=2, decoder_n_points=2, max_text_len=32,
    )
    ip = GroundingDinoImageProcessor(size={"shortest_edge": IMG, "longest_edge": 2 * IMG})
    return save(GroundingDinoForObjectDetection(cfg), GroundingDinoProcessor(image_processor=ip, tokenizer=tok), out)


FAMILY = Family(
    name="grounding_dino",
    model_types=("grounding-dino", "mm-grounding-dino"),
    kind=LoaderKind.DETECTOR,
    threshold=0.25,
    phrase_labels=True,
    same_size_batches=True,
    tiny={"grounding_dino": build_tiny},
)
