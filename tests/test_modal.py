"""Modal offline: the app defines with no network, its real body runs via .local(), and the client path
runs against Modal's classes patched at their boundary (Volume, Function.from_name, FunctionCall)."""

from __future__ import annotations

import json
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
    assert isinstance(m.train_yolo, modal.Function) and isinstance(m.train_vlm_lora, modal.Function)
    assert isinstance(m.volume, modal.Volume) and isinstance(m.vlm_image, modal.Image)
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

    def listdir(self, path, recursive=False):
        from modal.volume import FileEntry, FileEntryType

        found = (self.root / path).rglob("*") if recursive else (self.root / path).iterdir()
        return [FileEntry(path=str(f.relative_to(self.root)), mtime=0, size=0,
                          type=FileEntryType.FILE if f.is_file() else FileEntryType.DIRECTORY) for f in found]

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


def _annotated(tmp_path) -> "Path":
    from backend.media.fetch import MediaFetcher, MediaSettings
    from backend.training.vlm_examples import collect_annotations
    from tests.test_vlm_lora import CONFIG, annotated_tasks

    (tmp_path / "media").mkdir()
    tasks = annotated_tasks(tmp_path / "media", n=6)
    fetcher = MediaFetcher(MediaSettings(local_files_root=tmp_path / "media"))
    return collect_annotations(tasks, CONFIG, project_id=5, fetcher=fetcher, val_percent=50)


LORA = {"epochs": 2, "lr": 1e-2, "batch": 4, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}


def test_vlm_lora_body_runs_locally(tmp_path, monkeypatch, tiny_vlm):
    import infra.modal_app as m
    from backend.models.vlm.loader import load_vlm

    base = tiny_vlm("qwen2_5_vl")
    vol = tmp_path / "volume"
    monkeypatch.setenv("TANDEM_MODAL_VOLUME_ROOT", str(vol))
    annotated = _annotated(tmp_path)
    annotated.save(vol / "jobs/1/vlm-data")
    shutil.copytree(base, vol / "jobs/1/vlm-base/0")
    result = m.train_vlm_lora.local(annotations_path="jobs/1/vlm-data", chain=[{"vol": "jobs/1/vlm-base/0"}],
                                    base_source=str(base), run_name="job1", params=LORA)
    assert result["adapter_vol"] == "runs/job1/adapter" and result["snapshot"] == annotated.snapshot
    n_val = sum(i.validation for i in annotated.items)
    assert result["val"] == n_val and result["train"] == len(annotated.items) - n_val  # one example per control
    assert result["val_loss_after"] < result["val_loss_before"]
    adapter = vol / result["adapter_vol"]
    assert json.loads((adapter / "tandem_base.json").read_text())["base"] == str(base)  # the server's path
    assert load_vlm(str(adapter), device="cpu").version.startswith("adapter-")


