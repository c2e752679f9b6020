"""The artifact store: weights, adapters and job logs by address, on a local folder or any fsspec URL.

Two roots are exercised for real: a local folder (the default, TANDEM_HOME/artifacts) and fsspec's in-memory
file system (`memory://`, standing in for `s3://` and the like: the same fsspec calls, no network). A replica
with another TANDEM_HOME finds a promotion in the shared database, fetches the weights through the store and
hot-swaps them; it reads the log of a job another replica ran.
"""

from __future__ import annotations

import shutil
import sys
import time
import uuid

import fsspec
import pytest

from backend.registry import Registry
from backend.serving import ModelHolder
from backend.settings import Settings
from backend.storage.artifacts import ArtifactStore, exists, local_path, localise, read_text
from backend.training.jobs import JobStatus, JobStore
from backend.training.runner import LocalRunner, job_log, log_path
from backend.training.service import TrainingService


@pytest.fixture
def memory_root():
    root = f"memory://tandem-{uuid.uuid4().hex[:8]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root[len("memory://"):]):
        fs.rm(root[len("memory://"):], recursive=True)


def test_a_local_root_keeps_plain_paths_and_writes_whole_files(tmp_path):
    store = ArtifactStore.from_settings(Settings(home=tmp_path / "home"))
    assert store.local_root == (tmp_path / "home" / "artifacts").resolve()  # the default root
    src = tmp_path / "w.pt"
    src.write_bytes(b"weights-1")
    uri = store.put(src, "models", "versions", "p1-job1.pt")
    assert uri == str(store.local_root / "models" / "versions" / "p1-job1.pt")  # what older tools read as is
    assert exists(uri) and local_path(uri, store.cache_dir).read_bytes() == b"weights-1"
    assert not list((store.local_root / "models" / "versions").glob("*.part-*"))  # no partial file left
    folder = tmp_path / "adapter"
    (folder / "sub").mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "sub" / "x.bin").write_bytes(b"x")
    dest = store.put(folder, "models", "vlm", "p1-lora")
    assert (store.local_root / "models" / "vlm" / "p1-lora" / "sub" / "x.bin").read_bytes() == b"x" and exists(dest)
    assert read_text(store.write_text("hello\n", "jobs", 3, "log.txt")) == "hello\n"
    assert read_text(store.uri("jobs", 4, "log.txt")) == ""  # none: empty, not an error
    assert store.put(uri, "models", "versions", "p1-job1.pt") == uri  # onto itself: left as it is
    with pytest.raises(ValueError, match="plain names"):
        store.uri("..", "etc", "passwd")
    with pytest.raises(FileNotFoundError, match="no file to store"):
        store.put(tmp_path / "missing.pt", "models", "x.pt")


def test_a_remote_root_gives_urls_fetched_once_into_a_local_cache(tmp_path, memory_root):
    settings = Settings(home=tmp_path / "home", artifacts=memory_root)
    store = ArtifactStore.from_settings(settings)
    assert store.local_root is None
    src = tmp_path / "w.pt"
    src.write_bytes(b"remote-weights")
    uri = store.put(src, "models", "versions", "p2-job7.pt")
    assert uri == f"{memory_root}/models/versions/p2-job7.pt" and exists(uri)
    fetched = store.local_path(uri)
    assert fetched.read_bytes() == b"remote-weights" and fetched.is_relative_to(tmp_path / "home" / "cache")
    assert localise(settings, uri) == str(fetched)
    fsspec.filesystem("memory").rm(uri[len("memory://"):])
    assert not exists(uri) and store.local_path(uri) == fetched  # cached: not fetched again
    assert localise(settings, str(src)) == str(src) and localise(settings, "yolov8n.pt") == "yolov8n.pt"

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(b"lora")
    got = store.local_path(store.put(folder, "models", "vlm", "p2-lora"))
    assert sorted(p.name for p in got.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (got / "adapter_config.json").read_text() == '{"r": 8}'
    assert read_text(store.write_text("line 1\nline 2\n", "jobs", 9, "log.txt")) == "line 1\nline 2\n"


def test_a_replica_serves_a_promotion_made_elsewhere_through_the_store(tmp_path, memory_root, detect_adapter,
                                                                      detect_weights):
    """Replica A's job registered weights by URL; replica B (its own home, the same database and artifact root)
    notices the promotion, fetches the file into its cache and hot-swaps it in."""
    db = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    a = Settings(home=tmp_path / "a", db_url=db, artifacts=memory_root)
    b = Settings(home=tmp_path / "b", db_url=db, artifacts=memory_root, engine="torch", device="cpu")
    uri = ArtifactStore.from_settings(a).put(detect_weights, "models", "versions", "p0-job1.pt")
    registry = Registry(a.database_url)
    registry.record_served(detect_adapter.version, "start", "detect", str(detect_weights))
    holder = ModelHolder(detect_adapter)
    service = TrainingService(b, holder, Registry(b.database_url), watch_interval_s=0.2)
    try:
        registry.add_candidate("v-remote", "p0-job1", "detect", uri, detect_adapter.version, "ds", {})
        registry.set_status("v-remote", "promoted")
        assert registry.promoted("cnn")[0].version == "v-remote"  # the URL counts as present
        deadline = time.monotonic() + 120
        while holder.adapter is detect_adapter and time.monotonic() < deadline:
            time.sleep(0.2)
        served = holder.adapter
        assert served is not detect_adapter and holder.error is None
        assert served.path.is_relative_to(tmp_path / "b" / "cache" / "artifacts")  # fetched by replica B
        assert served.path.read_bytes() == detect_weights.read_bytes()
    finally:
        service.close()


def test_a_job_log_is_kept_in_the_store_and_read_by_another_replica(tmp_path, memory_root):
    db = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    a = Settings(home=tmp_path / "a", db_url=db, artifacts=memory_root)
    b = Settings(home=tmp_path / "b", db_url=db, artifacts=memory_root)
    store = JobStore(a.database_url)
    runner = LocalRunner(a, store, worker_argv=[sys.executable, "-c", "print('epoch 1/1 done'); raise SystemExit(4)"])
    try:
        job = store.create(1, "yolo", "local", "test")
        runner.start(job)
        deadline = time.monotonic() + 20
        while store.get(job.id).status.active and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store.get(job.id).status is JobStatus.FAILED
        deadline = time.monotonic() + 10
        while not exists(f"{memory_root}/jobs/{job.id}/log.txt") and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        runner.close()
    assert "epoch 1/1 done" in job_log(a, job.id)  # its own host: the file
    assert not log_path(b.home, job.id).exists()
    assert "epoch 1/1 done" in job_log(b, job.id)  # another replica: the store's copy
    shutil.rmtree(a.home / "jobs")
    assert job_log(a, job.id, lines=1) == "epoch 1/1 done"
