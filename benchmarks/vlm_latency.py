"""CPU latency per image of every VLM family Tandem supports, at the real checkpoints' size, through
Tandem's own adapters (so pre-processing, the forward passes, generation and post-processing are all in
the number).

Weights cannot be downloaded here, so each model is the *real architecture* of its hub checkpoint (the
config's hyper-parameters written out below, vocabulary size included) with random weights. That is valid
for timing: the compute cost of a forward pass depends on the architecture and the input shapes, not on
the weight values, and generation is run for a fixed length (`max_new_tokens`, with EOS suppressed until
then) so that random weights cannot stop it early. Detections are therefore a worst case for generation.
Processors are configured as the checkpoints' (image size, resizing, image-token counts); their tokenizers
are the same classes trained from scratch on a small corpus, which may split the short prompts into a few
more tokens than the real ones (small next to the hundreds of image tokens).

Random weights score every candidate box alike, which real models do not: with `threshold=0` OWLv2's
3,600 patch boxes would all reach NMS (seconds of post-processing that a trained model never pays). The
zero-shot detectors' threshold is therefore calibrated, untimed, so that about `max_det` (100) boxes pass,
as many as the adapter keeps.

Results are merged into those already in --out: re-measuring some families (or one in another dtype)
keeps the other rows.

    uv run python benchmarks/vlm_latency.py [--families clip owlv2 ...] [--runs 3] [--include-7b]
                                            [--out benchmarks/results] [--max-wait 900] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import string
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from tokenizers import pre_tokenizers  # noqa: E402
from transformers.initialization import no_init_weights  # noqa: E402

from backend.datasets.shapes import render_sample  # noqa: E402
from backend.models.base import ModelTask  # noqa: E402
from backend.models.vlm.base import Vocabulary  # noqa: E402
from backend.models.vlm.generative import CLASSIFY_QUESTION, DETECT_QUESTION, GenerativeVlm  # noqa: E402
from backend.models.vlm.zero_shot import ZeroShotClassifier, ZeroShotDetector  # noqa: E402

THREADS = 2
LABELS = ("square", "circle", "triangle")
IMAGE_SIZE = (640, 480)
MAX_NEW_TOKENS = 64
MAX_DET = 100
console = Console()

# ------------------------------------------------------------------------------------------ tokenizers
_OPTIONS = ", ".join(LABELS)
CORPUS = [
    " ".join(string.printable.strip()),
    string.printable,
    CLASSIFY_QUESTION.format(options=_OPTIONS),
    DETECT_QUESTION.format(options=_OPTIONS),
    "a photo of a square. a photo of a circle. a photo of a triangle. square. circle. triangle.",
    "answer en detect square ; circle ; triangle <CAPTION> <CAPTION_TO_PHRASE_GROUNDING>",
    '{"bbox_2d": [12, 34, 56, 78], "label": "square"}',
    "<|im_start|>system You are a helpful assistant.<|im_end|> <|im_start|>user <|im_start|>assistant",
    "User: Assistant: USER: ASSISTANT: <end_of_utterance>",
]


def train_tokenizer(cls, specials=(), byte_level=False, named_tokens=None, vocab_size=1000, **init):
    """The checkpoint's tokenizer class (pipeline, special tokens) with a vocabulary learnt from CORPUS."""
    kw = {"initial_alphabet": pre_tokenizers.ByteLevel.alphabet()} if byte_level else {}
    tok = cls(**init).train_new_from_iterator(
        CORPUS * 5, vocab_size=vocab_size, new_special_tokens=list(specials) or None, **kw
    )
    if named_tokens:  # model-specific named tokens (Florence-2's image_token) persist only via a reload
        with tempfile.TemporaryDirectory() as d:
            tok.save_pretrained(d)
            tok = transformers.AutoTokenizer.from_pretrained(d, **named_tokens)
    return tok


def bert_vocab() -> dict[str, int]:
    """Grounding DINO hard-codes BERT's ids for [CLS] 101, [SEP] 102, '.' 1012 and '?' 1029."""
    vocab = [f"[unused{i}]" for i in range(1030)]
    vocab[0], vocab[100], vocab[101], vocab[102], vocab[103], vocab[1012], vocab[1029] = (
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        ".",
        "?",
    )
    free = iter(i for i, v in enumerate(vocab) if v.startswith("[unused") and i > 103)
    chars = [c for c in string.ascii_lowercase + string.digits + string.punctuation if c not in ".?"]
    for tok in (
        [*LABELS, "a", "photo", "of"] + chars + ["##" + c for c in string.ascii_lowercase + string.digits]
    ):
        vocab[next(free)] = tok
    return {t: i for i, t in enumerate(vocab)}


