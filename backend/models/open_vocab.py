"""Open-vocabulary YOLO (YOLOE, YOLO-World) through ultralytics' own classes: the config's labels are its classes.

The request's vocabulary (each label's prompt) is turned into class embeddings by the model's text encoder
(MobileCLIP for YOLOE, CLIP for YOLO-World) once per vocabulary and cached; the model then runs at CNN speed
and boxes (and, for `-seg` models, outlines) come back named by the labels. The text encoder is fetched by
ultralytics on first use: where it cannot be loaded (offline), `load_open_vocab` says so in one line at start
instead of failing at the first image. `embed` may be given instead (precomputed embeddings; the tests').
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import supervision as sv
from PIL import Image, ImageOps

from backend.core.prediction import CLASS_NAME, POLYGON, Prediction
from backend.errors import ModelLoadError
from backend.models.base import TASK_CAPABILITY, BoundModel, Capability, ModelRequest, ModelTask, Vocabulary
from backend.models.yolo import default_device  # first: it keeps ultralytics offline and from pip-installing

log = logging.getLogger("tandem.open_vocab")

Embedder = Callable[[list[str]], Any]  # prompts -> (1, K, D) torch tensor of class embeddings


def is_open_vocab(source: str) -> bool:
    """Weights or a YAML of YOLOE / YOLO-World, by ultralytics' file names (yoloe-11s-seg.pt, yolov8s-worldv2.pt)."""
    name = Path(source).name.lower()
    return name.startswith("yoloe") or "-world" in name


class OpenVocabYolo:
    """A promptable `Model`: detect (and segment, for a -seg model) whatever labels the request names."""

    family = "open-vocabulary YOLO"

    def __init__(self, yolo, name: str, version: str, device: str, embed: Embedder | None = None,
                 conf: float = 0.25, iou: float = 0.7, imgsz: int = 640, max_det: int = 300) -> None:
        self.yolo = yolo
        self.name, self.version, self.device, self.source = name, version, device, name
        self.embed = embed or (lambda prompts: yolo.model.get_text_pe(prompts))
        self.conf, self.iou, self.imgsz, self.max_det = conf, iou, imgsz, max_det
        self.tasks = frozenset({ModelTask.DETECT, ModelTask.SEGMENT} if yolo.task == "segment" else {ModelTask.DETECT})
        self._vocab: tuple[str, ...] | None = None
        self._lock = threading.Lock()

    @property
    def capabilities(self) -> frozenset[Capability]:
        return frozenset({Capability.PROMPTABLE, *(TASK_CAPABILITY[t] for t in self.tasks)})

    def bind(self, task: ModelTask, vocabulary: Vocabulary) -> BoundModel:
        if task not in self.tasks:
            raise ValueError(f"{self.name} ({self.family}) cannot {task.value}")
        return BoundModel(self, task, vocabulary)

    def _set_vocabulary(self, vocabulary: Vocabulary) -> None:
        if self._vocab == vocabulary.prompts:
            return
        embeddings = self.embed(list(vocabulary.prompts))
        if tuple(embeddings.shape[:2]) != (1, len(vocabulary.prompts)):
            raise ValueError(f"class embeddings must be (1, {len(vocabulary.prompts)}, D), got {tuple(embeddings.shape)}")
        from ultralytics.nn.tasks import YOLOEModel

        model = self.yolo.model
        if isinstance(model, YOLOEModel):
            model.set_classes(list(vocabulary.prompts), embeddings)
        else:  # YOLO-World: what its set_classes stores, without running CLIP again
            model.txt_feats = embeddings.to(next(model.parameters()).dtype)
            model.model[-1].nc = len(vocabulary.prompts)
            model.names = dict(enumerate(vocabulary.prompts))
        self.yolo.predictor = None  # ultralytics keeps the old class count in a built predictor
        self._vocab = vocabulary.prompts

    def predict(self, images: list[Image.Image], request: ModelRequest | None = None) -> list[Prediction]:
        if request is None or request.vocabulary is None:
            raise ValueError(f"{self.name} is open-vocabulary: its request needs a task and a vocabulary")
        if request.task not in self.tasks:
            raise ValueError(f"{self.name} ({self.family}) cannot {request.task.value}")
        if not images:
            return []
        upright = [np.asarray(ImageOps.exif_transpose(im).convert("RGB"))[:, :, ::-1] for im in images]  # BGR
        names = request.vocabulary.names
        with self._lock:
            self._set_vocabulary(request.vocabulary)
            results = self.yolo.predict(upright, imgsz=self.imgsz, conf=self.conf, iou=self.iou,
                                        max_det=self.max_det, device=self.device, verbose=False)
        return [self._convert(r, names, request.task) for r in results]

    @staticmethod
    def _convert(result, names: tuple[str, ...], task: ModelTask) -> Prediction:
        boxes = result.boxes
        class_id = boxes.cls.cpu().numpy().astype(int)
        det = sv.Detections(xyxy=boxes.xyxy.cpu().numpy().astype(np.float64),
                            confidence=boxes.conf.cpu().numpy().astype(np.float64), class_id=class_id,
                            data={CLASS_NAME: np.array([names[i] for i in class_id], dtype=object)})
        if result.masks is not None:
            outlines = np.empty(len(det), dtype=object)
            outlines[:] = [np.asarray(p, dtype=np.float64) if len(p) >= 3 else None for p in result.masks.xy]
            det.data[POLYGON] = outlines
        peak = float(det.confidence.max()) if len(det) else None
        return Prediction(detections=det, candidate_peak=peak, class_names=names)


def load_open_vocab(source: str, device: str | None = None, embed: Embedder | None = None, **options: Any
                    ) -> OpenVocabYolo:
    """YOLOE or YOLO-World weights (or a YAML, for an untrained model) through ultralytics' YOLOE / YOLOWorld.
    Without `embed`, the text encoder is loaded now; where it cannot be (offline), a one-line ModelLoadError."""
    from ultralytics import YOLOE, YOLOWorld

    path = Path(source).expanduser()
    if path.suffix != ".yaml" and not path.is_file():
        raise ModelLoadError(f"{source}: no such weights file (download {path.name} from ultralytics' releases "
                             "where you have internet, then pass its path)")
    cls = YOLOE if path.name.lower().startswith("yoloe") else YOLOWorld
    try:
        yolo = cls(str(path))
    except Exception as exc:  # ultralytics raises bare exceptions on bad files
        raise ModelLoadError(f"could not load {source} as {cls.__name__}: {exc}") from exc
    device = device or default_device()
    yolo.model.to(device)
    model = OpenVocabYolo(yolo, path.stem, f"{path.stem}-{cls.__name__.lower()}", device, embed, **options)
    if embed is None:
        try:
            model.embed(["object"])
        except Exception as exc:  # a missing package, a download refused offline
            raise ModelLoadError(f"{cls.__name__} {path.name} needs its text encoder to turn labels into classes, and "
                                 f"it cannot be loaded here ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                                 "run once with internet so ultralytics caches it") from exc
    log.info("loaded %s (%s) on %s", model.version, cls.__name__, device)
    return model


__all__ = ["OpenVocabYolo", "is_open_vocab", "load_open_vocab"]
