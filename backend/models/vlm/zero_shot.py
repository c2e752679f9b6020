"""Zero-shot detectors (OWLv2, OWL-ViT, Grounding DINO) and classifiers (CLIP, SigLIP, SigLIP2); what differs
between families (default threshold, decoded phrases, sigmoid text padding) is read from `self.spec`.

The labels' prompts are the text queries, all of them in one forward pass per batch of images (the
transformers pipeline runs the model once per label instead). Batches are sized from free GPU memory on
CUDA (the first image's peak memory, `batching.py`) and fixed on a CPU.
"""

from __future__ import annotations

import numpy as np
import supervision as sv
import torch
from PIL import Image

from backend.models.base import ModelOutput, ModelTask
from backend.models.families import LoaderKind
from backend.models.vlm.base import OpenVocabularyModel, Vocabulary, chunks, make_detections
from backend.models.vlm.batching import fit, peak_bytes, same_size_groups
from backend.models.vlm.grounding import match_phrase

CPU_DETECTOR_IMAGES = 4  # images per pass on a CPU (OWLv2 at 960 px: larger batches only add latency)
CPU_CLASSIFIER_IMAGES = 16


def _detections(xyxy: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, names: tuple[str, ...],
                iou: float, max_det: int) -> sv.Detections:
    det = make_detections(xyxy, scores, class_ids, names)
    det = det[(det.xyxy[:, 2] > det.xyxy[:, 0]) & (det.xyxy[:, 3] > det.xyxy[:, 1])]
    if len(det) and iou < 1.0:
        det = det.with_nms(threshold=iou, class_agnostic=False)
    if len(det) > max_det:
        det = det[np.argsort(-det.confidence)[:max_det]]
    return det


def _batched(model: OpenVocabularyModel, images: list[Image.Image], run, batch_size: int | None, cpu_default: int,
             groups: list[list[int]] | None = None) -> list[ModelOutput]:
    """`run(images) -> outputs` over batches of `batch_size` images (None: sized from the GPU memory the first
    image used alone; `cpu_default` on a CPU), within `groups` of indices (default: one group), in order."""
    out: list[ModelOutput | None] = [None] * len(images)
    size = batch_size
    if size is None and not str(model.device).startswith("cuda"):
        size = cpu_default
    for group in groups or [list(range(len(images)))]:
        rest = group
        if size is None:
            first, used = peak_bytes(model.device, lambda: run([images[group[0]]]))
            out[group[0]] = first[0]
            size = fit(model.device, used or 1, cpu_default)
            rest = group[1:]
        for part in chunks(rest, size):
            for i, o in zip(part, run([images[i] for i in part]), strict=True):
                out[i] = o
    return out  # type: ignore[return-value]