def ids(tok, *tokens: str) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def special_ids(tok) -> dict:
    return dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


# ------------------------------------------------------------------------------------------ families
# Each family: processor() -> processor; config(processor) -> config of the real checkpoint's architecture.
T = transformers


def clip_processor():
    tok = train_tokenizer(T.CLIPTokenizer, byte_level=True, model_max_length=77)
    return T.CLIPProcessor(image_processor=T.CLIPImageProcessor(), tokenizer=tok)  # resize 224 + centre crop


def clip_config(proc):
    # the class defaults are openai/clip-vit-base-patch32
    return T.CLIPConfig(text_config=special_ids(proc.tokenizer))


def siglip_processor():
    # the real SentencePiece tokenizer needs a model file; the tokenizers-backed Siglip2Tokenizer stands in
    tok = train_tokenizer(T.Siglip2Tokenizer, model_max_length=64)
    return T.SiglipProcessor(
        image_processor=T.SiglipImageProcessor(size={"height": 224, "width": 224}), tokenizer=tok
    )


def siglip_config(proc):
    # the class defaults are google/siglip-base-patch16-224
    return T.SiglipConfig(text_config=special_ids(proc.tokenizer))


def owlv2_processor():
    # pad "!" at id 0: OWL keeps a query only if input_ids[:, 0] > 0, as with the real tokenizer
    tok = train_tokenizer(
        T.CLIPTokenizer,
        byte_level=True,
        model_max_length=16,
        pad_token="!",
        vocab={"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2},
    )
    ip = T.Owlv2ImageProcessor(size={"height": 960, "width": 960})
    return T.Owlv2Processor(image_processor=ip, tokenizer=tok)


def owlv2_config(proc):
    # google/owlv2-base-patch16-ensemble: ViT-B/16 at 960 px (60x60 = 3,600 patch boxes), 16-token queries
    return T.Owlv2Config(text_config=special_ids(proc.tokenizer), vision_config=dict(image_size=960))


def gdino_processor():
    tok = T.BertTokenizer(vocab=bert_vocab(), do_lower_case=True, model_max_length=256)
    ip = T.GroundingDinoImageProcessor()  # shortest edge 800, longest 1333, as the checkpoint
    return T.GroundingDinoProcessor(image_processor=ip, tokenizer=tok)


def gdino_config(proc):
    return T.GroundingDinoConfig()  # class defaults == IDEA-Research/grounding-dino-tiny (Swin-T, BERT-base)


FLORENCE_POST_PROCESSOR = {"pure_text": {}, "bboxes": {}, "phrase_grounding": {"banned_grounding_tokens": []}}


def florence2_processor():
    loc = [f"<loc_{i}>" for i in range(1000)]
    tok = train_tokenizer(
        T.BartTokenizer, ["<image>", *loc], byte_level=True, named_tokens={"image_token": "<image>"}
    )
    ip = T.CLIPImageProcessor(
        size={"height": 768, "width": 768}, crop_size={"height": 768, "width": 768}, do_center_crop=False
    )
    ip.image_seq_length = 577  # (768/32)^2 + 1
    return T.Florence2Processor(
        image_processor=ip, tokenizer=tok, post_processor_config=FLORENCE_POST_PROCESSOR
    )


def florence2_config(proc):
    tok = proc.tokenizer
    return T.Florence2Config(  # florence-community/Florence-2-base: DaViT + BART-base encoder-decoder
        vision_config=dict(
            depths=[1, 1, 9, 1],
            embed_dim=[128, 256, 512, 1024],
            num_heads=[4, 8, 16, 32],
            num_groups=[4, 8, 16, 32],
            window_size=12,
            projection_dim=768,
        ),
        text_config=dict(
            model_type="bart",
            vocab_size=51289,
            d_model=768,
            encoder_layers=6,
            decoder_layers=6,
            encoder_attention_heads=12,
            decoder_attention_heads=12,
            encoder_ffn_dim=3072,
            decoder_ffn_dim=3072,
            max_position_embeddings=1024,
            decoder_start_token_id=tok.eos_token_id,
            **special_ids(tok),
        ),
        image_token_id=tok.image_token_id,
    )


def smolvlm_processor():
    specials = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    specials += [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tok = train_tokenizer(T.GPT2Tokenizer, specials, byte_level=True)
    tok.eos_token, tok.pad_token = "<end_of_utterance>", "<|endoftext|>"
    # the checkpoint's sizes, with image splitting off: one 512-px tile of 64 image tokens
    ip = T.Idefics3ImageProcessor(
        size={"longest_edge": 2048}, max_image_size={"longest_edge": 512}, do_image_splitting=False
    )
    return T.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=64)


def smolvlm_config(proc):
    tok = proc.tokenizer
    return T.Idefics3Config(  # HuggingFaceTB/SmolVLM-256M-Instruct
        text_config=dict(
            model_type="llama",
            vocab_size=49280,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=8192,
            rope_theta=100000,
            tie_word_embeddings=True,
            **special_ids(tok),
        ),
        vision_config=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=512,
            patch_size=16,
        ),
        scale_factor=4,
        image_token_id=ids(tok, "<image>")[0],
    )