def test_vlm_client_path_uploads_the_adapter_chain_and_downloads_the_new_adapter(tmp_path, monkeypatch, tiny_vlm):
    """A LoRA version stacked on a local base: both folders go up, the container re-points the copy, and the
    downloaded adapter loads here on the server's own paths."""
    import infra.modal_app as app_module
    from backend.models.vlm.loader import load_vlm
    from backend.training.vlm_examples import to_examples
    from backend.training.vlm_lora import lora_fine_tune
    from infra.modal_runner import train_vlm_on_modal

    base = str(tiny_vlm("qwen2_5_vl"))
    annotated = _annotated(tmp_path)
    vlm = load_vlm(base, device="cpu")
    data = to_examples(annotated, vlm)
    parent = tmp_path / "models" / "p5-job1-lora"
    lora_fine_tune(vlm, data.train, data.val, parent, base_source=base, params={**LORA, "epochs": 1}, log=lambda _: None)

    vol = tmp_path / "volume"
    vol.mkdir()
    for var, value in (("MODAL_TOKEN_ID", "ak-test"), ("MODAL_TOKEN_SECRET", "as-test"),
                       ("TANDEM_MODAL_VOLUME_ROOT", str(vol))):
        monkeypatch.setenv(var, value)
    calls = {}

    class FakeCall:
        object_id = "fc-vlm-1"

        def get(self, timeout=None):
            return calls["result"]

    class FakeFunction:
        def spawn(self, **kwargs):
            calls["kwargs"] = kwargs
            calls["result"] = app_module.train_vlm_lora.local(**kwargs)
            return FakeCall()

    monkeypatch.setattr(modal.Volume, "from_name", staticmethod(lambda name, **kw: FakeVolume(vol)))
    monkeypatch.setattr(modal.Function, "from_name", staticmethod(lambda app, fn, **kw: calls.setdefault("fn", fn)
                                                                  and FakeFunction()))
    monkeypatch.setattr(modal.FunctionCall, "from_id", staticmethod(lambda object_id, **kw: FakeCall()))
    store = JobStore(tmp_path / "db.sqlite3")
    job = store.create(5, "vlm", "modal", "test")
    target = tmp_path / "models" / "p5-job2-lora"
    lines = []
    result = train_vlm_on_modal(job, str(parent), annotated.save(tmp_path / "up"), target, LORA, None, lines.append,
                                store=store, poll_s=0.01)
    assert calls["fn"] == "train_vlm_lora"
    assert calls["kwargs"]["chain"] == [{"vol": f"jobs/{job.id}/vlm-base/0"}, {"vol": f"jobs/{job.id}/vlm-base/1"}]
    uploaded_parent = json.loads((vol / f"jobs/{job.id}/vlm-base/1/tandem_base.json").read_text())
    assert uploaded_parent["base"] == str(vol / f"jobs/{job.id}/vlm-base/0")  # re-pointed in the container
    assert json.loads((parent / "tandem_base.json").read_text())["base"] == base  # the local parent is untouched
    assert json.loads((target / "tandem_base.json").read_text())["base"] == str(parent)
    assert store.get(job.id).remote_id == "fc-vlm-1"
    assert result["val_loss_after"] < result["val_loss_before"]
    assert load_vlm(str(target), device="cpu").name == "p5-job2-lora"
    assert any("spawned tandem-train.train_vlm_lora" in line for line in lines)


def test_cancelling_a_modal_job_cancels_its_remote_call(tmp_path, monkeypatch):
    """A cancelled job must not leave an H100 busy for hours: the Modal call behind it is cancelled too."""
    from backend.training.runner import LocalRunner

    cancelled = []

    class FakeCall:
        def cancel(self, terminate_containers=False):
            cancelled.append(True)

    monkeypatch.setattr(modal.FunctionCall, "from_id", staticmethod(lambda object_id, **kw: cancelled.append(object_id)
                                                                    or FakeCall()))
    store = JobStore(tmp_path / "db.sqlite3")
    job = store.create(1, "vlm", "modal", "test")
    store.update(job.id, status="running", remote_id="fc-remote-7")
    runner = LocalRunner(Settings(home=tmp_path / "home"), store)
    assert runner.cancel(job.id)
    assert cancelled == ["fc-remote-7", True] and store.get(job.id).status.value == "cancelled"
    runner.close()

    from typer.testing import CliRunner

    from backend.cli import app

    cancelled.clear()  # `tandem jobs cancel`, from another process than the one that started the job: the same
    home = tmp_path / "cli-home"
    store = JobStore(Settings(home=home).database_url)
    job = store.create(1, "yolo", "modal", "test")
    store.update(job.id, status="running", remote_id="fc-remote-8")
    out = CliRunner().invoke(app, ["jobs", "cancel", str(job.id), "--home", str(home)])
    assert out.exit_code == 0, out.output
    assert cancelled == ["fc-remote-8", True] and store.get(job.id).status.value == "cancelled"


def test_fine_tune_keeps_the_stock_trainer_for_other_model_families(detect_weights):
    from ultralytics import YOLO

    from backend.training.yolo_finetune import _fine_tune_trainer

    assert _fine_tune_trainer(YOLO(str(detect_weights))).__name__ == "TandemDetectionTrainer"
    from ultralytics import RTDETR

    assert _fine_tune_trainer(RTDETR("rtdetr-l.yaml")) is None  # RT-DETR trains with its own trainer and loss
    from backend.training import yolo_finetune

    assert not hasattr(yolo_finetune, "DetectionTrainer")  # only Tandem* names are built