class ZeroShotDetector(OpenVocabularyModel):
    """Boxes for the config's labels. OWLv2 pads images to a square, so its boxes can reach past the image
    (a 224-px-high image got ymax 480): every box is clipped. OWL models score each patch for every query,
    hence class-wise NMS. Images go in batches, all the labels' queries with each image in one pass."""

    family = LoaderKind.DETECTOR.value
    tasks = frozenset({ModelTask.DETECT})

    def __init__(self, model, processor, name, version, device, threshold: float | None = None,
                 text_threshold: float = 0.25, iou: float = 0.5, max_det: int = 100,
                 batch_size: int | None = None) -> None:
        super().__init__(model, processor, name, version, device)
        self.grounding = self.spec.phrase_labels  # boxes come with decoded phrases (Grounding DINO)
        self.threshold = threshold if threshold is not None else self.spec.threshold
        # images per pass; None: from GPU memory (batching.py), CPU_DETECTOR_IMAGES on a CPU
        self.text_threshold, self.iou, self.max_det, self.batch_size = text_threshold, iou, max_det, batch_size

    def _predict(self, images: list[Image.Image], task: ModelTask, vocabulary: Vocabulary) -> list[ModelOutput]:
        groups = same_size_groups([im.size for im in images]) if self.spec.same_size_batches else None
        return _batched(self, images, lambda chunk: self._run(chunk, vocabulary), self.batch_size,
                        CPU_DETECTOR_IMAGES, groups)

    def _run(self, chunk: list[Image.Image], vocabulary: Vocabulary) -> list[ModelOutput]:
        prompts = list(vocabulary.prompts)
        out: list[ModelOutput] = []
        sizes = [(im.height, im.width) for im in chunk]
        texts = [prompts] * len(chunk)
        inputs = self._to_device(self.processor(images=chunk, text=texts, return_tensors="pt"))
        outputs = self.model(**inputs)
        if self.grounding:
            results = self.processor.post_process_grounded_object_detection(
                outputs, input_ids=inputs["input_ids"], threshold=self.threshold,
                text_threshold=self.text_threshold, target_sizes=sizes)
        else:
            results = self.processor.post_process_grounded_object_detection(
                outputs, threshold=self.threshold, target_sizes=sizes, text_labels=texts)
        for r, (h, w) in zip(results, sizes, strict=True):
            xyxy = r["boxes"].float().cpu().numpy().reshape(-1, 4)
            scores = r["scores"].float().cpu().numpy()
            if self.grounding:  # decoded phrases ('' or 'cat dog' happen): map back onto the labels
                # with no box above the threshold, transformers still returns text_labels == ['']
                ids = [match_phrase(p, prompts) for p in r["text_labels"]][: len(xyxy)]
            else:
                ids = [int(i) for i in r["labels"].cpu().tolist()]
            keep = np.array([i is not None for i in ids], dtype=bool)
            class_ids = np.array([i for i in ids if i is not None], dtype=int)
            xyxy = xyxy[keep]
            xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, w)
            xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, h)
            det = _detections(xyxy, scores[keep], class_ids, vocabulary.names, self.iou, self.max_det)
            out.append(ModelOutput(detections=det))
        return out


class ZeroShotClassifier(OpenVocabularyModel):
    """A probability for every choice. CLIP is trained with a softmax over texts; SigLIP with independent
    sigmoids, so its per-label sigmoids do not sum to 1 — for a single-choice question Tandem takes the
    softmax over the same logits (SigLIP's bias cancels), which ranks exactly as the sigmoids do.
    Images go in batches, every label's text with each batch in one pass."""

    family = LoaderKind.CLASSIFIER.value
    tasks = frozenset({ModelTask.CLASSIFY})

    def __init__(self, model, processor, name, version, device, template: str = "a photo of a {}.",
                 batch_size: int | None = None) -> None:
        super().__init__(model, processor, name, version, device)
        self.template, self.batch_size = template, batch_size  # None: from GPU memory, CPU_CLASSIFIER_IMAGES on a CPU
        self.sigmoid = self.spec.sigmoid

    def _predict(self, images: list[Image.Image], task: ModelTask, vocabulary: Vocabulary) -> list[ModelOutput]:
        return _batched(self, images, lambda chunk: self._run(chunk, vocabulary), self.batch_size,
                        CPU_CLASSIFIER_IMAGES)

    def _run(self, chunk: list[Image.Image], vocabulary: Vocabulary) -> list[ModelOutput]:
        texts = [self.template.format(p) for p in vocabulary.prompts]
        # SigLIP was trained on text padded to 64 tokens; other lengths shift its logits
        length = self.spec.text_length
        pad = dict(padding="max_length", max_length=length) if length else dict(padding=True)
        inputs = self._to_device(self.processor(text=texts, images=chunk, return_tensors="pt", truncation=True, **pad))
        logits = self.model(**inputs).logits_per_image.float()
        probs = torch.softmax(logits, dim=-1).cpu().numpy().astype(np.float64)
        return [ModelOutput(probabilities=p / p.sum()) for p in probs]
