"""The predict job's GPU engine: chunks of encoded image bytes through `GpuYoloPipeline` (decode, letterbox,
fp16 forward and NMS on the device), turned into Label Studio items by the very code /predict uses.

Why: on a large GPU the adapter's CPU-side decode and letterbox, not the network, set the pace (issue #24).
The job fetches bytes (`MediaFetcher.load_bytes`) instead of decoded images, so decoding happens on the GPU.
The items come from `Predictor.predict_typed` replaying the pipeline's outputs through the plan, so labels,
scores, the store's typed predictions and the serving threshold are exactly the adapter engine's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from backend.errors import ConfigError, MediaError
from backend.media.fetch import LoadedImage
from backend.models.base import ModelTask
from backend.predict import Predictor, ServingPlan, image_url

Engine = Literal["auto", "pipeline", "adapter"]
ENGINES: tuple[str, ...] = ("auto", "pipeline", "adapter")
GPU_BATCH = 64  # images per forward pass on CUDA (the measurements: ~1,100 images/s at 64)


def pipeline_refusal(adapter: Any) -> str | None:
    """Why the pipeline cannot serve this model (None when it can): YOLO detect/segment torch weights only."""
    from backend.models.yolo import YoloAdapter

    if not isinstance(adapter, YoloAdapter):
        return f"{getattr(adapter, 'name', adapter)} is not a YOLO checkpoint"
    if adapter.task not in (ModelTask.DETECT, ModelTask.SEGMENT):
        return f"{adapter.name} is a {adapter.task.value} model (the pipeline serves detect and segment)"
    if adapter.path is None or Path(adapter.path).suffix != ".pt":
        return f"{adapter.name} has no .pt weights file"
    return None


def choose_engine(engine: str, adapter: Any) -> Literal["pipeline", "adapter"]:
    """`auto`: the pipeline on CUDA for YOLO detect/segment .pt weights (where it pays), else the adapter.
    `pipeline` on a model it cannot serve is an error naming why."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown predict engine {engine!r}: {', '.join(ENGINES)}")
    refusal = pipeline_refusal(adapter)
    if engine == "pipeline":
        if refusal:
            raise ConfigError(f"--engine pipeline: {refusal}; use --engine adapter")
        return "pipeline"
    if engine == "auto" and refusal is None and str(getattr(adapter, "device", "cpu")).startswith("cuda"):
        return "pipeline"
    return "adapter"


def pipeline_for(adapter: Any, max_pixels: int | None = None):
    """The pipeline for the adapter's weights with its serving settings (device, candidate floor, NMS IoU, size).
    On the CPU it keeps the adapter's batch (the same batches, so the same letterbox shapes and outputs)."""
    from backend.models.yolo_gpu import DEFAULT_MAX_PIXELS, GpuYoloPipeline

    cuda = str(adapter.device).startswith("cuda")
    return GpuYoloPipeline(adapter.path, device=adapter.device, conf=adapter.conf, iou=adapter.iou,
                           imgsz=adapter.imgsz, batch=max(adapter.batch, GPU_BATCH) if cuda else adapter.batch,
                           max_pixels=max_pixels or DEFAULT_MAX_PIXELS, name=adapter.name)


@dataclass(frozen=True)
class _Shown:
    """Stands in for a decoded image where only its key and shown size are read (regions are % of it)."""

    key: tuple[int, str]
    size: tuple[int, int]


class _Decoded:
    """The loader the replaying Predictor sees: the pipeline's images by (task id, url), or their error."""

    def __init__(self, images: dict[tuple[int, str], _Shown | MediaError]) -> None:
        self.images = images

    def load(self, url: str, task_id: int | None = None, deadline: float | None = None,
             min_side: int | None = None) -> LoadedImage:  # the pipeline decoded every pixel already
        found = self.images.get((task_id, url))  # type: ignore[arg-type]
        if found is None:
            raise MediaError(f"{url}: not fetched")
        if isinstance(found, MediaError):
            raise found
        return LoadedImage(image=found, source=url)  # type: ignore[arg-type]


class _Replay:
    """The planned model, answering with the pipeline's outputs for these images."""

    def __init__(self, inner: Any, outputs: dict[tuple[int, str], Any]) -> None:
        self._inner, self._outputs = inner, outputs

    def predict(self, images: list) -> list:
        return [self._outputs[img.key] for img in images]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def pipeline_chunk_predictor(plan: ServingPlan, pipeline: Any, role: str = "pre-annotation"
                             ) -> Callable[[Sequence[Mapping[str, Any]], Any], list]:
    """The job's `predict_chunk` for the pipeline: `prefetched.load_bytes` gives each image's bytes (or its
    MediaError); a corrupt image fails its own task with the decoder's reason."""

    def predict_chunk(tasks: Sequence[Mapping[str, Any]], prefetched: Any) -> list:
        images: dict[tuple[int, str], _Shown | MediaError] = {}
        sources: list[tuple[tuple[int, str], bytes]] = []
        seen: set[tuple[int, str]] = set()
        for task in tasks:
            for key in plan.image_keys:
                url = image_url(task, key) or ""
                ref = (task["id"], url)
                if ref in seen:
                    continue
                seen.add(ref)
                try:
                    sources.append((ref, prefetched.load_bytes(url, task_id=task["id"])))
                except MediaError as exc:
                    images[ref] = exc
        outputs: dict[tuple[int, str], Any] = {}
        for ref, result, size in pipeline.stream_sized(sources):
            if isinstance(result, MediaError):
                images[ref] = MediaError(f"image {ref[1][:200]}: {result}")
            else:
                images[ref], outputs[ref] = _Shown(ref, size), result
        replay = replace(plan, controls=tuple(replace(c, adapter=_Replay(c.adapter, outputs)) for c in plan.controls))
        predictor = Predictor(_Decoded(images), workers=1)  # type: ignore[arg-type]
        try:
            return predictor.predict_typed(tasks, replay, role)
        finally:
            predictor.close()

    return predict_chunk