QWEN_SPECIALS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def qwen_tokenizer():
    tok = train_tokenizer(T.Qwen2Tokenizer, QWEN_SPECIALS, byte_level=True)
    tok.eos_token = "<|im_end|>"
    return tok


def qwen_token_ids(tok) -> dict:
    image, video, start, end = ids(
        tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"
    )
    return dict(
        image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end
    )


def qwen25_processor():
    # min_pixels 3,136 / max_pixels 12,845,056 as in the checkpoint: 640x480 -> 644x476 -> 391 image tokens
    ip = T.Qwen2VLImageProcessor(
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": 3136, "longest_edge": 12845056},
    )
    vp = T.Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)
    return T.Qwen2_5_VLProcessor(image_processor=ip, tokenizer=qwen_tokenizer(), video_processor=vp)


def qwen25_config(proc):
    tok = proc.tokenizer
    return T.Qwen2_5_VLConfig(  # Qwen/Qwen2.5-VL-3B-Instruct
        text_config=dict(
            model_type="qwen2_5_vl_text",
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=128000,
            tie_word_embeddings=True,
            **special_ids(tok),
            rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24]),
        ),
        vision_config=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=2048,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
        tie_word_embeddings=True,
        **qwen_token_ids(tok),
    )


def qwen3_processor():
    # Qwen3-VL-2B-Instruct: patch 16, 65,536..16,777,216 pixels: 640x480 stays 640x480 -> 300 image tokens
    ip = T.Qwen2VLImageProcessor(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": 65536, "longest_edge": 16777216},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    vp = T.Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2)
    return T.Qwen3VLProcessor(image_processor=ip, tokenizer=qwen_tokenizer(), video_processor=vp)


def qwen3_config(proc):
    tok = proc.tokenizer
    return T.Qwen3VLConfig(  # Qwen/Qwen3-VL-2B-Instruct
        text_config=dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=262144,
            tie_word_embeddings=True,
            **special_ids(tok),
            rope_parameters=dict(
                rope_type="default", rope_theta=5e6, mrope_section=[24, 20, 20], mrope_interleaved=True
            ),
        ),
        vision_config=dict(
            depth=24,
            hidden_size=1024,
            intermediate_size=4096,
            num_heads=16,
            out_hidden_size=2048,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[5, 11, 17],
        ),
        tie_word_embeddings=True,
        **qwen_token_ids(tok),
    )


def paligemma_processor():
    ip = T.SiglipImageProcessor(size={"height": 224, "width": 224})
    ip.image_seq_length = 256  # (224/14)^2
    # the processor adds <image>, 1,024 <locDDDD> and 128 <segDDD> tokens to the tokenizer
    return T.PaliGemmaProcessor(image_processor=ip, tokenizer=train_tokenizer(T.GemmaTokenizer))


def paligemma_config(proc):
    tok = proc.tokenizer
    return T.PaliGemmaConfig(  # google/paligemma-3b-mix-224: SigLIP-So400m/14 + Gemma-2B
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            projection_dim=2048,
            vision_use_head=False,
        ),
        text_config=dict(
            model_type="gemma",
            vocab_size=257216,
            hidden_size=2048,
            intermediate_size=16384,
            num_hidden_layers=18,
            num_attention_heads=8,
            num_key_value_heads=1,
            head_dim=256,
            **special_ids(tok),
        ),
        image_token_index=proc.image_token_id,
        projection_dim=2048,
        hidden_size=2048,
    )


def llava_processor():
    tok = train_tokenizer(T.LlamaTokenizer, ["<image>", "<pad>"], pad_token="<pad>")
    tok.pad_token = "<pad>"
    ip = T.CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return T.LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )  # 576 image tokens


def llava_config(proc):
    tok = proc.tokenizer
    return T.LlavaConfig(  # llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 + Vicuna-7B
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            **special_ids(tok),
        ),
        image_token_index=ids(tok, "<image>")[0],
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


@dataclass(frozen=True)
class Family:
    key: str
    checkpoint: str
    model_class: str
    processor: Callable
    config: Callable
    adapter: str  # detector | classifier | generative
    tasks: tuple[ModelTask, ...]
    input: str  # what the model sees for one 640x480 image
    dtype: str = "fp32"  # fp32 | bf16 | auto (fp32 if it fits in free memory, else bf16)
    max_runs: int | None = None  # cap on timed runs for the slow ones
    gate: str | None = None  # a flag that must be given to run it at all


