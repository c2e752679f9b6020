"""Tiny random-weight checkpoints of every VLM family Tandem supports (11), built offline in well under a second
each, saved with save_pretrained and then loaded through Tandem's real loading path (`load_vlm`).

Architectures, processors and tokenizer classes are those of the real hub checkpoints; only the sizes are
tiny. Tokenizers are built from scratch: every transformers tokenizer class can be constructed without vocab
files and retrained on a small corpus that covers printable ASCII, so any prompt tokenizes.
Traps recorded in ../shared/research/vlm.md: OWL's queries are valid only when input_ids[:, 0] > 0 (pad
id 0); Grounding DINO hard-codes BERT ids 101/102/1012/1029; PaliGemma's processor adds 1,152 tokens;
Florence-2 needs `post_processor_config` in its processor config.
"""

from __future__ import annotations

import string
import tempfile
from pathlib import Path

import torch
from tokenizers import pre_tokenizers

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

LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def tiny_tokenizer(cls, vocab_size=400, new_special_tokens=None, byte_level=False, named_tokens=None, **init):
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


def _save(model, processor, out: Path) -> Path:
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_owlv2(out: Path) -> Path:
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
    return _save(Owlv2ForObjectDetection(cfg), proc, out)


def _bert_vocab() -> dict[str, int]:
    vocab = [f"[unused{i}]" for i in range(1030)]
    vocab[0], vocab[100], vocab[101], vocab[102], vocab[103] = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
    vocab[1012], vocab[1029] = ".", "?"  # Grounding DINO splits phrases on these hard-coded BERT ids
    free = iter(i for i, v in enumerate(vocab) if v.startswith("[unused") and i > 103)
    chars = [c for c in string.ascii_lowercase + string.digits + string.punctuation if c not in ".?"]
    words = ["a", "photo", "of", "cat", "dog", "square", "circle", "triangle", "person", "car", "the"]
    for tok in words + chars + ["##" + c for c in string.ascii_lowercase + string.digits]:
        vocab[next(free)] = tok
    return {t: i for i, t in enumerate(vocab)}


def build_grounding_dino(out: Path) -> Path:
    from transformers import (BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    tok = BertTokenizer(vocab=_bert_vocab(), do_lower_case=True, model_max_length=32)
    cfg = GroundingDinoConfig(
        backbone_config=SwinConfig(window_size=7, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                   image_size=IMG, out_indices=[2, 3, 4]),
        text_config=dict(model_type="bert", vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=16, max_position_embeddings=32),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=20, encoder_n_points=2, decoder_n_points=2, max_text_len=32,
    )
    ip = GroundingDinoImageProcessor(size={"shortest_edge": IMG, "longest_edge": 2 * IMG})
    return _save(GroundingDinoForObjectDetection(cfg), GroundingDinoProcessor(image_processor=ip, tokenizer=tok), out)


def build_clip(out: Path) -> Path:
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
    return _save(CLIPModel(cfg), CLIPProcessor(image_processor=ip, tokenizer=tok), out)


def build_siglip(out: Path) -> Path:
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
    return _save(SiglipModel(cfg), proc, out)


def build_siglip2(out: Path) -> Path:
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
    return _save(Siglip2Model(cfg), proc, out)


def build_llava(out: Path) -> Path:
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
                          num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    return _save(LlavaForConditionalGeneration(cfg), proc, out)


QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    tok = tiny_tokenizer(Qwen2Tokenizer, byte_level=True, new_special_tokens=QWEN_SPECIALS)
    tok.eos_token = "<|im_end|>"
    return tok, {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}


def build_qwen2_5_vl(out: Path) -> Path:
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    tok, ids = _qwen_tokenizer()
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
    proc = Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=QWEN_TEMPLATE)
    return _save(Qwen2_5_VLForConditionalGeneration(cfg), proc, out)


def build_qwen3_vl(out: Path) -> Path:
    from transformers import (Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                              Qwen3VLProcessor, Qwen3VLVideoProcessor)

    tok, ids = _qwen_tokenizer()
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
    template = QWEN_TEMPLATE.replace("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", "")
    proc = Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=template)
    return _save(Qwen3VLForConditionalGeneration(cfg), proc, out)


