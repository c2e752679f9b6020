"""Ultralytics YOLO (detect, segment, classify, embed) behind the `Model` protocol (and `ModelAdapter`: one
task, its own classes; a request's vocabulary is not asked, the writers map classes onto labels).

The model is loaded once and kept; ultralytics' predictor is not thread-safe, so calls are serialised on
one inference thread (concurrent task-open requests from Label Studio are common). One thread, not a lock:
torch's OpenMP pool belongs to the calling thread, and a server's rotating worker threads would each start
(and leave spinning) a pool of their own.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

# Before ultralytics is imported: no connectivity probe, no pip auto-install.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")

import numpy as np  # noqa: E402
import supervision as sv  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from backend.core.prediction import CLASS_NAME, CLASS_SCORES, POLYGON  # noqa: E402
from backend.errors import ModelLoadError  # noqa: E402
from backend.models.base import TASK_CAPABILITY, Capability, ModelOutput, ModelRequest, ModelTask  # noqa: E402

Runner = Callable[[list[np.ndarray], float], list[ModelOutput]]  # RGB uint8 images, confidence -> outputs


def _class_vector_predictor(base: type) -> type:
    """A predictor that keeps each kept box's class scores from before NMS.

    Ultralytics returns only the top class per box; active learning needs the whole vector for entropy
    and margin. NMS is run once more with `return_idxs=True` (cheap next to the forward pass) to find
    which anchors survived, and their class columns are attached to the results as `class_scores`.
    """
    from ultralytics.utils import nms

    class ClassVectorPredictor(base):
        def postprocess(self, preds, img, orig_imgs, **kwargs):
            raw = preds
            while isinstance(raw, (list, tuple)):
                raw = raw[0]
            nc = len(self.model.names)
            kept, idxs = nms.non_max_suppression(
                raw,
                self.args.conf,
                kwargs.get("iou", self.args.iou),
                self.args.classes,
                self.args.agnostic_nms,
                max_det=self.args.max_det,
                nc=0 if self.args.task == "detect" else nc,
                return_idxs=True,
            )
            results = super().postprocess(preds, img, orig_imgs, **kwargs)
            for b, result in enumerate(results):
                scores = raw[b, 4 : 4 + nc, :]
                vectors = scores.T[idxs[b].long()]  # empty idxs come back as float
                result.class_scores = _align(kept[b][:, 4], result.boxes.conf, vectors)
                result.candidate_peak = float(scores.max()) if scores.numel() else 0.0
            return results

    return ClassVectorPredictor


def _align(nms_conf, final_conf, vectors):
    """Rows of `vectors` for the boxes that survived ultralytics' post-NMS filtering (order is kept)."""
    if len(final_conf) == len(nms_conf):
        return vectors
    rows, j = [], 0
    for c in final_conf.tolist():
        while j < len(nms_conf) and abs(float(nms_conf[j]) - c) > 1e-6:
            j += 1
        rows.append(min(j, len(nms_conf) - 1))
        j += 1
    return vectors[rows]


def _rgb(img: Image.Image) -> np.ndarray:
    """Without the copy `convert` makes of an image already in RGB."""
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def _run_detector(detector, iou: float, arrays: list[np.ndarray], conf: float) -> list[ModelOutput]:
    return detector.predict(arrays, conf, iou)


