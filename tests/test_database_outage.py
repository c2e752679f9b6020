"""PostgreSQL stops while the server runs (a real cluster, stopped and started again): /predict goes on serving
from the models in memory, what needs the database answers 503 in one line, the log says so once (no traceback
per request or per second), and everything works again when the database is back, without a restart."""

from __future__ import annotations

import logging
import os
import time
import subprocess
import sys

import httpx
import pytest

from backend.datasets.shapes import generate_samples
from backend.server.app import create_app
from backend.serving import ModelHolder
from backend.settings import Settings
from tests.harness import ServerThread
from tests.postgres import PostgresUnavailable, start_cluster
from tests.test_server import RECT, task


@pytest.fixture
def cluster():
    try:
        c = start_cluster()
    except PostgresUnavailable as e:
        pytest.skip(str(e))
    yield c
    c.stop()


def test_the_server_lives_through_a_database_outage(cluster, detect_adapter, tmp_path, caplog):
    root = tmp_path / "media"
    root.mkdir()
    names = []
    for image, sample in generate_samples(4, seed=515):
        image.save(root / f"{sample.name}.png")
        names.append(f"{sample.name}.png")
    url = cluster.create_database("outage")
    settings = Settings(home=tmp_path / "home", local_files_root=root, db_url=url)
    app = create_app(settings, ModelHolder(detect_adapter))
    caplog.set_level(logging.INFO)
    with ServerThread(app) as srv:
        assert httpx.post(f"{srv.url}/setup", json={"project": "5.1", "schema": RECT}).status_code == 200
        first = httpx.post(f"{srv.url}/predict", json={"project": "5.1", "label_config": RECT,
                                                       "tasks": [task(1, names[0])]}, timeout=60)
        assert first.status_code == 200 and first.json()["results"][0]["result"]

        cluster.pause()
        caplog.clear()
        for i, name in enumerate(names, start=1):  # a task stored before the outage, and new ones
            r = httpx.post(f"{srv.url}/predict", json={"project": "5.1", "label_config": RECT,
                                                       "tasks": [task(i, name)]}, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["results"][0]["model_version"] == detect_adapter.version
        setup = httpx.post(f"{srv.url}/setup", json={"project": "5.1", "schema": RECT})  # Label Studio calls it often
        assert setup.status_code == 200 and setup.json()["model_version"] == detect_adapter.version
        health = httpx.get(f"{srv.url}/health?project=5").json()
        assert health["ready"] and health["model_version"] == detect_adapter.version
        hook = httpx.post(f"{srv.url}/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 5}})
        assert hook.status_code == 503
        detail = hook.json()["detail"]
        assert "did not answer" in detail and "\n" not in detail and "TANDEM_DATABASE_URL" in detail
        jobs = httpx.get(f"{srv.url}/jobs")
        assert jobs.status_code == 503
        time.sleep(6)  # the job reaper and the version watcher go round every 0.5-2 s meanwhile
        text = caplog.text
        assert "Traceback" not in text and not any(r.exc_info for r in caplog.records)
        said = [r for r in caplog.records if "did not answer" in r.getMessage()]
        assert 1 <= len(said) <= 6, [r.getMessage() for r in said]  # once per kind of work, not per request
        reaper = [r.getMessage() for r in caplog.records if r.getMessage().startswith("job reaper")]
        assert len(reaper) <= 1 and "answers again" not in text, reaper  # no flapping while it is down

        cluster.resume()
        deadline = time.monotonic() + 30
        while "job reaper: the database answers again" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "job reaper: the database answers again" in caplog.text
        r = httpx.post(f"{srv.url}/predict", json={"project": "5.1", "label_config": RECT,
                                                   "tasks": [task(9, names[1])]}, timeout=60)
        assert r.status_code == 200
        hook = httpx.post(f"{srv.url}/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 5}})
        assert hook.status_code == 200
        app.state.store.flush()
        assert app.state.store.count(project_id=5) >= 2  # stored again (task 1 before, task 9 after)


def test_the_cli_says_the_database_is_down_in_one_line_without_its_password(tmp_path):
    env = {**os.environ, "TANDEM_HOME": str(tmp_path / "home"),
           "TANDEM_DATABASE_URL": "postgresql://tandem:s3cret-pw@127.0.0.1:9/tandem"}  # port 9: nothing listens
    for command in (["jobs", "list"], ["models", "list"], ["jobs", "logs", "3"]):
        proc = subprocess.run([sys.executable, "-m", "backend.cli", *command], capture_output=True, text=True,
                              env=env, timeout=120)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2, out
        assert "did not answer" in out and "127.0.0.1:9" in out and "Traceback" not in out
        assert "s3cret-pw" not in out and len(out.strip().splitlines()) <= 4, out


def test_a_sqlite_file_made_writable_again_is_written_without_a_restart(tmp_path):
    """A server started on a file it may not write (restored with the wrong owner, an immutable flag) opens it
    read-only, and SQLite keeps such connections read-only: once the file is mended, the next write reopens it
    instead of failing until a restart. chattr +i stands in for the permission (root ignores file modes)."""
    import shutil

    import backend.storage.db as db
    from backend.training.jobs import JobStore

    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    path = tmp_path / "tandem.sqlite3"
    url = f"sqlite:///{path}"
    JobStore(url).counts()  # the schema, made while writable
    db._engines.pop(db.normalise_url(url)).dispose()  # as a server started afterwards
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not permitted here")
    try:
        store = JobStore(url)
        with pytest.raises(Exception, match="readonly database") as refused:
            store.create(1, "cnn", "local", "webhook")
        assert "is not writable: check the permissions" in db.unavailable(refused.value, url)  # what a 503 says
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    job = store.create(1, "cnn", "local", "webhook")  # the same store, the same process: no restart
    assert store.get(job.id).reason == "webhook"
    db._engines.pop(db.normalise_url(url)).dispose()


def test_a_server_starts_on_an_sqlite_file_it_may_not_write_and_records_its_model_once_it_can(
        tmp_path, detect_adapter, caplog):
    """The served version is registered at start; a read-only file (restored with the wrong owner, an
    immutable flag) used to stop `tandem serve` there. It serves, says so, and registers the version once the
    file is mended, without a restart."""
    import shutil

    from backend.registry import Registry

    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    import backend.storage.db as db

    settings = Settings(home=tmp_path / "home")
    registry = Registry(settings.database_url)
    assert registry.versions() == []
    db._engines.pop(db.normalise_url(settings.database_url)).dispose()  # as a server started afterwards
    db_file = tmp_path / "home" / "tandem.sqlite3"
    if subprocess.run(["chattr", "+i", str(db_file)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not permitted here")
    try:
        with caplog.at_level("WARNING", logger="tandem"):
            app = create_app(settings, ModelHolder(detect_adapter))
        assert app is not None
        said = " ".join(caplog.text.split())
        assert f"serving {detect_adapter.version}, but the database does not record it yet" in said
        assert "not writable" in said
    finally:
        subprocess.run(["chattr", "-i", str(db_file)], check=True)
    deadline = time.monotonic() + 30
    while not registry.versions():
        assert time.monotonic() < deadline, "the served version was never recorded"
        time.sleep(0.5)
    assert [v.version for v in registry.versions()] == [detect_adapter.version]