C, D = ModelTask.CLASSIFY, ModelTask.DETECT
FAMILIES = [
    Family(
        key="clip",
        checkpoint="openai/clip-vit-base-patch32",
        model_class="CLIPModel",
        processor=clip_processor,
        config=clip_config,
        adapter="classifier",
        tasks=(C,),
        input="224 px crop, 3 texts",
    ),
    Family(
        key="siglip",
        checkpoint="google/siglip-base-patch16-224",
        model_class="SiglipModel",
        processor=siglip_processor,
        config=siglip_config,
        adapter="classifier",
        tasks=(C,),
        input="224 px, 3 texts padded to 64 tokens",
    ),
    Family(
        key="owlv2",
        checkpoint="google/owlv2-base-patch16-ensemble",
        model_class="Owlv2ForObjectDetection",
        processor=owlv2_processor,
        config=owlv2_config,
        adapter="detector",
        tasks=(D,),
        input="padded to 960x960 (3,600 boxes), 3 queries",
    ),
    Family(
        key="grounding-dino",
        checkpoint="IDEA-Research/grounding-dino-tiny",
        model_class="GroundingDinoForObjectDetection",
        processor=gdino_processor,
        config=gdino_config,
        adapter="detector",
        tasks=(D,),
        input="1067x800, 900 queries, 3 phrases",
    ),
    Family(
        key="florence2",
        checkpoint="florence-community/Florence-2-base",
        model_class="Florence2ForConditionalGeneration",
        processor=florence2_processor,
        config=florence2_config,
        adapter="generative",
        tasks=(C, D),
        input="768x768 (577 image tokens)",
    ),
    Family(
        key="smolvlm",
        checkpoint="HuggingFaceTB/SmolVLM-256M-Instruct",
        model_class="Idefics3ForConditionalGeneration",
        processor=smolvlm_processor,
        config=smolvlm_config,
        adapter="generative",
        tasks=(C,),
        input="one 512-px tile, no splitting (64 image tokens)",
    ),
    Family(
        key="qwen2.5-vl",
        checkpoint="Qwen/Qwen2.5-VL-3B-Instruct",
        model_class="Qwen2_5_VLForConditionalGeneration",
        processor=qwen25_processor,
        config=qwen25_config,
        adapter="generative",
        tasks=(C, D),
        input="644x476 (391 image tokens)",
        dtype="auto",
        max_runs=1,
    ),
    Family(
        key="qwen3-vl",
        checkpoint="Qwen/Qwen3-VL-2B-Instruct",
        model_class="Qwen3VLForConditionalGeneration",
        processor=qwen3_processor,
        config=qwen3_config,
        adapter="generative",
        tasks=(C, D),
        input="640x480 (300 image tokens)",
        dtype="auto",
        max_runs=1,
    ),
    Family(
        key="paligemma",
        checkpoint="google/paligemma-3b-mix-224",
        model_class="PaliGemmaForConditionalGeneration",
        processor=paligemma_processor,
        config=paligemma_config,
        adapter="generative",
        tasks=(C, D),
        input="224x224 (256 image tokens)",
        dtype="bf16",
        max_runs=1,
    ),
    Family(
        key="llava",
        checkpoint="llava-hf/llava-1.5-7b-hf",
        model_class="LlavaForConditionalGeneration",
        processor=llava_processor,
        config=llava_config,
        adapter="generative",
        tasks=(C,),
        input="336 px crop (576 image tokens)",
        dtype="bf16",
        max_runs=1,
        gate="include_7b",
    ),
]

# ------------------------------------------------------------------------------------------ building


@contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def count_params(family: Family, config) -> int:
    """Free: the model is laid out on the meta device."""
    with torch.device("meta"):
        model = getattr(T, family.model_class)(config)
    return model.num_parameters()


def gib(n: float) -> float:
    return n / 2**30


def choose_dtype(policy: str, n_params: int) -> tuple[torch.dtype | None, str]:
    """fp32 / bf16 as the family asks, or None and why, when the weights would not fit in free memory."""
    available = psutil.virtual_memory().available
    need = {
        dtype: n_params * size * 1.15 + 3 * 2**30 for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2))
    }
    wanted = {"fp32": [torch.float32], "bf16": [torch.bfloat16], "auto": [torch.float32, torch.bfloat16]}[
        policy
    ]
    for dtype in wanted:
        if need[dtype] < available:
            return dtype, ""
    return None, (
        f"not measured: needs ~{gib(n_params * 2):.0f} GB in bf16 ({gib(available):.1f} GiB of RAM available)"
    )


