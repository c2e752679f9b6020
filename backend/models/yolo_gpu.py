"""GPU pre-annotation for YOLO detection and segmentation: encoded image bytes in, `Prediction`s out.

Tandem's adapter (backend/models/yolo.py) hands ultralytics decoded PIL images, one batch at a time: the
JPEG decode, EXIF transpose, BGR flip, letterbox and per-image Python all run on the CPU, and on a large
GPU they, not the network, set the pace. This pipeline moves that work onto the device:

    bytes -> header (format, size, EXIF orientation; PIL reads only the header)
          -> decode: nvjpeg through `torchvision.io.decode_jpeg(device="cuda")`, batched; libjpeg-turbo
             through torchvision on the CPU for JPEGs nvjpeg refuses and on CPU-only machines; PIL
             (Tandem's own `decode_image`, in decode threads) for PNG and every other format
          -> EXIF orientation applied to the tensor (flips/transposes, on the device)
          -> letterbox on the device, with ultralytics' own `LetterBox` arithmetic (same rect/square rule
             as its predictor) and bilinear resizing rounded to uint8 like OpenCV's
          -> one forward pass per batch (fp16 on CUDA) through ultralytics' `AutoBackend`
          -> ultralytics' GPU NMS with `return_idxs`, so each kept box keeps its whole class vector
          -> one device-to-host copy per batch -> `Prediction`s (backend.models.base.ModelOutput)

A producer thread reads the sources (so a lazy iterable that downloads overlaps with inference), decodes
and letterboxes batch i+1 on a side CUDA stream while the caller's thread runs batch i; the hand-over is
a bounded queue. CPU-decoded images reach the device through pinned (page-locked) host memory.

The outputs are those of `YoloAdapter._convert`: xyxy float64 in pixels of the EXIF-transposed image,
confidence, class_id, data["class_name"], data["class_scores"] (N, C) and `candidate_peak` (the highest
class score over all candidates). Classification models are not served here (the adapter serves them).

On CPU tensors the same code runs (the tests exercise it there); only nvjpeg decoding, the side stream
and the pinned copies are CUDA-only.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")

import numpy as np  # noqa: E402
import supervision as sv  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from backend.core.prediction import CLASS_NAME, CLASS_SCORES, POLYGON  # noqa: E402
from backend.core.read_ahead import read_ahead  # noqa: E402
from backend.errors import MediaError, ModelLoadError  # noqa: E402
from backend.models.base import ModelOutput, ModelTask  # noqa: E402

PAD_VALUE = 114
DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own decompression-bomb limit (2x its warning threshold)
_EXIF_ORIENTATION = 0x0112


# -- decoding and orientation ------------------------------------------------------------------------

@dataclass(frozen=True)
class Header:
    """What the image's header says, read without decoding the pixels."""

    format: str  # PIL's name: "JPEG", "PNG", ...
    mode: str
    width: int  # as stored, before EXIF orientation
    height: int
    orientation: int  # EXIF 1..8 (1 when absent) for JPEGs; 0 for other formats: the PIL decoder applies it


def read_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Header:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            # a JPEG's EXIF sits before the pixels; PIL finds other formats' tags only by decoding them, so
            # those go to the PIL decoder, which applies the orientation itself (0 here: not read)
            jpeg = img.format in ("JPEG", "MPO")
            orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1) if jpeg else 0
    except Exception as exc:  # noqa: BLE001 - PIL's plugins raise anything on garbage
        raise MediaError(f"corrupt or not an image ({len(data)} bytes): {type(exc).__name__}: {exc}") from exc
    w, h = img.size
    if w * h > max_pixels:
        raise MediaError(f"image is {w}x{h} pixels, over the {max_pixels}-pixel limit")
    return Header(img.format or "", img.mode, w, h, orientation if 0 <= orientation <= 8 else 1)


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation to a (C, H, W) tensor, as PIL's `ImageOps.exif_transpose` does."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1, -2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:  # transpose
        return image.transpose(-1, -2)
    if orientation == 6:  # rotate 90 degrees clockwise
        return image.transpose(-1, -2).flip(-1)
    if orientation == 7:  # transverse
        return image.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:  # rotate 90 degrees anticlockwise
        return image.transpose(-1, -2).flip(-2)
    return image


