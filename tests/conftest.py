"""Session fixtures: real models trained here, a real Label Studio, and ground truth to check against."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # huggingface_hub reads it at import: no test may reach for the hub

import numpy as np
import pytest
import supervision as sv

from backend.convert.labelstudio import from_results
from backend.core.prediction import CLASS_NAME
from backend.datasets.shapes import ShapeSample
from backend.labeling.config import ControlKind
from backend.models.starter import train_starter_model
from backend.models.yolo import YoloAdapter
from tests.harness import start_label_studio
from tests.postgres import PostgresUnavailable, start_cluster
from tests.tiny_vlms import build as build_tiny_vlm

REPO = Path(__file__).resolve().parents[1]
# Trained weights are reused across runs (delete the folder to retrain); CI starts without it.
CACHE = Path(os.environ.get("TANDEM_TEST_CACHE", REPO / ".test-cache"))


@pytest.fixture(scope="session")
def detect_weights() -> Path:
    return train_starter_model(CACHE / "home", "detect")


@pytest.fixture(scope="session")
def classify_weights() -> Path:
    return train_starter_model(CACHE / "home", "classify")


@pytest.fixture(scope="session")
def segment_weights() -> Path:
    return train_starter_model(CACHE / "home", "segment")


@pytest.fixture(scope="session")
def detect_adapter(detect_weights) -> YoloAdapter:
    return YoloAdapter(detect_weights, device="cpu")


@pytest.fixture(scope="session")
def classify_adapter(classify_weights) -> YoloAdapter:
    return YoloAdapter(classify_weights, device="cpu")


@pytest.fixture(scope="session")
def segment_adapter(segment_weights) -> YoloAdapter:
    return YoloAdapter(segment_weights, device="cpu")


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    """name -> folder of a tiny random-weight checkpoint of that family, built once per session."""
    root = tmp_path_factory.mktemp("tiny-vlms")
    return lambda name: build_tiny_vlm(name, root)


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    ls = start_label_studio(tmp_path_factory.mktemp("label-studio"))
    yield ls
    ls.stop()


@pytest.fixture(scope="session")
def postgres_cluster():
    """A throwaway PostgreSQL cluster on 127.0.0.1 for the session (tests/postgres.py); skipped only where the
    server binaries are not installed (CI installs them)."""
    try:
        cluster = start_cluster()
    except PostgresUnavailable as e:
        pytest.skip(str(e))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_cluster) -> str:
    """A database on the session's cluster, made once (SQLAlchemy URL, psycopg 3 driver)."""
    return postgres_cluster.create_database("tandem_session")


_database_numbers = itertools.count(1)  # names stay unique even where tests' names share their first 40 characters


@pytest.fixture
def postgres_db(postgres_cluster, request):
    """A fresh, empty database for one test; its pooled engine is closed and the database dropped after."""
    from backend.storage.db import dispose

    stem = "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:40]
    name = f"t_{stem}_{next(_database_numbers)}"
    url = postgres_cluster.create_database(name)
    yield url
    dispose(url)
    postgres_cluster.drop_database(name)


def region_boxes(result: list[dict], width: int, height: int) -> tuple[np.ndarray, list[str]]:
    """Rectangle regions of a Label Studio result back to pixel xyxy (the inverse of what Tandem sends)."""
    names = list(dict.fromkeys(r["value"]["rectanglelabels"][0] for r in result if r["type"] == "rectanglelabels"))
    det = from_results(result, ControlKind.RECTANGLE, (width, height), names).detections
    return det.xyxy, [str(n) for n in det.data[CLASS_NAME]]


def assert_matches_truth(xyxy: np.ndarray, labels: list[str], truth: ShapeSample, min_iou: float = 0.5) -> None:
    """Every ground-truth object is found by a box of the same label with IoU >= min_iou."""
    gt = np.array([o.box for o in truth.objects])
    assert len(xyxy), f"no boxes for {truth.name}"
    iou = sv.box_iou_batch(gt, xyxy)
    for i, obj in enumerate(truth.objects):
        j = int(iou[i].argmax())
        assert iou[i, j] >= min_iou, f"{truth.name}: {obj.label} best IoU {iou[i, j]:.2f}"
        assert labels[j].lower() == obj.label, f"{truth.name}: expected {obj.label}, got {labels[j]}"


@pytest.fixture
def memory_root():
    """A fresh fsspec memory:// artifact root, removed afterwards (memory:// is one store per process)."""
    import uuid

    import fsspec

    root = f"memory://tandem-{uuid.uuid4().hex[:8]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root[len("memory://"):]):
        fs.rm(root[len("memory://"):], recursive=True)