@torch.no_grad()
def fill_random(model: torch.nn.Module) -> None:
    """Like a fresh init, fast: N(0, 0.02) weights, unit norm scales, zero biases (no NaN, no denormals)."""
    for name, p in model.named_parameters():
        if p.ndim == 0 or (p.ndim == 1 and name.endswith("bias")):
            p.zero_()
        elif p.ndim == 1 and name.endswith("weight"):  # norm scales
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)


def build_model(family: Family, config, dtype: torch.dtype):
    """The architecture with uninitialised memory (transformers' slow init skipped), then filled."""
    with no_init_weights(), default_dtype(dtype):
        model = getattr(T, family.model_class)(config)
    fill_random(model)
    return model.eval()


def make_adapter(family: Family, model, processor, device: str = "cpu"):
    name, version = family.checkpoint.split("/")[-1], "random-weights"
    if family.adapter == "classifier":
        return ZeroShotClassifier(model, processor, name, version, device=device)
    if family.adapter == "detector":
        return ZeroShotDetector(model, processor, name, version, device=device, threshold=0.0, max_det=MAX_DET)
    # generation runs to max_new_tokens: EOS is suppressed until then
    model.generation_config.min_new_tokens = MAX_NEW_TOKENS
    model.generation_config.pad_token_id = (
        processor.tokenizer.pad_token_id or processor.tokenizer.eos_token_id
    )
    return GenerativeVlm(model, processor, name, version, device=device, max_new_tokens=MAX_NEW_TOKENS)


@torch.inference_mode()
def calibrate_threshold(adapter: ZeroShotDetector, image, vocabulary: Vocabulary) -> float:
    """Just below the MAX_DET-th best score: random weights score all boxes alike, trained ones do not."""
    prompts = list(vocabulary.prompts)
    inputs = adapter._to_device(adapter.processor(images=[image], text=[prompts], return_tensors="pt"))
    outputs = adapter.model(**inputs)
    kwargs = (
        dict(input_ids=inputs["input_ids"], text_threshold=0.0)
        if adapter.grounding
        else dict(text_labels=[prompts])
    )
    result = adapter.processor.post_process_grounded_object_detection(
        outputs, threshold=0.0, target_sizes=[(image.height, image.width)], **kwargs
    )[0]
    scores = np.sort(result["scores"].float().cpu().numpy())[::-1]
    kth = np.float32(scores[min(MAX_DET, len(scores)) - 1])
    # boxes pass with `score > threshold`; saturated sigmoids tie at 1.0 and then all pass
    return float(np.nextafter(kth, np.float32(0)))


# ------------------------------------------------------------------------------------------ measuring


@dataclass
class Row:
    family: str
    checkpoint: str
    model_class: str
    params_m: float | None
    dtype: str
    task: str
    input: str
    latency_s: float | None = None
    runs_s: list[float] = field(default_factory=list)
    note: str = ""
    build_s: float | None = None
    rss_gib: float | None = None
    others_cpu: float | None = None  # the largest share of the CPU other processes used during a timed run
    major_faults: int | None = None  # during the warm-up and the timed runs
    family_s: float | None = None  # wall time of the whole family: build, calibration, warm-ups, runs, waits
    measured_at: str = ""


def busy_cpu_s() -> float:
    t = psutil.cpu_times()
    return (
        t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)
    )


def own_cpu_s() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


def wait_for_quiet_cpu(max_wait_s: float, busy_limit: float = 0.25) -> float:
    """Wait (up to max_wait_s) until other processes use under `busy_limit` of the CPUs: two torch threads
    sharing two cores with another busy process run many times slower (they wait on each other), which would
    measure the neighbour, not the model. Returns the seconds waited."""
    start = time.perf_counter()
    while True:
        busy = psutil.cpu_percent(interval=2.0) / 100
        if busy < busy_limit or time.perf_counter() - start > max_wait_s:
            return time.perf_counter() - start
        console.print(f"    waiting for a quiet CPU (others use {busy:.0%}) ...", highlight=False)
        time.sleep(8)


def timed_call(fn: Callable[[], list]) -> tuple[float, float, list]:
    """Wall seconds, the share of the machine's CPU time other processes took meanwhile, and fn's result."""
    wall0, busy0, own0 = time.perf_counter(), busy_cpu_s(), own_cpu_s()
    out = fn()
    wall = time.perf_counter() - wall0
    others = (busy_cpu_s() - busy0) - (own_cpu_s() - own0)
    return wall, max(0.0, others / (wall * (os.cpu_count() or 1))), out