def build_idefics3(out: Path) -> Path:
    """SmolVLM-256M/500M-Instruct are model_type idefics3."""
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
                             chat_template=IDEFICS3_TEMPLATE)
    return _save(Idefics3ForConditionalGeneration(cfg), proc, out)


def build_paligemma(out: Path) -> Path:
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
    return _save(PaliGemmaForConditionalGeneration(cfg), proc, out)


FLORENCE_POST_PROCESSOR = {
    "ocr": {"pattern": r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>",
            "area_threshold": 0.0},
    "phrase_grounding": {"banned_grounding_tokens": ["the image", "image", "images", "the", "a", "an", "a group",
                                                     "other objects", "lots", "a set"]},
    "pure_text": {}, "description_with_bboxes": {}, "description_with_polygons": {}, "polygons": {},
    "bboxes": {}, "description_with_bboxes_or_polygons": {},
}


def build_florence2(out: Path) -> Path:
    """The native class (florence-community/Florence-2-*), not microsoft/'s trust_remote_code repos."""
    from transformers import (BartTokenizer, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor)

    loc = [f"<loc_{i}>" for i in range(1000)]
    tok = tiny_tokenizer(BartTokenizer, byte_level=True, new_special_tokens=["<image>"] + loc,
                         named_tokens={"image_token": "<image>"})
    vision = dict(in_channels=3, depths=[1, 1, 1, 1], patch_size=[7, 3, 3, 3], patch_stride=[4, 2, 2, 2],
                  patch_padding=[3, 1, 1, 1], patch_prenorm=[False, True, True, True], embed_dim=[8, 16, 16, 32],
                  num_heads=[1, 1, 1, 2], num_groups=[1, 1, 1, 2], window_size=7, projection_dim=32,
                  max_temporal_embeddings=2, max_position_embeddings=50)
    text = dict(model_type="bart", vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1,
                encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                max_position_embeddings=1024, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id)
    cfg = Florence2Config(vision_config=vision, text_config=text, image_token_id=tok.image_token_id)
    ip = CLIPImageProcessor(size={"height": IMG, "width": IMG}, crop_size={"height": IMG, "width": IMG},
                            do_center_crop=False)
    ip.image_seq_length = (IMG // 32) ** 2 + 1
    proc = Florence2Processor(image_processor=ip, tokenizer=tok, post_processor_config=FLORENCE_POST_PROCESSOR)
    return _save(Florence2ForConditionalGeneration(cfg), proc, out)


BUILDERS = {
    "owlv2": build_owlv2,
    "grounding_dino": build_grounding_dino,
    "clip": build_clip,
    "siglip": build_siglip,
    "siglip2": build_siglip2,
    "llava": build_llava,
    "qwen2_5_vl": build_qwen2_5_vl,
    "qwen3_vl": build_qwen3_vl,
    "idefics3": build_idefics3,
    "paligemma": build_paligemma,
    "florence2": build_florence2,
}


def build(name: str, root: Path) -> Path:
    """Build once per root (the folder is reused when it already holds a checkpoint)."""
    out = Path(root) / name
    if not (out / "config.json").exists():
        torch.manual_seed(0)
        BUILDERS[name](out)
    return out


def teach(model, examples, steps: int = 300, lr: float = 1e-2, target_loss: float = 0.01) -> tuple[float, float]:
    """Fine-tune every weight of a tiny generative VLM adapter on (image, question, answer) examples until it
    writes the answers; returns the first and last loss. Makes random weights say something checkable."""
    batch = model._to_device(model.teacher_forced(examples))
    optimizer = torch.optim.AdamW(model.model.parameters(), lr=lr)
    model.model.train()
    first = last = None
    for _ in range(steps):
        loss = model.model(**batch).loss
        first = loss.item() if first is None else first
        last = loss.item()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if last < target_loss:
            break
    model.model.eval()
    return first, last
