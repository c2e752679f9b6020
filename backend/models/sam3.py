"""SAM 3 (Meta, transformers' `Sam3Model` + `Sam3Processor`): text-prompted instance segmentation.

Each label's prompt ("grape cluster") returns every instance it names, each with a mask, a box and its own
score (the query's sigmoid times the prompt's presence score, as the processor's post-processing computes
it). The image is encoded once per image and its features shared by all the labels' prompts, which run as
one batch (images x prompts) through the DETR encoder/decoder and the mask head. Masks come back at the size
of the image as the annotator sees it (EXIF applied), as a `Prediction` with `detections.mask` and outlines
(`POLYGON`), so RectangleLabels, PolygonLabels and BrushLabels can all be written from it.

`facebook/sam3` is gated on the hub: pass a folder holding it, or a hub id already in the Hugging Face cache
(`resolve_source`, the same offline-safe path as the other VLMs). Serving only: no LoRA or fine-tuning.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import supervision as sv
from PIL import Image, ImageOps

from backend.core.prediction import POLYGON, Prediction
from backend.errors import ModelLoadError
from backend.labeling.geometry import mask_to_polygon
from backend.models.base import TASK_CAPABILITY, BoundModel, Capability, ModelRequest, ModelTask, Vocabulary
from backend.models.vlm.base import checkpoint_version, chunks, make_detections

log = logging.getLogger("tandem.sam3")

MODEL_TYPES = ("sam3",)
HUB_ID = "facebook/sam3"
TEXT_LENGTH = 32  # Sam3Processor pads every prompt to 32 tokens
CPU_IMAGES = 2  # images per pass on a CPU (each pass runs images x prompts through the decoder)
GPU_IMAGES = 8


def is_sam3(path: Path) -> bool:
    """Whether a checkpoint folder holds a SAM 3 image model (config.json's model_type)."""
    config = path / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") in MODEL_TYPES
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class Sam3Options:
    """Thresholds a project may tune: `threshold` on the instance score, `mask_threshold` on mask
    probabilities, `max_det` instances per image (highest scores first), `tolerance` (px) of outlines."""

    threshold: float = 0.4
    mask_threshold: float = 0.5
    max_det: int = 100
    tolerance: float = 1.0
    batch_size: int | None = None  # images per pass; None: CPU_IMAGES on a CPU, GPU_IMAGES on a GPU

    def __post_init__(self) -> None:
        if not 0 <= self.threshold < 1 or not 0 < self.mask_threshold < 1:
            raise ValueError("SAM 3 thresholds must be in [0, 1) (instance score) and (0, 1) (mask)")
        if self.max_det < 1:
            raise ValueError("max_det must be at least 1")


class Sam3Segmenter:
    """A promptable `Model` that segments and detects: the request's vocabulary is what it looks for."""

    family = "text-prompted segmenter"
    tasks = frozenset({ModelTask.SEGMENT, ModelTask.DETECT})

    def __init__(self, model, processor, name: str, version: str, device: str, **options: Any) -> None:
        known = {f.name for f in fields(Sam3Options)}
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"SAM 3 takes no option {', '.join(sorted(unknown))} (it takes {', '.join(sorted(known))})")
        self.model = model.eval()
        self.processor = processor
        self.name, self.version, self.device = name, version, device
        self.source = name
        self.options = Sam3Options(**{k: v for k, v in options.items() if v is not None})
        self._lock = threading.Lock()

    @property
    def capabilities(self) -> frozenset[Capability]:
        return frozenset({Capability.PROMPTABLE, *(TASK_CAPABILITY[t] for t in self.tasks)})

    def with_options(self, **options: Any) -> Sam3Segmenter:
        """The same loaded model under other thresholds (no reload)."""
        twin = object.__new__(Sam3Segmenter)
        twin.__dict__.update(self.__dict__)
        twin.options = replace(self.options, **options)
        return twin

    def bind(self, task: ModelTask, vocabulary: Vocabulary) -> BoundModel:
        if task not in self.tasks:
            raise ValueError(f"{self.name} ({self.family}) cannot {task.value}")
        return BoundModel(self, task, vocabulary)

    def predict(self, images: list[Image.Image], request: ModelRequest | None = None) -> list[Prediction]:
        if request is None or request.vocabulary is None:
            raise ValueError(f"{self.name} is open-vocabulary: its request needs a task and a vocabulary")
        if request.task not in self.tasks:
            raise ValueError(f"{self.name} ({self.family}) cannot {request.task.value}")
        return self.predict_vocab(images, request.vocabulary)

    def predict_vocab(self, images: list[Image.Image], vocabulary: Vocabulary) -> list[Prediction]:
        if not images:
            return []
        import torch

        size = self.options.batch_size or (GPU_IMAGES if str(self.device).startswith("cuda") else CPU_IMAGES)
        upright = [ImageOps.exif_transpose(im).convert("RGB") for im in images]  # a no-op on upright images
        out: list[Prediction] = []
        with self._lock, torch.inference_mode():
            text = self._text(vocabulary.prompts)
            for part in chunks(upright, size):
                out.extend(self._run(part, text, vocabulary.names))
        return out

    # -- internals -----------------------------------------------------------------------------------------------

    def _text(self, prompts) -> dict:
        tok = self.processor.tokenizer(list(prompts), padding="max_length", max_length=TEXT_LENGTH,
                                       truncation=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}

    def forward(self, pixel_values, text: dict):
        """Images (B) x prompts (P) in one pass: the vision features of each image repeated for its P prompts,
        every prompt's tokens repeated for each image (row b * P + p)."""
        vision = self.model.get_vision_features(pixel_values=pixel_values)
        n_prompts = text["input_ids"].shape[0]
        b = pixel_values.shape[0]
        rep = {}
        for key in ("fpn_hidden_states", "fpn_position_encoding"):
            rep[key] = tuple(t.repeat_interleave(n_prompts, dim=0) for t in getattr(vision, key))
        vision = replace(vision, **rep) if hasattr(vision, "__dataclass_fields__") else type(vision)(
            **{**vision, **rep})
        return self.model(vision_embeds=vision, input_ids=text["input_ids"].repeat(b, 1),
                          attention_mask=text["attention_mask"].repeat(b, 1))

    def _run(self, images: list[Image.Image], text: dict, names: tuple[str, ...]) -> list[Prediction]:
        batch = self.processor.image_processor(images=images, return_tensors="pt")
        pixels = batch["pixel_values"].to(self.device, self.model.dtype)
        outputs = self.forward(pixels, text)
        n_prompts = len(names)
        sizes = [(im.height, im.width) for im in images for _ in range(n_prompts)]
        results = self.processor.post_process_instance_segmentation(
            outputs, threshold=self.options.threshold, mask_threshold=self.options.mask_threshold,
            target_sizes=sizes)
        out = []
        for i, im in enumerate(images):
            per_prompt = results[i * n_prompts : (i + 1) * n_prompts]
            out.append(self._prediction(per_prompt, names, im.width, im.height))
        return out

    def _prediction(self, per_prompt: list[dict], names: tuple[str, ...], width: int, height: int) -> Prediction:
        masks, scores, ids = [], [], []
        for label, r in enumerate(per_prompt):
            m = r["masks"].bool().cpu().numpy().reshape(-1, height, width)
            masks.append(m)
            scores.append(r["scores"].float().cpu().numpy().reshape(-1))
            ids.append(np.full(len(m), label, dtype=int))
        mask = np.concatenate(masks) if masks else np.zeros((0, height, width), bool)
        score = np.concatenate(scores) if scores else np.zeros(0)
        class_id = np.concatenate(ids) if ids else np.zeros(0, int)
        keep = mask.reshape(len(mask), height * width).any(axis=1)  # an instance whose mask is empty at this threshold
        order = np.argsort(-score[keep], kind="stable")[: self.options.max_det]
        mask, score, class_id = mask[keep][order], score[keep][order], class_id[keep][order]
        det = make_detections(sv.mask_to_xyxy(mask) if len(mask) else np.zeros((0, 4)), score, class_id, names)
        if len(mask):  # the mask's own extent: the DETR box head and the mask head may disagree by a few px
            det.xyxy[:, 2:] += 1.0  # pixel corners: a mask covering columns 3..7 spans x 3 to 8
        det.mask = mask
        outlines = np.empty(len(mask), dtype=object)
        for k in range(len(mask)):
            outlines[k] = mask_to_polygon(mask[k], self.options.tolerance)
        det.data[POLYGON] = outlines
        peak = float(score.max()) if len(score) else None
        return Prediction(detections=det, candidate_peak=peak, class_names=names)