def timed_runs(
    fn: Callable[[], list], runs: int, label: str, max_wait_s: float, clean_limit: float = 0.10
) -> tuple[list[float], float, list]:
    """One warm-up call, then timed calls until `runs` of them were clean (other processes took under
    `clean_limit` of the CPU meanwhile) or 3 x `runs` were made; each waits for a quiet CPU first.
    Returns the clean times (all times if none was clean), the largest share of the CPU other processes took
    during a returned run, and the last output."""
    wall, _, out = timed_call(fn)
    console.print(f"    {label}: warm-up {wall:.2f} s", highlight=False)
    clean, dirty = [], []
    for attempt in range(3 * runs):
        if len(clean) == runs:
            break
        wait_for_quiet_cpu(max_wait_s)
        wall, other, out = timed_call(fn)
        (clean if other < clean_limit else dirty).append((wall, other))
        console.print(
            f"    {label}: run {attempt + 1} {wall:.2f} s (other processes: {other:.0%} of the CPU"
            f"{'' if other < clean_limit else ', discarded'}); {len(clean)}/{runs} clean",
            highlight=False,
        )
    kept = clean or dirty
    return [w for w, _ in kept], max(o for _, o in kept), out


def check_output(outputs: list) -> str:
    """Raise on NaN: a random-weight model must still compute real numbers. Returns a short description."""
    (out,) = outputs
    if out.probabilities is not None:
        if not np.isfinite(out.probabilities).all():
            raise RuntimeError(f"non-finite probabilities {out.probabilities}")
        return "p=" + ",".join(f"{v:.2f}" for v in out.probabilities)
    if not np.isfinite(out.detections.confidence).all():
        raise RuntimeError("non-finite box confidences")
    return f"{len(out.detections)} boxes"


def task_input(family: Family, task: ModelTask) -> str:
    if family.adapter != "generative":
        return family.input
    what = (
        "3 labels scored (3 sequences)" if task is ModelTask.CLASSIFY else f"max_new_tokens={MAX_NEW_TOKENS}"
    )
    return f"{family.input}, {what}"


def measure_family(family: Family, image, vocabulary: Vocabulary, runs: int, args) -> list[Row]:
    rows = [
        Row(family.key, family.checkpoint, family.model_class, None, "", t.value, task_input(family, t))
        for t in family.tasks
    ]
    t0 = time.perf_counter()
    processor = family.processor()
    config = family.config(processor)
    n_params = count_params(family, config)
    for row in rows:
        row.params_m = round(n_params / 1e6, 1)
    if family.gate and not getattr(args, family.gate):
        return skip(rows, f"not measured: needs ~{gib(n_params * 2):.0f} GB in bf16 (run with --include-7b)")
    dtype, reason = choose_dtype(family.dtype if args.dtype == "family" else args.dtype, n_params)
    if dtype is None:
        return skip(rows, reason)
    console.print(f"  building {n_params / 1e6:.0f} M params in {dtype} ...", highlight=False)
    model = build_model(family, config, dtype)
    adapter = make_adapter(family, model, processor)
    build_s = round(time.perf_counter() - t0, 1)
    for row in rows:
        row.dtype, row.build_s = str(dtype).removeprefix("torch."), build_s
        row.rss_gib = round(gib(psutil.Process().memory_info().rss), 2)
    for row, task in zip(rows, family.tasks, strict=True):
        if family.adapter == "detector":
            adapter.threshold = calibrate_threshold(adapter, image, vocabulary)
            row.note = f"threshold calibrated to {adapter.threshold:.6f}"
        bound = adapter.bind(task, vocabulary)
        n = min(runs, family.max_runs or runs)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        row.runs_s, others, outputs = timed_runs(
            lambda b=bound: b.predict([image]), n, task.value, args.max_wait
        )
        row.latency_s = round(statistics.median(row.runs_s), 3)
        row.others_cpu = round(others, 2)
        row.major_faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults
        contended = f"other processes took up to {others:.0%} of the CPU" if others > 0.1 else ""
        # pages read back from disk: memory was short and code or data pages were evicted meanwhile
        paging = f"{row.major_faults} major page faults" if row.major_faults > 1000 else ""
        row.note = "; ".join(filter(None, [row.note, check_output(outputs), contended, paging]))
        print_row(row)
    del adapter, model, processor
    gc.collect()
    return rows


def stamp(rows: list[Row], started: float) -> list[Row]:
    for row in rows:
        row.family_s = round(time.perf_counter() - started, 1)
        row.measured_at = time.strftime("%Y-%m-%d %H:%M")
    return rows


