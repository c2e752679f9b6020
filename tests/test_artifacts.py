"""The artifact store: weights, adapters and job logs by address, on a local folder or any fsspec URL.

Two roots are exercised for real: a local folder (the default, TANDEM_HOME/artifacts) and fsspec's in-memory
file system (`memory://`, standing in for `s3://` and the like: the same fsspec calls, no network). A replica
with another TANDEM_HOME finds a promotion in the shared database, fetches the weights through the store and
hot-swaps them; it reads the log of a job another replica ran.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import fsspec
import pytest

from backend.registry import Registry
from backend.serving import ModelHolder
from backend.settings import Settings
from backend.storage.artifacts import ArtifactStore, exists, local_path, localise, read_text
from backend.training.jobs import JobStatus, JobStore
from backend.training.runner import LocalRunner, job_log, log_path
from backend.training.service import TrainingService


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


def test_a_home_with_a_space_keeps_its_artifacts_inside_it(tmp_path):
    """The local root is kept as a file:// URL, which spells a space %20: read back as it is, the store wrote
    beside the home, into a new folder literally named "my%20home"."""
    home = tmp_path / "my home"
    store = ArtifactStore.from_settings(Settings(home=home))
    uri = store.write_text("line\n", "jobs", 3, "log.txt")
    assert uri == str(home.resolve() / "artifacts" / "jobs" / "3" / "log.txt") and read_text(uri) == "line\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my home"]
    assert localise(Settings(home=home), (home / "w.pt").as_uri()) == str(home / "w.pt")


def test_a_copy_that_fails_half_way_leaves_no_partial_file(tmp_path):
    """A full disk (here a file-size limit, as `ulimit -f`) fails the put, and the half copy is removed: the
    store's disk does not stay full of it."""
    import subprocess

    src = tmp_path / "big.pt"
    src.write_bytes(b"w" * 200_000)
    code = ("import resource, signal, sys; from pathlib import Path; "
            "from backend.settings import Settings; from backend.storage.artifacts import ArtifactStore; "
            "store = ArtifactStore.from_settings(Settings(home=Path(sys.argv[1]))); "
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000)); "
            "store.put(Path(sys.argv[2]), 'models', 'versions', 'p1-job16.pt')")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "home"), str(src)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "File too large" in proc.stderr, proc.stderr
    folder = tmp_path / "home" / "artifacts" / "models" / "versions"
    assert folder.is_dir() and list(folder.iterdir()) == []  # neither the half copy nor a half file in place


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
    fetched.write_bytes(b"remote-wei")  # cut short in the cache (a full disk, a copy killed): fetched again
    assert store.local_path(uri) == fetched and fetched.read_bytes() == b"remote-weights"
    fsspec.filesystem("memory").rm(uri[len("memory://"):])
    assert not exists(uri) and store.local_path(uri) == fetched  # cached: not fetched again
    assert fetched.read_bytes() == b"remote-weights"  # nor asked about: the store is not needed for a cached file
    assert localise(settings, str(src)) == str(src) and localise(settings, "yolov8n.pt") == "yolov8n.pt"

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(b"lora")
    folder_uri = store.put(folder, "models", "vlm", "p2-lora")
    got = store.local_path(folder_uri)
    assert sorted(p.name for p in got.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fsspec.filesystem("memory").rm(folder_uri[len("memory://"):], recursive=True)
    assert store.local_path(folder_uri) == got  # a cached folder is used as it is
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


def _export(root, labels: dict[str, str]):
    """A small exported dataset as the job writes it: images named by their pixels' digest, YOLO label files."""
    from PIL import Image

    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    for i, (stem, text) in enumerate(labels.items()):
        split = "val" if i == 0 else "train"
        Image.new("RGB", (32, 24), (i * 40, 10, 200)).save(root / "images" / split / f"{stem}.png")
        (root / "labels" / split / f"{stem}.txt").write_text(text)
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: \"a\"\n")
    (root / "tandem_export.json").write_text('{"classes": ["a"]}')
    return root