def default_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def file_digest(path: Path, length: int = 8) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def _hub_reachable(host: str = "github.com", timeout: float = 1.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_error(weights: object, exc: Exception) -> ModelLoadError:
    """A failed `YOLO(...)` in one line: ultralytics' own message (without its "ERROR ❌" prefix and its advice
    to run its hub models, which this machine may not reach) or, for anything else, the exception's type."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if first.startswith("ERROR"):
        first = first.removeprefix("ERROR").lstrip(" ❌️\ufe0f").strip()
        return ModelLoadError(f"cannot load YOLO weights {weights}: {first.replace(f'{weights} is ', 'it is ', 1)}")
    if "is not a supported model format" in first:  # ultralytics goes on to list two dozen formats
        return ModelLoadError(f"cannot load YOLO weights {weights}: it is not a supported model format (a YOLO "
                              ".pt checkpoint, or a folder or file ultralytics exported)")
    return ModelLoadError(f"cannot load YOLO weights {weights}: {type(exc).__name__}: {first}")


def _resolve_weights(spec: str) -> str:
    """A path is used as is; a bare ultralytics name ("yolov8n.pt") downloads only when the hub answers."""
    path = Path(spec).expanduser()
    if path.is_file():
        return str(path)
    looks_like_name = path.name == spec and spec.endswith((".pt", ".yaml"))
    if spec.endswith(".yaml"):
        return spec  # an architecture from the package: random weights, no download
    if not looks_like_name:
        raise ModelLoadError(f"model weights not found: {spec}")
    if os.environ.get("YOLO_OFFLINE", "1") not in ("0", "false", "False") and not _hub_reachable():
        raise ModelLoadError(
            f"'{spec}' is not a local file and the model hub cannot be reached (offline). "
            "Pass a weights path, e.g. --model runs/detect/train/weights/best.pt"
        )
    os.environ["YOLO_OFFLINE"] = "0"
    return spec


class YoloAdapter:
    """One YOLO checkpoint. `version` is `<stem>-<sha256[:8]>` so retrained weights never share a version."""

    def __init__(
        self,
        weights: str | Path,
        *,
        device: str | None = None,
        conf: float = 0.25,
        iou: float = 0.7,
        imgsz: int | None = None,
        batch: int = 16,
        name: str | None = None,
        engine: str = "torch",
        cache_dir: Path | None = None,
        calibration: Path | None = None,
    ) -> None:
        """`engine`: "torch", "openvino" (CPU; exported once per version, parity-checked), "int8" (OpenVINO
        INT8 for detection, calibrated on the images in `calibration`; falls back to fp32 OpenVINO) or
        "auto" (OpenVINO on CPU when it exports cleanly, else PyTorch)."""
        from ultralytics import YOLO

        resolved = _resolve_weights(str(weights))
        try:
            self._model = YOLO(resolved)
            names = self._model.names  # a file of another format is only opened (and refused) here
        except Exception as exc:  # corrupt files raise anything from pickle errors to KeyError
            raise load_error(weights, exc) from exc
        if self._model.task not in {t.value for t in ModelTask}:
            raise ModelLoadError(f"unsupported YOLO task '{self._model.task}' in {weights}")
        self.task = ModelTask(self._model.task)
        self.capabilities = frozenset({TASK_CAPABILITY[self.task], Capability.EMBED})
        self.class_names = tuple(names[i] for i in sorted(names))
        self.device = device or default_device()
        self.conf, self.iou, self.batch = conf, iou, batch
        self.imgsz = imgsz or int(self._model.overrides.get("imgsz") or 640)
        # a detector letterboxes the longer side to imgsz, so a photo may be decoded smaller (backend.media.fetch);
        # masks come out at the image's own resolution, and a classifier center-crops: those read whole images
        self.decode_side: int | None = self.imgsz if self.task is ModelTask.DETECT else None
        weights_path = Path(self._model.ckpt_path or resolved)
        self.path = weights_path if weights_path.is_file() else None
        stem = name or Path(resolved).stem
        self.name = stem
        self.version = f"{stem}-{file_digest(self.path)}" if self.path else stem
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"tandem-infer-{stem}")
        if engine not in ("torch", "openvino", "int8", "auto"):
            raise ModelLoadError(f"unknown engine {engine!r}: torch, openvino, int8 or auto")
        if engine == "int8" and calibration is None:
            raise ModelLoadError("the int8 engine needs calibration images: a folder like the images you serve "
                                 "(--calibration DIR or TANDEM_INT8_CALIBRATION)")
        # fp16 on CUDA; ultralytics warns about the `half` argument even when it is False, so omit it on CPU
        self._predict_kwargs = {"half": True} if self.device.startswith("cuda") else {}
        if self.task is not ModelTask.CLASSIFY:
            from ultralytics.models.yolo.detect import DetectionPredictor
            from ultralytics.models.yolo.segment import SegmentationPredictor

            base = SegmentationPredictor if self.task is ModelTask.SEGMENT else DetectionPredictor
            self._predict_kwargs["predictor"] = _class_vector_predictor(base)
        self.engine = "torch"
        self._run: Runner = partial(self._run_ultralytics, self._model)
        if engine in ("openvino", "int8") or (engine == "auto" and self.device == "cpu" and self.path is not None):
            self._use_openvino(cache_dir, required=engine in ("openvino", "int8"),
                               calibration=calibration if engine == "int8" else None)

    def _use_openvino(self, cache_dir: Path | None, required: bool, calibration: Path | None = None) -> None:
        """Detection runs Tandem's own OpenVINO pipeline; segmentation and classification run the export
        through ultralytics. Either is served only once it has passed the parity check; an INT8 model that
        cannot be made or fails its check gives way to the fp32 export."""
        import logging

        from backend.models.openvino_engine import remade_once

        log = logging.getLogger("tandem.models")
        try:
            if self.path is None:
                raise ModelLoadError("OpenVINO needs a weights file")
            if self.device != "cpu":
                raise ModelLoadError(f"the OpenVINO engine runs on the CPU, not {self.device}")
            cache = cache_dir or self.path.parent / ".tandem-openvino"
            remade_once(lambda: self._serve_export(cache, calibration, log), cache / f"{self.version}_openvino_model",
                        f"OpenVINO export of {self.version}", "exporting it again")
        except (ModelLoadError, ImportError, RuntimeError, OSError) as exc:
            if required:
                said = str(exc) if "OpenVINO" in str(exc) else f"the OpenVINO engine cannot be used: {exc}"
                raise ModelLoadError(said) from exc
            log.warning("serving with PyTorch: %s", exc)

    def _serve_export(self, cache: Path, calibration: Path | None, log) -> None:
        """Export once (cached per version), then serve INT8 (when asked) or fp32 once it passed its check."""
        from backend.models.openvino_engine import export_openvino, verify_once

        target = export_openvino(self.path, self.version, self.task.value, self.imgsz, cache)
        if calibration is not None:
            try:
                self._run, self.engine = self._int8_runner(target, calibration, cache), "openvino-int8"
                return
            except (ModelLoadError, RuntimeError, OSError) as exc:  # compile or inference errors too
                log.warning("serving OpenVINO fp32, not INT8: %s", exc)
        if self.task is ModelTask.DETECT:
            run: Runner = self._detector_runner(target)
        else:
            from ultralytics import YOLO

            run = partial(self._run_ultralytics, YOLO(str(target), task=self.task.value))
            # ultralytics loads an export on its first predict: an OpenVINO that cannot load fails here, at the
            # start (served by PyTorch instead), not in every request afterwards
            run([np.zeros((32, 32, 3), np.uint8)], 0.99)
        verify_once(target, self._run, run, self.imgsz)
        self._run, self.engine = run, "openvino"

    def _detector_runner(self, target: Path) -> Runner:
        from backend.models.openvino_detector import OpenVinoDetector

        detector = OpenVinoDetector(target, self.class_names, self.imgsz, int(max(self._model.stride)))
        return partial(_run_detector, detector, self.iou)

    def _int8_runner(self, fp32: Path, calibration: Path, cache: Path) -> Runner:
        """Quantize once per version and calibration set; checked against PyTorch at the serving threshold."""
        from backend.models.openvino_engine import (
            calibration_set,
            check_agreement,
            load_images,
            parity_images,
            quantize_openvino,
            remade_once,
            verify_once,
        )

        if self.task is not ModelTask.DETECT:
            raise ModelLoadError(f"INT8 is built for detection models, not {self.task.value}")
        cal = calibration_set(calibration, self.imgsz, self.conf)
        key = f"{self.version}_int8-{cal.digest}"

        def quantized() -> Runner:
            target = quantize_openvino(fp32, key, cal.calibrate, self.imgsz, int(max(self._model.stride)),
                                       len(self._model.model.model) - 1, cache)
            run = self._detector_runner(target)
            # checked on the parity images and on the held-out calibration images (the model's own domain)
            verify_once(target, self._run, run, self.imgsz, conf=self.conf,
                        check=partial(check_agreement, class_names=self.class_names),
                        check_images=lambda: parity_images() + load_images(cal.check, self.imgsz))
            return run

        return remade_once(quantized, cache / f"{key}_openvino_model", f"INT8 model of {self.version}",
                           "quantizing it again")

    def predict(self, images: list[Image.Image], request: ModelRequest | None = None) -> list[ModelOutput]:
        """Its own task and classes: a request's vocabulary is ignored (the labels are mapped afterwards)."""
        if request is not None and request.task is not self.task:
            raise ValueError(f"{self.name} is a {self.task.value} model, not {request.task.value}")
        if not images:
            return []
        arrays = [_rgb(img) for img in images]
        return self._worker.submit(self._inference, self._run, arrays, self.conf).result()

    @staticmethod
    def _inference(fn, *args):
        with torch.inference_mode():
            return fn(*args)

    def _run_ultralytics(self, model, arrays: list[np.ndarray], conf: float) -> list[ModelOutput]:
        outputs: list[ModelOutput] = []
        for start in range(0, len(arrays), self.batch):
            results = model.predict(
                [a[:, :, ::-1] for a in arrays[start : start + self.batch]],  # ultralytics wants BGR
                conf=conf,
                iou=self.iou,
                imgsz=self.imgsz,
                device=self.device,
                verbose=False,
                **self._predict_kwargs,
            )
            outputs.extend(self._convert(r) for r in results)
        return outputs

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        """(N, D) image embeddings from the backbone (pooled penultimate features), for diversity."""
        if not images:
            return np.zeros((0, 0), dtype=np.float32)
        arrays = [_rgb(img)[:, :, ::-1] for img in images]  # ultralytics wants BGR
        return self._worker.submit(self._inference, self._embed, arrays).result()

    def _embed(self, arrays: list[np.ndarray]) -> np.ndarray:
        out = []
        for start in range(0, len(arrays), self.batch):
            feats = self._model.embed(arrays[start : start + self.batch], imgsz=self.imgsz, device=self.device,
                                      verbose=False)
            out.extend(f.detach().float().cpu().numpy().reshape(-1) for f in feats)
        return np.stack(out).astype(np.float32)

    def _convert(self, result) -> ModelOutput:
        if self.task is ModelTask.CLASSIFY:
            probs = result.probs.data.detach().float().cpu().numpy().astype(np.float64)
            return ModelOutput(probabilities=probs / probs.sum())
        boxes = result.boxes
        class_id = boxes.cls.cpu().numpy().astype(int)
        data = {CLASS_NAME: np.array([self.class_names[i] for i in class_id], dtype=object)}
        scores = getattr(result, "class_scores", None)
        if scores is not None:
            data[CLASS_SCORES] = scores.detach().float().cpu().numpy().astype(np.float64).reshape(
                len(class_id), len(self.class_names))
        detections = sv.Detections(
            xyxy=boxes.xyxy.cpu().numpy().astype(np.float64),
            confidence=boxes.conf.cpu().numpy().astype(np.float64),
            class_id=class_id,
            data=data,
        )
        if self.task is ModelTask.SEGMENT:
            polygons = np.empty(len(detections), dtype=object)
            outlines = result.masks.xy if result.masks is not None else []
            for i, outline in enumerate(outlines):
                polygons[i] = np.asarray(outline, dtype=np.float64)
            detections.data[POLYGON] = polygons
        return ModelOutput(detections=detections, candidate_peak=getattr(result, "candidate_peak", None))