def failed(family: Family, exc: Exception) -> list[Row]:
    note = f"failed: {type(exc).__name__}: {exc}"[:200]
    return [
        Row(
            family.key,
            family.checkpoint,
            family.model_class,
            None,
            "",
            t.value,
            task_input(family, t),
            note=note,
        )
        for t in family.tasks
    ]


def merge(old: list[Row], new: list[Row]) -> list[Row]:
    """New rows replace old ones of the same dtype and any failed or skipped ones; a failed or skipped
    family keeps its earlier measurements."""
    measured = [r for r in old if r.dtype]
    dtypes = {r.dtype for r in new}
    if not any(dtypes) and measured:
        return measured
    return [r for r in measured if r.dtype not in dtypes] + new


def previous_rows(out: Path) -> dict[str, list[Row]]:
    """Rows of an earlier run by family, so that re-measuring some families keeps the others' numbers."""
    try:
        rows = [Row(**r) for r in json.loads((out / "vlm_latency.json").read_text())["rows"]]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    by_family: dict[str, list[Row]] = {}
    for row in rows:
        by_family.setdefault(row.family, []).append(row)
    return by_family


def skip(rows: list[Row], reason: str) -> list[Row]:
    for row in rows:
        row.note = reason
        print_row(row)
    return rows


def print_row(row: Row) -> None:
    latency = f"{row.latency_s:.2f} s" if row.latency_s is not None else row.note
    console.print(
        f"  [bold]{row.family} {row.task}[/bold]: {latency}  ({row.params_m} M params, {row.dtype or '-'})"
    )


# ------------------------------------------------------------------------------------------ reporting
COLUMNS = [
    "family",
    "checkpoint",
    "class",
    "params (M)",
    "dtype",
    "task",
    "input",
    "Tandem latency per image on this CPU (s)",
]


def table_cells(row: Row) -> list[str]:
    latency = f"{row.latency_s:.2f}" if row.latency_s is not None else row.note
    if row.others_cpu is not None and row.others_cpu >= 0.10:  # no clean run could be had
        latency += f" (contended: other processes used {row.others_cpu:.0%} of the CPU)"
    return [
        row.family,
        row.checkpoint,
        row.model_class,
        f"{row.params_m:,.1f}" if row.params_m else "-",
        row.dtype or "-",
        row.task,
        row.input,
        latency,
    ]


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(gib(psutil.virtual_memory().total), 1),
        "torch_threads": THREADS,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


NOTES = f"""Notes:

* Random weights cost the same compute as the real ones: cost depends on the architecture and the input
  shapes, not on weight values. Parameter counts are those of the built architecture (vocabulary included).
* Generative detection always runs {MAX_NEW_TOKENS} new tokens (EOS suppressed until then), a worst case: a
  real answer may stop sooner, or need more for many objects. Generative classification scores every label
  with one teacher-forced sequence, each carrying the image (3 labels = a batch of 3 prefills).
* The zero-shot detectors' score threshold is calibrated (untimed) so that about {MAX_DET} boxes reach NMS,
  as a trained model's few confident boxes would: random weights score all of OWLv2's 3,600 boxes alike,
  and class-wise NMS over all of them would dominate the time.
* Tandem loads models in fp32 on CPU (`pick_device`). bf16 rows were built in bf16 to compare or to fit in
  memory (LLaVA-1.5-7B needs 28 GB in fp32); this CPU has AVX512-BF16, so bf16 matmuls run natively.
* This 2-core machine is shared with other work (test runs): two torch threads sharing two cores with a busy
  neighbour run many times slower. Each timed run waited for a quiet CPU; runs during which other processes
  took over 10% of the CPU were discarded and repeated, and a latency is marked *contended* when no clean
  run could be had (JSON: `others_cpu`, `runs_s`). That check is not enough: a pass made while a full test
  suite ran measured up to 3x these times (SmolVLM 6.3 s, Qwen2.5-VL fp32 classify 127 s) with the others'
  CPU share near 1%, so only re-measured rows from quiet periods are kept here (JSON: `measured_at`). Treat
  differences under ~15% as noise (LLaVA: 76 s and 86 s in two quiet passes).
"""


def dtype_comparison(rows: list[Row]) -> list[str]:
    """'fp32 -> bf16' latency ratios where a family was measured in both."""
    by_key = {(r.family, r.task, r.dtype): r.latency_s for r in rows if r.latency_s}
    lines = []
    for (family, task, dtype), fp32 in by_key.items():
        bf16 = by_key.get((family, task, "bfloat16"))
        if dtype == "float32" and bf16:
            lines.append(f"{family} {task} {fp32:.1f} s -> {bf16:.1f} s ({fp32 / bf16:.1f}x)")
    return [f"* fp32 -> bf16 on this CPU: {'; '.join(lines)}."] if lines else []