def load_sam3(source: str, device: str | None = None, revision: str | None = None, **options: Any) -> Sam3Segmenter:
    """`source` = a folder written by save_pretrained or a hub id in the HF cache (`facebook/sam3` is gated:
    download it once where you have access). Options: see `Sam3Options`."""
    from backend.models.vlm.loader import display_name
    from backend.models.vlm.source import pick_device, resolve_source

    path = resolve_source(source, revision)
    if not is_sam3(path):
        raise ModelLoadError(f"{source} is not a SAM 3 image checkpoint (config.json model_type must be 'sam3')")
    device, dtype = pick_device(device)
    try:
        from transformers import Sam3Model, Sam3Processor

        model = Sam3Model.from_pretrained(path, dtype=dtype, local_files_only=True).to(device)
        processor = Sam3Processor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"could not load {source}: {exc}") from exc
    name = display_name(source, path)
    try:
        segmenter = Sam3Segmenter(model, processor, name, checkpoint_version(path, name), device, **options)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    segmenter.source = str(path)
    log.info("loaded %s (SAM 3) on %s in %s", segmenter.version, device, dtype)
    return segmenter


# -- a tiny random-weight SAM 3 (tests, benchmarks): the real classes at toy sizes, built offline ---------------------

TINY_IMAGE = 112  # 8 x 8 patches of 14 px