_TORCHVISION_CPU = {"JPEG": ("RGB", "L"), "MPO": ("RGB", "L")}


def decode_cpu(data: bytes, header: Header, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, bool]:
    """(C, H, W) uint8 RGB on the CPU, and whether EXIF orientation is already applied.

    RGB and grey JPEGs go through torchvision's libjpeg-turbo; anything else (PNG included) through
    Tandem's PIL decoder, which applies EXIF and shows 16-bit and float images as the browser does."""
    from torchvision.io import ImageReadMode, decode_image

    if header.mode in _TORCHVISION_CPU.get(header.format, ()):
        try:
            return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB), False
        except RuntimeError:
            pass  # a variant libjpeg/libpng through torchvision refuses; PIL may still read it
    from backend.media.fetch import decode_image as pil_decode

    img = pil_decode(data, "image", max_pixels)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1), True


def decode_batch(blobs: list[bytes], headers: list[Header], device: torch.device,
                 max_pixels: int = DEFAULT_MAX_PIXELS, pool: ThreadPoolExecutor | None = None,
                 cpu_share: float = 0.0) -> list[torch.Tensor | MediaError]:
    """Decode and orient each image onto `device` as (3, H, W) uint8; a MediaError where one cannot be.

    On CUDA, JPEGs go to nvjpeg except `cpu_share` of them, which the `pool` decodes with libjpeg-turbo
    (torchvision releases the GIL) at the same time as nvjpeg works, as it does every other format."""
    out: list[torch.Tensor | MediaError | None] = [None] * len(blobs)
    gpu_idx = []
    if device.type == "cuda":
        gpu_idx = [i for i, h in enumerate(headers) if h.format in ("JPEG", "MPO") and h.mode in ("RGB", "L")]
        if cpu_share > 0 and pool is not None:
            step = 1.0 / min(cpu_share, 1.0)
            to_cpu = {gpu_idx[int(k * step)] for k in range(int(len(gpu_idx) * min(cpu_share, 1.0)))}
            gpu_idx = [i for i in gpu_idx if i not in to_cpu]
    gpu_set = set(gpu_idx)
    rest = [i for i in range(len(blobs)) if i not in gpu_set]
    pending = [pool.submit(_decode_one, blobs[i], headers[i], device, max_pixels) for i in rest] if pool else None
    if gpu_idx:
        from torchvision.io import ImageReadMode, decode_jpeg

        raw = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in gpu_idx]
        try:
            decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one image nvjpeg refuses fails the batch: retry one by one, then on the CPU
            decoded = []
            for r in raw:
                try:
                    decoded.append(decode_jpeg(r, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
        for i, img in zip(gpu_idx, decoded):
            if img is not None:
                out[i] = orient(img, headers[i].orientation)

    if pending is not None:
        for i, future in zip(rest, pending):
            out[i] = future.result()
    for i in range(len(blobs)):  # nvjpeg refused it, or no pool
        if out[i] is None:
            out[i] = _decode_one(blobs[i], headers[i], device, max_pixels)
    return out  # type: ignore[return-value]


def _decode_one(data: bytes, header: Header, device: torch.device, max_pixels: int) -> torch.Tensor | MediaError:
    """On the CPU, oriented, then through pinned memory onto a CUDA device."""
    try:
        img, oriented = decode_cpu(data, header, max_pixels)
    except MediaError as exc:
        return exc
    img = img if oriented else orient(img, header.orientation)
    if device.type == "cuda":
        return img.contiguous().pin_memory().to(device, non_blocking=True)
    return img


# -- letterbox ---------------------------------------------------------------------------------------

class _Shape:
    """Stands in for an image in ultralytics' `LetterBox.get_params`, which reads only `.shape`."""

    def __init__(self, h: int, w: int) -> None:
        self.shape = (h, w, 3)


@dataclass(frozen=True)
class Placement:
    """Where one image sits in the network input: resized size, gains and top-left padding."""

    height: int  # original (oriented) size
    width: int
    new_h: int
    new_w: int
    top: int
    left: int


def plan_letterbox(sizes: list[tuple[int, int]], imgsz: int, stride: int, rect: bool = True
                   ) -> tuple[tuple[int, int], list[Placement]]:
    """The input shape for a batch of (h, w) images and each one's placement, by ultralytics' predictor rule:
    a batch of one shape is padded only to the stride (rect), a mixed batch to the full square."""
    from ultralytics.data.augment import LetterBox

    same = len(set(sizes)) == 1
    lb = LetterBox((imgsz, imgsz), auto=same and rect, stride=stride)
    placements, shape = [], None
    for h, w in sizes:
        p = lb.get_params({"img": _Shape(h, w)})
        new_w, new_h = p["new_unpad"]
        placements.append(Placement(h, w, new_h, new_w, p["top"], p["left"]))
        this = (new_h + p["top"] + p["bottom"], new_w + p["left"] + p["right"])
        shape = this if shape is None else (max(shape[0], this[0]), max(shape[1], this[1]))
    return shape or (imgsz, imgsz), placements


def letterbox_batch(images: list[torch.Tensor], shape: tuple[int, int], placements: list[Placement]) -> torch.Tensor:
    """(B, 3, H, W) uint8: each image resized (bilinear, half-pixel centres, no antialias, rounded to
    uint8 like OpenCV's INTER_LINEAR) and placed on a grey (114) canvas, on the images' device."""
    device = images[0].device
    batch = torch.full((len(images), 3, *shape), PAD_VALUE, dtype=torch.uint8, device=device)
    for b, (img, p) in enumerate(zip(images, placements)):
        if (p.new_h, p.new_w) != tuple(img.shape[-2:]):
            img = F.interpolate(img[None].float(), size=(p.new_h, p.new_w), mode="bilinear",
                                align_corners=False)[0].round_().clamp_(0, 255)
        batch[b, :, p.top:p.top + p.new_h, p.left:p.left + p.new_w] = img
    return batch


# -- the pipeline ------------------------------------------------------------------------------------

@dataclass
class _Prepared:
    keys: list[Any]
    batch: torch.Tensor | None  # (B, 3, H, W) uint8 of the images that decoded
    placements: list[Placement]
    rows: list[int]  # index into keys of each batch row
    errors: dict[int, MediaError]
    ready: Any = None  # a CUDA event recorded on the side stream



class GpuYoloPipeline:
    """One YOLO detect/segment checkpoint served from encoded bytes in large batches.

    `predict_bytes` takes a list of encoded images; `stream` takes any iterable of (key, bytes) (or of
    (key, callable returning bytes), fetched in `fetch_workers` threads, a bounded window ahead) and yields
    (key, Prediction | MediaError) in order. `predict` takes PIL images, like every ModelAdapter.
    """

    def __init__(
        self,
        weights: str | Path,
        *,
        device: str | None = None,
        conf: float = 0.25,
        iou: float = 0.7,
        imgsz: int | None = None,
        batch: int = 64,
        half: bool | None = None,
        max_det: int = 300,
        rect: bool = True,
        prefetch: int = 2,
        decode_workers: int | None = None,
        cpu_decode_share: float | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        name: str | None = None,
    ) -> None:
        from ultralytics import YOLO
        from ultralytics.nn.autobackend import AutoBackend

        from backend.models.yolo import _resolve_weights, default_device, file_digest, load_error

        resolved = _resolve_weights(str(weights))
        try:
            yolo = YOLO(resolved)
        except Exception as exc:  # noqa: BLE001 - corrupt files raise anything
            raise load_error(weights, exc) from exc
        if yolo.task not in (ModelTask.DETECT.value, ModelTask.SEGMENT.value):
            raise ModelLoadError(f"the GPU pipeline serves detect and segment models, not {yolo.task} ({weights})")
        self.task = ModelTask(yolo.task)
        names = yolo.names
        self.class_names = tuple(names[i] for i in sorted(names))
        self.device = device or default_device()
        self._device = torch.device(self.device)
        self.half = self._device.type == "cuda" if half is None else half
        self.conf, self.iou, self.batch, self.max_det, self.rect = conf, iou, batch, max_det, rect
        self.imgsz = imgsz or int(yolo.overrides.get("imgsz") or 640)
        self.prefetch, self.max_pixels = max(1, prefetch), max_pixels
        path = Path(yolo.ckpt_path or resolved)
        self.path = path if path.is_file() else None
        self.name = name or Path(resolved).stem
        self.version = f"{self.name}-{file_digest(self.path)}" if self.path else self.name
        # ultralytics' own loading: fused conv+bn, fp16 on request, on the device (as its predictor does)
        self._model = AutoBackend(model=yolo.model, device=self._device, fp16=self.half, fuse=True, verbose=False)
        self._model.eval()
        stride = getattr(self._model, "stride", 32)
        self.stride = int(max(stride) if isinstance(stride, (list, tuple, torch.Tensor)) else stride)
        # CPU decoders: PNGs and the like, and on a host with cores to spare a share of the JPEGs beside nvjpeg
        workers = decode_workers or max(1, min(16, (os.cpu_count() or 2) - 2))
        # 0.25: the best of 0, 0.25, 0.5, 0.75 in one run on a 16-core H200 host (benchmarks/results/gpu_pipeline.md)
        self.cpu_decode_share = (0.25 if workers >= 8 else 0.0) if cpu_decode_share is None else cpu_decode_share
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="tandem-gpu-decode")
        self._lock = threading.Lock()  # one stream at a time per model

    # -- public API ------------------------------------------------------------------------------------
    def predict_bytes(self, blobs: list[bytes]) -> list[ModelOutput]:
        """One Prediction per encoded image, in order; a MediaError for the first image that cannot be read."""
        out = []
        for key, result in self.stream(enumerate(blobs)):
            if isinstance(result, MediaError):
                raise MediaError(f"image {key}: {result}")
            out.append(result)
        return out

    def predict(self, images: list[Image.Image]) -> list[ModelOutput]:
        """Decoded RGB images (EXIF already applied, as Tandem's media layer hands them over)."""
        outputs: list[ModelOutput] = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(images), self.batch):
                chunk = images[start:start + self.batch]
                tensors = [torch.from_numpy(np.array(im.convert("RGB") if im.mode != "RGB" else im, dtype=np.uint8))
                           .permute(2, 0, 1).to(self._device) for im in chunk]
                prepared = self._letterbox(list(range(len(chunk))), tensors, {})
                outputs.extend(r for _, r, _ in self._infer(prepared))
        return outputs

    def stream(self, sources: Iterable[tuple[Any, bytes | Callable[[], bytes]]], fetch_workers: int = 8
               ) -> Iterator[tuple[Any, ModelOutput | MediaError]]:
        """(key, Prediction | MediaError) for each source, in order; the next batches are read, decoded and
        letterboxed in a producer thread while this one runs the network."""
        for key, result, _ in self.stream_sized(sources, fetch_workers):
            yield key, result

    def stream_sized(self, sources: Iterable[tuple[Any, bytes | Callable[[], bytes]]], fetch_workers: int = 8
                     ) -> Iterator[tuple[Any, ModelOutput | MediaError, tuple[int, int] | None]]:
        """As `stream`, with each decoded image's (width, height) as shown (EXIF applied; None on error):
        Label Studio's regions are percentages of it, and only the decoder knows it."""
        with self._lock, torch.inference_mode():
            for prepared in read_ahead(self._prepared(sources, fetch_workers), self.prefetch, "tandem-gpu-producer"):
                yield from self._infer(prepared)

    # -- producer (on read_ahead's thread) ---------------------------------------------------------------
    def _prepared(self, sources, fetch_workers: int) -> Iterator[Any]:
        side = torch.cuda.Stream(self._device) if self._device.type == "cuda" else None
        with torch.inference_mode(), (torch.cuda.stream(side) if side is not None else _nullcontext()):
            for chunk in _chunks(_fetched(sources, fetch_workers, self.batch), self.batch):
                prepared = self._prepare(chunk)
                if side is not None:
                    prepared.ready = torch.cuda.Event()
                    prepared.ready.record(side)
                yield prepared

    def _prepare(self, chunk: list[tuple[Any, bytes | MediaError]]) -> _Prepared:
        keys = [k for k, _ in chunk]
        errors: dict[int, MediaError] = {}
        blobs, headers, idx = [], [], []
        for i, (_, data) in enumerate(chunk):
            if isinstance(data, MediaError):
                errors[i] = data
                continue
            try:
                headers.append(read_header(data, self.max_pixels))
            except MediaError as exc:
                errors[i] = exc
                continue
            blobs.append(data)
            idx.append(i)
        tensors = {}
        for i, img in zip(idx, decode_batch(blobs, headers, self._device, self.max_pixels, self._pool,
                                            self.cpu_decode_share)):
            if isinstance(img, MediaError):
                errors[i] = img
            else:
                tensors[i] = img
        rows = [i for i in idx if i in tensors]
        return self._letterbox(keys, [tensors[i] for i in rows], errors, rows)

    def _letterbox(self, keys, tensors: list[torch.Tensor], errors, rows: list[int] | None = None) -> _Prepared:
        rows = list(range(len(tensors))) if rows is None else rows
        if not tensors:
            return _Prepared(keys, None, [], rows, errors)
        shape, placements = plan_letterbox([tuple(t.shape[-2:]) for t in tensors], self.imgsz, self.stride, self.rect)
        return _Prepared(keys, letterbox_batch(tensors, shape, placements), placements, rows, errors)

    # -- consumer ----------------------------------------------------------------------------------------
    def _infer(self, prep: _Prepared) -> Iterator[tuple[Any, ModelOutput | MediaError, tuple[int, int] | None]]:
        results: dict[int, ModelOutput] = {}
        sizes = {row: (p.width, p.height) for row, p in zip(prep.rows, prep.placements)}
        if prep.batch is not None:
            if prep.ready is not None:
                torch.cuda.current_stream(self._device).wait_event(prep.ready)
                prep.batch.record_stream(torch.cuda.current_stream(self._device))
            results = dict(zip(prep.rows, self._forward(prep.batch, prep.placements)))
        for i, key in enumerate(prep.keys):
            yield key, prep.errors[i] if i in prep.errors else results[i], sizes.get(i)

    def _forward(self, batch: torch.Tensor, placements: list[Placement]) -> list[ModelOutput]:
        from ultralytics.utils import nms

        x = (batch.half() if self.half else batch.float()).div_(255)
        preds = self._model(x)
        raw = preds
        while isinstance(raw, (list, tuple)):
            raw = raw[0]
        nc = len(self.class_names)
        kept, idxs = nms.non_max_suppression(
            raw, self.conf, self.iou, None, False, max_det=self.max_det,
            nc=0 if self.task is ModelTask.DETECT else nc, return_idxs=True,
        )
        scores = raw[:, 4:4 + nc, :]
        peaks = scores.amax(dim=(1, 2)).float().cpu().tolist() if scores.numel() else [0.0] * len(placements)
        vectors = [scores[b].T[idxs[b].long().view(-1)] for b in range(len(kept))]
        if self.task is ModelTask.SEGMENT:
            protos = preds[0][1] if isinstance(preds[0], tuple) else preds[1]  # as its SegmentationPredictor
            return [self._segment(kept[b], vectors[b], protos[b], x.shape[2:], placements[b], peaks[b])
                    for b in range(len(kept))]
        return self._detections(kept, vectors, placements, peaks)

    def _detections(self, kept, vectors, placements: list[Placement], peaks: list[float]) -> list[ModelOutput]:
        """All images' kept boxes mapped back to original pixels in one pass and one copy to the host."""
        counts = [len(k) for k in kept]
        nc = len(self.class_names)
        if sum(counts):
            dev = kept[0].device
            rows = torch.cat([k[:, :6].float() for k in kept])
            vec = torch.cat([v.float() for v in vectors]).view(-1, nc)
            # ops.scale_boxes' arithmetic, for every image's rows at once: minus the padding, over the gain
            per = torch.tensor([[p.left, p.top, p.new_w / p.width, p.new_h / p.height, p.width, p.height]
                                for p in placements], dtype=torch.float32, device=dev)
            per = per.repeat_interleave(torch.tensor(counts, device=dev), dim=0)
            xyxy = rows[:, :4].clone()
            xyxy[:, 0::2] = ((xyxy[:, 0::2] - per[:, 0:1]) / per[:, 2:3]).clamp_(min=0).minimum(per[:, 4:5])
            xyxy[:, 1::2] = ((xyxy[:, 1::2] - per[:, 1:2]) / per[:, 3:4]).clamp_(min=0).minimum(per[:, 5:6])
            host = torch.cat([xyxy, rows[:, 4:6], vec], dim=1).cpu().numpy().astype(np.float64)
        else:
            host = np.zeros((0, 6 + nc))
        out, start = [], 0
        for n, peak in zip(counts, peaks):
            part = host[start:start + n]
            start += n
            out.append(self._output(part[:, :4], part[:, 4], part[:, 5].astype(int), part[:, 6:], peak))
        return out

    def _segment(self, pred, vectors, proto, input_shape, p: Placement, peak: float) -> ModelOutput:
        from ultralytics.engine.results import Masks
        from ultralytics.utils import ops

        polygons = np.empty(0, dtype=object)
        if len(pred):
            masks = ops.process_mask(proto, pred[:, 6:], pred[:, :4], input_shape, upsample=True)
            keep = masks.amax((-2, -1)) > 0  # ultralytics keeps only boxes with a mask
            pred, masks, vectors = pred[keep], masks[keep], vectors[keep]
            pred = pred.float().clone()
            pred[:, :4] = ops.scale_boxes(input_shape, pred[:, :4], (p.height, p.width))
            outlines = Masks(masks, (p.height, p.width)).xy if len(pred) else []
            polygons = np.empty(len(pred), dtype=object)
            for i, outline in enumerate(outlines):
                polygons[i] = np.asarray(outline, dtype=np.float64)
        host = pred[:, :6].float().cpu().numpy().astype(np.float64) if len(pred) else np.zeros((0, 6))
        vec = vectors.float().cpu().numpy().astype(np.float64) if len(pred) else np.zeros((0, len(self.class_names)))
        out = self._output(host[:, :4], host[:, 4], host[:, 5].astype(int), vec, peak)
        out.detections.data[POLYGON] = polygons
        return out

    def _output(self, xyxy, confidence, class_id, class_scores, peak: float) -> ModelOutput:
        detections = sv.Detections(
            xyxy=np.ascontiguousarray(xyxy, dtype=np.float64),
            confidence=np.ascontiguousarray(confidence, dtype=np.float64),
            class_id=class_id.astype(int),
            data={CLASS_NAME: np.array([self.class_names[i] for i in class_id], dtype=object),
                  CLASS_SCORES: np.ascontiguousarray(class_scores, dtype=np.float64).reshape(
                      len(class_id), len(self.class_names))},
        )
        return ModelOutput(detections=detections, candidate_peak=float(peak))

    def close(self) -> None:
        self._pool.shutdown(wait=False)


# -- helpers -----------------------------------------------------------------------------------------

class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _fetched(sources, workers: int, window: int) -> Iterator[tuple[Any, bytes | MediaError]]:
    """(key, bytes) in order; callables are run in `workers` threads, at most `window` ahead."""
    pool: ThreadPoolExecutor | None = None
    pending: list[tuple[Any, Future | bytes]] = []

    def settle(item) -> tuple[Any, bytes | MediaError]:
        key, value = item
        if isinstance(value, Future):
            try:
                value = value.result()
            except MediaError as exc:
                return key, exc
            except Exception as exc:  # noqa: BLE001 - one failed download fails one image
                return key, MediaError(f"{type(exc).__name__}: {exc}")
        return key, value

    try:
        for key, value in sources:
            if callable(value):
                pool = pool or ThreadPoolExecutor(max(1, workers), thread_name_prefix="tandem-gpu-fetch")
                value = pool.submit(value)
            pending.append((key, value))
            if len(pending) > window:
                yield settle(pending.pop(0))
        while pending:
            yield settle(pending.pop(0))
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