@pytest.mark.parametrize("remote", [False, True], ids=["local-root", "memory-root"])
def test_a_dataset_is_stored_once_per_content_and_unpacked_on_another_replica(tmp_path, memory_root, remote):
    from backend.storage.artifacts import fetch_dataset

    artifacts = memory_root if remote else str(tmp_path / "shared-artifacts")
    a = ArtifactStore.from_settings(Settings(home=tmp_path / "a", artifacts=artifacts))
    root = _export(tmp_path / "a" / "jobs" / "1" / "dataset",
                   {"task1_aa": "0 0.5 0.5 0.1 0.1\n", "task2_bb": "0 0.2 0.2 0.1 0.1\n", "task3_cc": ""})
    uri = a.put_dataset(root, 4, "0123abcd")
    assert uri.startswith(f"{memory_root}/datasets/p4/0123abcd-" if remote
                          else str((tmp_path / "shared-artifacts" / "datasets" / "p4").resolve()) + "/0123abcd-")
    assert uri.endswith(".tar") and exists(uri)
    assert a.put_dataset(root, 4, "0123abcd") == uri  # the same files again: the same archive
    copy = _export(tmp_path / "a" / "jobs" / "2" / "dataset",
                   {"task1_aa": "0 0.5 0.5 0.1 0.1\n", "task2_bb": "0 0.2 0.2 0.1 0.1\n", "task3_cc": ""})
    assert a.put_dataset(copy, 4, "0123abcd") == uri  # another job's export of the same snapshot: stored once
    (copy / "labels" / "train" / "task2_bb.txt").write_text("0 0.3 0.3 0.1 0.1\n")  # edited under the same ids
    edited = a.put_dataset(copy, 4, "0123abcd")
    assert edited != uri and exists(uri) and exists(edited)

    b_cache = tmp_path / "b" / "cache" / "datasets"  # replica B: its own home, the same store
    shutil.rmtree(tmp_path / "a" / "jobs")  # and replica A's work folder is gone too
    got = fetch_dataset(uri, b_cache)
    assert got.is_relative_to(b_cache)
    files = sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file())
    assert files == ["data.yaml", "images/train/task2_bb.png", "images/train/task3_cc.png", "images/val/task1_aa.png",
                     "labels/train/task2_bb.txt", "labels/train/task3_cc.txt", "labels/val/task1_aa.txt",
                     "tandem_export.json"]
    assert (got / "labels" / "train" / "task2_bb.txt").read_text() == "0 0.2 0.2 0.1 0.1\n"
    assert (got / "data.yaml").read_text().startswith(f"path: {got}\n")  # names where it now is
    assert fetch_dataset(uri, b_cache) == got  # unpacked once
    assert (fetch_dataset(edited, b_cache) / "labels" / "train" / "task2_bb.txt").read_text() == "0 0.3 0.3 0.1 0.1\n"
    assert not [p for p in b_cache.iterdir() if ".part-" in p.name]
    with pytest.raises(FileNotFoundError, match="no dataset archive"):
        fetch_dataset(uri.replace("0123abcd", "ffff0000"), b_cache)
    with pytest.raises(ValueError, match="plain hex id"):
        a.put_dataset(got, 4, "../x")


def test_a_dataset_archive_cannot_write_outside_its_folder(tmp_path):
    import io
    import tarfile

    from backend.storage.artifacts import fetch_dataset

    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(tarfile.TarError):
        fetch_dataset(str(archive), tmp_path / "cache" / "datasets")
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not list((tmp_path / "cache" / "datasets").iterdir())  # nothing half-unpacked left behind


def test_a_running_jobs_log_reaches_another_replica_while_it_runs(tmp_path, memory_root):
    db = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    a = Settings(home=tmp_path / "a", db_url=db, artifacts=memory_root)
    b = Settings(home=tmp_path / "b", db_url=db, artifacts=memory_root)
    store = JobStore(a.database_url)
    script = "import time; print('epoch 1/3', flush=True); time.sleep(2); print('epoch 2/3', flush=True); time.sleep(60)"
    runner = LocalRunner(a, store, worker_argv=[sys.executable, "-c", script])
    runner.log_every_s = 0.2
    try:
        job = store.create(1, "yolo", "local", "test")
        runner.start(job)
        deadline = time.monotonic() + 20
        while "epoch 2/3" not in job_log(b, job.id) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store.get(job.id).status.active  # still running
        assert not log_path(b.home, job.id).exists()
        assert job_log(b, job.id).splitlines()[-2:] == ["epoch 1/3", "epoch 2/3"]  # B reads A's copy, as it grows
        assert runner.cancel(job.id)
    finally:
        runner.close()


def test_a_worker_that_cannot_start_fails_its_job_with_the_reason(tmp_path):
    """Its folder cannot be made (here TANDEM_HOME/jobs is a file; a read-only or full disk does the same): the
    job fails saying why, instead of staying queued under a lease its runner renewed for good."""
    settings = Settings(home=tmp_path / "home")
    store = JobStore(settings.database_url)
    (settings.home / "jobs").write_text("not a folder")
    runner = LocalRunner(settings, store, worker_argv=[sys.executable, "-c", "raise SystemExit(0)"])
    try:
        job = store.create(1, "yolo", "local", "test")
        assert runner.start(job) is None
        failed = store.get(job.id)
        assert failed.status is JobStatus.FAILED and "its worker could not start" in failed.error
        assert f"(is {settings.home / 'jobs'} writable, with room?)" in failed.error  # the folder that refused
        again = store.create(1, "yolo", "local", "after")  # the project's slot is free for the next job
        assert again.status is JobStatus.QUEUED
    finally:
        runner.close()
    proc = subprocess.run([sys.executable, "-m", "backend.cli", "train", "--project", "2"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "TANDEM_HOME": str(settings.home)})
    said = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0 and "could not start (local)" in said and "started (local)" not in said, said


def test_a_store_that_refuses_a_log_is_said_once_per_job_without_a_traceback(tmp_path, caplog):
    """The log is copied every few seconds while a job runs: a store that refuses it (full, read-only) was a
    traceback at ERROR each time."""
    from backend.training.runner import publish_log

    blocked = tmp_path / "root"
    blocked.write_text("a file where the store's folder should be")
    store = ArtifactStore(blocked, tmp_path / "cache")
    log = tmp_path / "log.txt"
    with caplog.at_level("WARNING", logger="tandem"):
        for line in range(3):
            log.write_text(f"epoch {line}\n" * (line + 1))
            publish_log(store, log, 41, {})
    said = [r for r in caplog.records if "job 41" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "WARNING" and said[0].exc_info is None
    assert f"its log stays on this host, {log}" in said[0].getMessage()
