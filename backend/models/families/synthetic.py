"""Tiny random-weight checkpoints of every registered VLM family, built offline in well under a second each and
saved with save_pretrained, so they load through Tandem's real loading path (`load_vlm`).

Architectures, processors and tokenizer classes are those of the real hub checkpoints; only the sizes are
tiny. Each family module holds its own recipe (`Family.tiny`); this module holds what they share.
Tokenizers are built from scratch: every transformers tokenizer class can be constructed without vocab
files and retrained on a small corpus that covers printable ASCII, so any prompt tokenizes.
Traps recorded in ../shared/research/vlm.md: OWL's queries are valid only when input_ids[:, 0] > 0 (pad
id 0); Grounding DINO hard-codes BERT ids 101/102/1012/1029; PaliGemma's processor adds 1,152 tokens;
Florence-2 needs `post_processor_config` in its processor config.
"""

from __future__ import annotations

import string
import tempfile
from pathlib import Path

IMG = 224
TXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=1024)
CORPUS = [
    " ".join(string.printable.strip()),
    string.printable,
    "a photo of a cat. a photo of a dog. square circle triangle. person car bird.",
    "Which one of these is shown in the image? Answer with one of them. Locate every instance of these categories",
    "Report the bbox coordinates in JSON format. detect answer en",
    '{"bbox_2d": [12, 34, 56, 78], "label": "cat"}',
    "<|im_start|>system You are a helpful assistant.<|im_end|> <|im_start|>user <|im_end|> <|im_start|>assistant",
    "User: Assistant: USER: ASSISTANT: <end_of_utterance>",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000",
]


def tiny_tokenizer(cls, vocab_size=400, new_special_tokens=None, byte_level=False, named_tokens=None, **init):
    from tokenizers import pre_tokenizers

    base = cls(**init)
    kw = {}
    if byte_level:
        kw["initial_alphabet"] = pre_tokenizers.ByteLevel.alphabet()
        vocab_size = max(vocab_size, 256 + 64)
    tok = base.train_new_from_iterator(CORPUS * 5, vocab_size=vocab_size, new_special_tokens=new_special_tokens, **kw)
    if named_tokens:  # model-specific named tokens (Florence-2's image_token) persist only via a reload
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as d:
            tok.save_pretrained(d)
            tok = AutoTokenizer.from_pretrained(d, **named_tokens)
    return tok


def save(model, processor, out: Path) -> Path:
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build(name: str, root: Path) -> Path:
    """The tiny checkpoint `name` (a key of some family's `tiny`) under `root`, built once per root (the folder
    is reused when it already holds a checkpoint), from a fixed seed."""
    import torch

    from backend.models.families import TINY_BUILDERS

    out = Path(root) / name
    if not (out / "config.json").exists():
        torch.manual_seed(0)
        TINY_BUILDERS[name](out)
    return out