def write_markdown(path: Path, rows: list[Row], meta: dict) -> None:
    m = meta["machine"]
    small = max((len(r.runs_s) for r in rows if r.params_m and r.params_m < 1000), default=0)
    big = max((len(r.runs_s) for r in rows if r.params_m and r.params_m >= 1000), default=0)
    header = (
        f"Real-size architectures of the hub checkpoints with random weights (none can be downloaded here), "
        f"one {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} RGB image, labels {', '.join(LABELS)}. {m['cpu']}, "
        f"{m['cores']} cores, {m['ram_gib']} GiB RAM, torch.set_num_threads({THREADS}), torch {m['torch']}, "
        f"transformers {m['transformers']}. Median of {small} clean runs after one warm-up ({big} for the "
        f"multi-billion-parameter models; every run's time is in the JSON). Benchmark time "
        f"{meta['total_s'] / 60:.1f} min (all rows' families, building and waits for a quiet CPU included)."
    )
    lines = [
        "# VLM latency on CPU, through Tandem's adapters",
        "",
        header,
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(table_cells(r)) + " |" for r in rows),
        "",
        NOTES.rstrip("\n"),
        *dtype_comparison(rows),
    ]
    path.write_text("\n".join(lines) + "\n")


def print_table(rows: list[Row]) -> None:
    table = Table(title="Tandem VLM latency per image (CPU)")
    for col in ("family", "task", "params (M)", "dtype", "latency (s)", "note"):
        table.add_column(col)
    for r in rows:
        latency = f"{r.latency_s:.2f}" if r.latency_s is not None else "-"
        table.add_row(r.family, r.task, f"{r.params_m or 0:,.0f}", r.dtype or "-", latency, r.note)
    console.print(table)


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    keys = [f.key for f in FAMILIES]
    ap.add_argument("--families", nargs="+", choices=keys, default=keys)
    ap.add_argument(
        "--runs", type=int, default=3, help="timed runs after one warm-up (capped at 1 for the big ones)"
    )
    ap.add_argument(
        "--include-7b", action="store_true", help="also LLaVA-1.5-7B in bf16, if free memory allows"
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument(
        "--dtype",
        choices=["family", "fp32", "bf16"],
        default="family",
        help="override each family's dtype; rows of another dtype already in --out are kept beside these",
    )
    ap.add_argument(
        "--max-wait", type=float, default=900, help="seconds to wait for a quiet CPU before a run"
    )
    args = ap.parse_args()

    torch.set_num_threads(THREADS)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    image, _ = render_sample(np.random.default_rng(0), "bench", size=IMAGE_SIZE, max_objects=3)
    vocabulary = Vocabulary.from_labels(LABELS)

    start = time.perf_counter()
    results = previous_rows(args.out)
    selected = [f for f in FAMILIES if f.key in args.families]
    for i, family in enumerate(selected, 1):
        console.rule(
            f"[{i}/{len(selected)}] {family.key}: {family.checkpoint}  "
            f"({(time.perf_counter() - start) / 60:.1f} min elapsed)"
        )
        started = time.perf_counter()
        try:
            rows = stamp(measure_family(family, image, vocabulary, args.runs, args), started)
        except Exception as exc:  # one family's failure must not lose the others' numbers
            console.print_exception(max_frames=4)
            rows = stamp(failed(family, exc), started)
        results[family.key] = merge(results.get(family.key, []), rows)
        gc.collect()
        rows = table_rows(results)
        write_results(args.out, rows, args.runs)  # after every family: a crash later keeps these
    print_table(rows)
    minutes = (time.perf_counter() - start) / 60
    console.print(f"wrote {args.out / 'vlm_latency.md'} and .json; this run took {minutes:.1f} min")


def table_rows(results: dict[str, list[Row]]) -> list[Row]:
    """In FAMILIES order; within a family fp32 before bf16, then the family's task order."""
    return [
        row
        for f in FAMILIES
        for row in sorted(results.get(f.key, []), key=lambda r: (r.dtype != "float32", r.task != "classify"))
    ]


def write_results(out: Path, rows: list[Row], runs: int) -> None:
    total_s = sum({(r.family, r.dtype): r.family_s or 0.0 for r in rows}.values())
    meta = {
        "machine": machine(),
        "runs": runs,
        "image": list(IMAGE_SIZE),
        "labels": list(LABELS),
        "max_new_tokens": MAX_NEW_TOKENS,
        "total_s": round(total_s, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_markdown(out / "vlm_latency.md", rows, meta)
    rows_json = [asdict(r) for r in rows]
    (out / "vlm_latency.json").write_text(json.dumps({"meta": meta, "rows": rows_json}, indent=2) + "\n")


if __name__ == "__main__":
    main()
