"""Modal offline: the app defines with no network, its real body runs via .local(), and the client path
runs against Modal's classes patched at their boundary (Volume, Function.from_name, FunctionCall)."""

from __future__ import annotations

import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

import httpx
import modal
import modal.config
import pytest

from backend.datasets.shapes import write_yolo_dataset
from backend.models.yolo import YoloAdapter
from backend.server.app import create_app
from backend.serving import ModelHolder
from backend.settings import Settings
from backend.training.export import ExportedDataset
from backend.training.jobs import JobStore
from tests.harness import ServerThread

CREDS = ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "MODAL_PROFILE")


@pytest.fixture
def no_network(monkeypatch):
    attempts = []

    def guard(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", guard)
    monkeypatch.setattr(socket, "getaddrinfo", guard)
    return attempts


@pytest.fixture
def no_creds(monkeypatch):
    for var in CREDS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(modal.config, "_user_config", {})  # hide any ~/.modal.toml, as Modal's own tests do


def test_app_defines_offline(no_network):
    import infra.modal_app as m

    assert m.app.name == "tandem-train"
    assert isinstance(m.train_yolo, modal.Function) and isinstance(m.volume, modal.Volume)
    assert isinstance(m.image, modal.Image)
    assert no_network == []


def _tiny_job_files(root: Path, weights: Path) -> None:
    write_yolo_dataset(root / "jobs/1/dataset", train=6, val=3, seed=4)
    shutil.copyfile(weights, root / "jobs/1/parent.pt")


def test_function_body_runs_locally(tmp_path, monkeypatch, detect_weights):
    import infra.modal_app as m

    monkeypatch.setenv("TANDEM_MODAL_VOLUME_ROOT", str(tmp_path))
    _tiny_job_files(tmp_path, detect_weights)
    summary = m.train_yolo.local(dataset_path="jobs/1/dataset/data.yaml", parent_path="jobs/1/parent.pt",
                                 run_name="job1", params={"epochs": 1, "imgsz": 96})
    assert summary["weights_vol"] == "runs/job1/train/weights/last.pt"
    assert set(summary) >= {"weights", "seconds", "imgsz", "size"} and all(
        isinstance(v, (str, int, float)) for v in summary.values())  # plain types: they cross a pickle boundary
    assert YoloAdapter(tmp_path / summary["weights_vol"]).task.value == "detect"


class FakeVolume:
    """Modal's Volume at its boundary: a folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @contextmanager
    def batch_upload(self, force: bool = False):
        vol = self

        class Batch:
            def put_directory(self, local, remote):
                shutil.copytree(local, vol.root / remote.lstrip("/"), dirs_exist_ok=True)

            def put_file(self, local, remote):
                (vol.root / remote.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(local, vol.root / remote.lstrip("/"))

        yield Batch()

    def read_file(self, path):
        data = (self.root / path).read_bytes()
        yield from (data[i : i + 65536] for i in range(0, len(data), 65536))


def test_client_path_spawns_polls_and_downloads(tmp_path, monkeypatch, detect_weights):
    import infra.modal_app as app_module
    from infra.modal_runner import train_on_modal

    vol_root = tmp_path / "volume"
    vol_root.mkdir()
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-test")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-test")
    monkeypatch.setenv("TANDEM_MODAL_VOLUME_ROOT", str(vol_root))
    calls = {}

    class FakeCall:
        object_id = "fc-test-1"
        polls = 0

        def get(self, timeout=None):
            FakeCall.polls += 1
            if FakeCall.polls < 3:
                raise TimeoutError  # Modal raises the builtin TimeoutError while the call runs
            return calls["result"]

    class FakeFunction:
        def spawn(self, **kwargs):
            calls["kwargs"] = kwargs
            calls["result"] = app_module.train_yolo.local(**kwargs)  # the real body, on the fake Volume
            return FakeCall()

    monkeypatch.setattr(modal.Volume, "from_name", staticmethod(lambda name, **kw: FakeVolume(vol_root)))
    monkeypatch.setattr(modal.Function, "from_name", staticmethod(lambda app, fn, **kw: FakeFunction()))
    monkeypatch.setattr(modal.FunctionCall, "from_id", staticmethod(lambda object_id, **kw: FakeCall()))

    data_root = tmp_path / "export"
    write_yolo_dataset(data_root, train=6, val=3, seed=5)
    dataset = ExportedDataset(root=data_root, task="detect", class_names=["square", "circle", "triangle"],
                              data=str(data_root / "data.yaml"), train=6, val=3)
    store = JobStore(tmp_path / "db.sqlite3")
    job = store.create(1, "yolo", "modal", "test")
    lines = []
    weights = train_on_modal(job, str(detect_weights), dataset, tmp_path, {"epochs": 1, "imgsz": 96}, lines.append,
                             store=store, poll_s=0.01)
    assert calls["kwargs"]["parent_path"] == f"jobs/{job.id}/parent.pt"
    assert (vol_root / f"jobs/{job.id}/dataset/data.yaml").exists()
    assert FakeCall.polls == 3 and store.get(job.id).remote_id == "fc-test-1"
    assert YoloAdapter(weights).task.value == "detect"
    assert any("spawned tandem-train.train_yolo" in line for line in lines)


def test_missing_credentials_are_a_clear_error_before_any_call(tmp_path, no_creds, no_network, detect_adapter):
    from infra.modal_runner import ModalUnavailable, require_modal_credentials

    with pytest.raises(ModalUnavailable, match="modal token new"):
        require_modal_credentials()
    assert no_network == []
    app = create_app(Settings(home=tmp_path / "home"), ModelHolder(detect_adapter))
    client = __import__("fastapi.testclient", fromlist=["TestClient"]).TestClient(app)
    r = client.post("/train", json={"project": 1, "runner": "modal"})
    assert r.status_code == 400 and "Modal credentials are missing" in r.json()["detail"]
    assert app.state.training.store.list() == []  # no job was created