def build_tiny(out: Path, image_size: int = TINY_IMAGE, hidden: int = 32, queries: int = 16) -> Path:
    """A saved SAM 3 checkpoint of the real architecture at toy sizes, with a byte-level CLIP tokenizer
    trained from scratch (pad id 0), loadable by `load_sam3`."""
    from transformers import CLIPTokenizer, Sam3Config, Sam3Model, Sam3Processor
    from transformers.models.sam3.image_processing_sam3 import Sam3ImageProcessor

    from backend.models.families.synthetic import save, tiny_tokenizer

    tok = tiny_tokenizer(CLIPTokenizer, byte_level=True, model_max_length=TEXT_LENGTH,
                         vocab={"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}, pad_token="!")
    grid = image_size // 14
    cfg = Sam3Config(
        vision_config=dict(
            backbone_config=dict(model_type="sam3_vit_model", hidden_size=hidden, intermediate_size=2 * hidden,
                                 num_hidden_layers=2, num_attention_heads=2, image_size=image_size, patch_size=14,
                                 window_size=4, global_attn_indexes=[1], pretrain_image_size=56),
            fpn_hidden_size=hidden, backbone_feature_sizes=[[4 * grid] * 2, [2 * grid] * 2, [grid] * 2]),
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=hidden,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TEXT_LENGTH,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        geometry_encoder_config=dict(hidden_size=hidden, num_layers=1, num_attention_heads=2, intermediate_size=2 * hidden),
        detr_encoder_config=dict(hidden_size=hidden, num_layers=1, num_attention_heads=2, intermediate_size=2 * hidden),
        detr_decoder_config=dict(hidden_size=hidden, num_layers=2, num_queries=queries, num_attention_heads=2,
                                 intermediate_size=2 * hidden),
        mask_decoder_config=dict(hidden_size=hidden, num_attention_heads=2),
    )
    processor = Sam3Processor(image_processor=Sam3ImageProcessor(
        size={"height": image_size, "width": image_size}, mask_size={"height": 4 * grid, "width": 4 * grid}),
        tokenizer=tok)
    return save(Sam3Model(cfg), processor, Path(out))


__all__ = ["HUB_ID", "Sam3Options", "Sam3Segmenter", "build_tiny", "is_sam3", "load_sam3"]
