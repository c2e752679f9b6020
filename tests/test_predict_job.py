"""Whole-project pre-annotation as a job, against a real Label Studio: bulk writes with the version, counts over
HTTP and /metrics, failed images counted with their reason, "Retrieve predictions" answered from the store,
resume after kill -9 with no task predicted twice, and memory bounded on large photos."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from label_studio_sdk import LabelStudio
from PIL import Image, ImageDraw

from backend.batch.records import PredictJobs
from backend.datasets.shapes import generate_samples
from backend.dev.local_label_studio import upload_images
from backend.server.app import create_app
from backend.serving import ModelHolder
from backend.settings import Settings
from backend.storage.predictions import PredictionRepo
from backend.training.runner import log_path
from tests.harness import ServerThread, png_bytes, until
from tests.test_server import RECT

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[1]


def _project(label_studio, title: str, n: int, extra: dict[str, bytes] | None = None, size=(320, 240)) -> int:
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = client.projects.create(title=title, label_config=RECT)
    files = {f"{s.name}.png": png_bytes(img) for img, s in generate_samples(n, seed=n, size=size)}
    upload_images(label_studio.url, label_studio.token, project.id, {**files, **(extra or {})})
    return project.id


def _ls_tasks(label_studio, project: int) -> list:
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    return list(client.tasks.list(project=project, page_size=500, fields="all"))


def _env(label_studio, home: Path) -> dict[str, str]:
    return {**os.environ, "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
            "TANDEM_HOME": str(home), "PYTHONPATH": str(REPO)}


def _predict_cmd(project: int, weights: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "backend.cli", "predict", "--project", str(project), "--model", str(weights),
            *extra]


def test_http_job_writes_in_bulk_counts_failures_and_retrieve_answers_from_the_store(
        label_studio, detect_weights, detect_adapter, tmp_path):
    n = 60  # 15 chunks of 4: long enough that a poll sees the counts part-way
    project = _project(label_studio, "predict job http", n, {"corrupt.png": b"definitely not a PNG"})
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    client.projects.import_tasks(project, request=[{"image": f"/data/upload/{project}/gone-404.png"}])
    settings = Settings(home=tmp_path / "home", label_studio_url=label_studio.url,
                        label_studio_api_key=label_studio.token)
    app = create_app(settings, ModelHolder(detect_adapter))  # with the job service: GET /jobs/{id} shows it too
    version = detect_adapter.version
    with ServerThread(app) as srv:
        started = httpx.post(f"{srv.url}/predict-jobs", json={"project": project, "model": str(detect_weights),
                                                               "batch": 4, "concurrency": 2}, timeout=30)
        assert started.status_code == 200, started.text
        job_id = started.json()["id"]
        again = httpx.post(f"{srv.url}/predict-jobs", json={"project": project, "model": str(detect_weights)})
        assert again.status_code == 409 and str(job_id) in again.json()["detail"]  # one job per project
        missing = httpx.post(f"{srv.url}/predict-jobs", json={"project": 99999, "model": str(detect_weights)})
        assert missing.status_code == 404 and "has no project 99999" in missing.text  # refused, not a failed job
        assert httpx.get(f"{srv.url}/predict-jobs", params={"project": 99999}).json() == []
        seen, deadline = [], time.monotonic() + 300
        while time.monotonic() < deadline:
            job = httpx.get(f"{srv.url}/predict-jobs/{job_id}").json()
            seen.append(job["progress"])
            if job["status"] not in ("queued", "running"):
                break
            time.sleep(0.2)
        assert job["status"] == "succeeded", job
        assert httpx.get(f"{srv.url}/jobs/{job_id}").json()["progress"] == job["progress"]  # one job store
        assert job["kind"] == "predict"
        logs = lambda: httpx.get(f"{srv.url}/jobs/{job_id}/logs").text  # noqa: E731 - its process's output
        assert until(lambda: f"predict job {job_id}: succeeded" in logs()), logs()
        stored = settings.home / "artifacts" / "jobs" / str(job_id) / "log.txt"  # what other replicas read
        assert until(lambda: stored.exists() and f"predict job {job_id}: succeeded" in stored.read_text())
        progress = job["progress"]
        assert (progress["total"], progress["done"], progress["failed"], progress["remaining"]) == (n + 2, n, 2, 0)
        assert progress["model_version"] == version and progress["predicted"] == progress["written"] == n
        reasons = " ".join(progress["failures"].values())
        assert "corrupt or not an image" in reasons and "gone-404.png" in reasons
        partial = [p for p in seen if p and 0 < p["done"] < n]
        assert partial and all(p["done"] + p["failed"] + p["remaining"] == n + 2 for p in partial)  # counts as it ran
        metrics = httpx.get(f"{srv.url}/metrics").text
        for state, value in (("done", n), ("failed", 2), ("remaining", 0)):
            assert f'tandem_predict_job_tasks{{job="{job_id}",project="{project}",state="{state}"}} {value}.0' in metrics

        tasks = _ls_tasks(label_studio, project)
        good = [t for t in tasks if t.total_predictions]
        assert len(good) == n and all(t.total_predictions == 1 and t.predictions_model_versions == version
                                       for t in good)
        assert any(r for t in good for r in t.predictions[0].result)  # real boxes, not empty results

        # "Retrieve predictions" as Label Studio sends it: one call with every task, answered from the store
        payload = {"tasks": [{"id": t.id, "data": t.data} for t in good],  # (failed ones would be tried again)
                   "label_config": client.projects.get(project).label_config,
                   "project": f"{project}.1700000000"}
        t0 = time.perf_counter()
        answer = httpx.post(f"{srv.url}/predict", json=payload, timeout=60).json()
        took = time.perf_counter() - t0
        by_id = {t.id: t for t in good}
        results = {t["id"]: item for t, item in zip(payload["tasks"], answer["results"], strict=True)}
        for tid, task in by_id.items():
            assert results[tid]["result"] == task.predictions[0].result  # what the job wrote, from the store
        assert app.state.tandem.predictor._seconds_per_task.get(version) is None  # no chunk was predicted
        assert took < 5

    rerun = subprocess.run(_predict_cmd(project, detect_weights), env=_env(label_studio, tmp_path / "home"),
                           capture_output=True, text=True, timeout=300, cwd=REPO)
    assert rerun.returncode == 0, rerun.stderr
    last = PredictJobs(settings.database_url).list(project)[0]
    assert last.id != job_id and last.progress["predicted"] == 0 and last.progress["done"] == n  # nothing again
    assert sum(t.total_predictions for t in _ls_tasks(label_studio, project)) == n
    # a job run from a shell leaves its own lines for `tandem jobs logs N` (its progress bar stays in the shell)
    logs = subprocess.run([sys.executable, "-m", "backend.cli", "jobs", "logs", str(last.id)],
                          env=_env(label_studio, tmp_path / "home"), capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert f"predict job {last.id} on project {project} started by `tandem predict` in a shell" in logs.stdout
    assert f"predict job {last.id}: succeeded; {n} of {n + 2} tasks have a" in logs.stdout, logs.stdout + logs.stderr
    assert "is corrupt or not an image" in logs.stdout and "[red]" not in logs.stdout  # the failures too, plain
    # and copied into the artifact store, where a replica with another home reads it (`GET /jobs/N/logs`)
    from backend.storage.artifacts import ArtifactStore, read_text

    stored = read_text(ArtifactStore.from_settings(settings).uri("jobs", last.id, "log.txt"))
    assert stored == log_path(settings.home, last.id).read_text() and f"predict job {last.id}: succeeded" in stored


def test_killed_job_resumes_and_predicts_no_task_twice(label_studio, detect_weights, tmp_path):
    n = 80
    project = _project(label_studio, "predict job resume", n)
    home = tmp_path / "home"
    env = _env(label_studio, home)
    store = PredictionRepo(Settings(home=home).database_url)
    proc = subprocess.Popen(_predict_cmd(project, detect_weights, "--batch", "4", "--concurrency", "2"), env=env,
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while store.count(project) < n * 0.4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stored_before = store.count(project)
    assert 0 < stored_before < n, "the kill came too late to test a resume"
    records = PredictJobs(Settings(home=home).database_url)
    killed = records.list(project)[0]
    assert killed.status == "running"  # nobody finished it: its lease (and its dead pid here) tell it is gone

    again = subprocess.run(_predict_cmd(project, detect_weights, "--batch", "4"), env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    job = records.get(killed.id)
    assert job.status == "succeeded" and len(records.list(project)) == 1  # the same job, taken over
    assert job.progress["predicted"] == n - stored_before  # only what the store lacked
    assert job.progress["done"] == n and job.progress["failed"] == 0
    assert store.count(project) == n
    tasks = _ls_tasks(label_studio, project)
    assert len(tasks) == n and all(t.total_predictions == 1 for t in tasks)  # none twice, none missing


def test_a_new_threshold_makes_stored_predictions_again_and_replaces_them_in_label_studio(
        label_studio, detect_weights, detect_adapter, tmp_path):
    """`TANDEM_CONF` changed: the job's ledger does not count items stored under the old threshold as done (as
    /predict does not serve them); each is made again, and Label Studio ends with one prediction per task, the
    new one, not two of the same version. A job with the project's own model sets its `model_version`."""
    n = 12
    project = _project(label_studio, "predict job new threshold", n)
    home = tmp_path / "home"
    store, records = PredictionRepo(Settings(home=home).database_url), PredictJobs(Settings(home=home).database_url)
    bind = [sys.executable, "-m", "backend.cli", "models", "bind", "--project", str(project), "--model",
            str(detect_weights)]
    assert subprocess.run(bind, env=_env(label_studio, home), cwd=REPO, capture_output=True, timeout=120).returncode == 0
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    assert client.projects.get(project).model_version != detect_adapter.version
    stamps: dict[str, str] = {}  # threshold -> the one stamp every stored row carries after a run under it
    for conf, predicted, redone in (("0.6", n, 0), ("0.05", n, n), ("0.05", 0, 0)):
        proc = subprocess.run([sys.executable, "-m", "backend.cli", "predict", "--project", str(project), "--batch",
                               "4"], env={**_env(label_studio, home), "TANDEM_CONF": conf}, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # the project's model: its version is the one Label Studio's score column and sorting count
        assert client.projects.get(project).model_version == detect_adapter.version
        job = max(records.list(project), key=lambda j: j.id)
        assert (job.progress["predicted"], job.progress["redone"]) == (predicted, redone), job.progress
        assert job.progress["done"] == n and job.progress["failed"] == 0
        (stamp,) = {r.made_with for r in store.for_project(project)}
        stamps[conf] = stamps.get(conf, stamp)
        assert stamp == stamps[conf] and None not in stamps.values()
        tasks = _ls_tasks(label_studio, project)
        assert all(t.total_predictions == 1 for t in tasks), [t.total_predictions for t in tasks]
        items = {r.task_id: r.item for r in store.for_project(project)}
        for t in tasks:  # what Label Studio shows is what the store holds
            assert len(t.predictions[0].result) == len(items[t.id]["result"])
        if redone:
            assert f"{n} of them were stored under other thresholds" in proc.stderr + proc.stdout
    assert stamps["0.6"] != stamps["0.05"]
    regions = [len(t.predictions[0].result) for t in _ls_tasks(label_studio, project)]
    assert sum(regions) > 0
    # rows an older Tandem stored (before migration 0004: no stamp) are kept as they are, and said; a run with
    # --redo-unstamped makes them again under today's threshold
    from backend.storage.db import engine_for
    from backend.storage.tables import predictions as stored_rows

    with engine_for(Settings(home=home).database_url).begin() as conn:
        conn.execute(stored_rows.update().where(stored_rows.c.project_id == project).values(made_with=None))
    for redo, predicted in ((False, 0), (True, n)):
        proc = subprocess.run([sys.executable, "-m", "backend.cli", "predict", "--project", str(project), "--batch",
                               "4", *(["--redo-unstamped"] if redo else [])],
                              env={**_env(label_studio, home), "TANDEM_CONF": "0.05"}, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        job = max(records.list(project), key=lambda j: j.id)
        said = " ".join((proc.stderr + proc.stdout).split())
        assert (job.progress["predicted"], job.progress["unstamped"]) == (predicted, 0 if redo else n), job.progress
        assert (f"{n} of them were stored by an older Tandem" in said) is not redo, said
        assert ({r.made_with for r in store.for_project(project)} == {stamps["0.05"]}) is redo
        assert all(t.total_predictions == 1 for t in _ls_tasks(label_studio, project))  # replaced, not added
    # a label map set since (same version, a new serving plan): every task is predicted again, and its new
    # prediction replaces the old one of this version instead of showing beside it
    proc = subprocess.run([sys.executable, "-m", "backend.cli", "predict", "--project", str(project), "--batch", "4"],
                          env={**_env(label_studio, home), "TANDEM_CONF": "0.05",
                               "TANDEM_LABEL_MAP": '{"square": "Square", "circle": "Circle"}'},
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = max(records.list(project), key=lambda j: j.id)
    assert job.progress["predicted"] == n, job.progress
    tasks = _ls_tasks(label_studio, project)
    assert all(t.total_predictions == 1 for t in tasks), [t.total_predictions for t in tasks]


def _photo(i: int) -> bytes:
    """A 4000x3000 JPEG with a few large shapes (about 200 KB; 36 MB once decoded)."""
    rng = np.random.default_rng(i)
    img = Image.new("RGB", (4000, 3000), tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(img)
    x, y = (int(v) for v in rng.integers(200, 2000, 2))
    draw.rectangle([x, y, x + 1200, y + 900], fill=(20, 200, 30))
    draw.ellipse([x + 1400, y, x + 2400, y + 1000], fill=(200, 20, 30))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=80)
    return out.getvalue()


def test_memory_stays_bounded_on_200_large_photos(label_studio, detect_weights, tmp_path):
    n = 200
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = client.projects.create(title="predict job memory", label_config=RECT).id
    upload_images(label_studio.url, label_studio.token, project, {f"photo{i}.jpg": _photo(i) for i in range(n)})
    home = tmp_path / "home"
    report = tmp_path / "maxrss"
    # the job in a child of a small wrapper, whose RUSAGE_CHILDREN is the job process's own peak RSS
    wrapper = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); "
               "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
               "sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", wrapper, str(report),
                           *_predict_cmd(project, detect_weights, "--batch", "4", "--concurrency", "2")],
                          env=_env(label_studio, home), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    peak_mb = int(report.read_text()) / 1024
    job = PredictJobs(Settings(home=home).database_url).list(project)[0]
    assert job.progress["done"] == n and job.progress["failed"] == 0
    print(f"\n{n} photos of 4000x3000 (36 MB each decoded, {n * 36 / 1024:.1f} GB together): job peak RSS "
          f"{peak_mb:.0f} MB")
    # measured 1,622 MB here (imports, the model, two chunks of 4 decoded photos and their letterboxed copies);
    # decoding the project would take 7 GB
    assert peak_mb < 2048


def test_modal_runner_fans_chunks_out_over_the_volume(label_studio, detect_weights, tmp_path, monkeypatch):
    """Modal's classes patched at their boundary (as tests/test_modal.py): the Volume is a folder and `.map()`
    runs the real function body (`.local()`, the GPU pipeline on the CPU) once per uploaded sub-chunk."""
    import modal

    import infra.modal_predict as mp
    from backend.batch.predict_job import JobOptions
    from backend.batch.runner import run_project
    from tests.conftest import assert_matches_truth, region_boxes
    from tests.test_modal import FakeVolume

    n = 12
    samples = generate_samples(n, seed=77, size=(320, 240))
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = client.projects.create(title="predict job modal", label_config=RECT).id
    upload_images(label_studio.url, label_studio.token, project, {f"{s.name}.png": png_bytes(img) for img, s in samples})
    vol_root = tmp_path / "volume"
    vol_root.mkdir()
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-test")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-test")
    monkeypatch.setenv("TANDEM_MODAL_VOLUME_ROOT", str(vol_root))
    mapped = []

    class FakeFunction:
        def map(self, dirs, kwargs=None):
            for folder in dirs:
                mapped.append(folder)
                yield mp.predict_images.local(folder, **(kwargs or {}))

    monkeypatch.setattr(modal.Volume, "from_name", staticmethod(lambda name, **kw: FakeVolume(vol_root)))
    monkeypatch.setattr(modal.Function, "from_name", staticmethod(lambda app, fn, **kw: FakeFunction()))
    monkeypatch.setattr(mp, "SUB_CHUNK", 4)
    settings = Settings(home=tmp_path / "home", label_studio_url=label_studio.url,
                        label_studio_api_key=label_studio.token)
    record, result = run_project(settings, project, model=str(detect_weights), runner="modal",
                                 options=JobOptions(batch=8, concurrency=2))
    assert record.status == "succeeded" and (result.done, result.failed, result.predicted) == (n, 0, n)
    assert len(mapped) == 3  # chunks of 8 and 4 tasks, in sub-chunks of at most 4 images: 2 + 1 GPU calls
    assert (vol_root / f"predict/{record.id}/weights.pt").is_file()
    truth = {f"{s.name}.png": s for _, s in samples}
    for task in _ls_tasks(label_studio, project):
        assert task.total_predictions == 1
        name = task.data["image"].rsplit("-", 1)[-1]
        xyxy, labels = region_boxes(task.predictions[0].result, 320, 240)
        assert_matches_truth(xyxy, labels, truth[name])


def test_the_modal_runner_without_credentials_is_refused_before_anything_loads(detect_weights, tmp_path):
    """No job is opened, no model loaded, and the fix names the app this runner uses."""
    import time as _time

    from backend.batch.records import PredictJobs

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    env.update(TANDEM_HOME=str(home), LABEL_STUDIO_URL="http://127.0.0.1:9", LABEL_STUDIO_API_KEY="k",
               MODAL_CONFIG_PATH=str(tmp_path / "no-modal.toml"))
    t0 = _time.perf_counter()
    proc = subprocess.run(_predict_cmd(3, detect_weights, "--runner", "modal"), env=env, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Modal credentials are missing" in out and "infra/modal_predict.py" in out, out
    assert "failed 0" not in out and "Traceback" not in out
    assert PredictJobs(Settings(home=home).database_url).store.list(3) == []
    assert _time.perf_counter() - t0 < 60  # no model load, no Label Studio call (its address answers nothing)


def test_a_job_on_a_project_that_does_not_exist_fails_in_one_line(label_studio, detect_weights, tmp_path):
    """`tandem predict` on a wrong project id says so in one line and leaves no failed job behind; a job that
    was already open (the server's, or `--job N`) records the failure, and its stored error (GET
    /predict-jobs/N shows it) is Label Studio's answer, never the SDK's text with the response headers and
    their session cookie; the CLI does not advise running it again."""
    from backend.batch.records import PredictJobs, new_holder_id

    home = tmp_path / "home"
    proc = subprocess.run(_predict_cmd(99999, detect_weights), env=_env(label_studio, home), capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Label Studio answered 404" in out and "run it again" not in out, out
    assert "failed 0" not in out  # no progress bar is drawn for a job that was never opened
    records = PredictJobs(Settings(home=home).database_url)
    assert records.store.list(99999) == []

    handed_by = new_holder_id()  # as POST /predict-jobs opens one for the process it starts
    opened = records.create(99999, "local", {"model": str(detect_weights)}, holder=handed_by)
    proc = subprocess.run(_predict_cmd(99999, detect_weights, "--job", str(opened.id)),
                          env={**_env(label_studio, home), "TANDEM_PREDICT_HANDED_BY": handed_by},
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Label Studio answered 404" in out and "run it again" not in out, out
    (job,) = records.store.list(99999)
    assert job.id == opened.id and job.status.value == "failed"
    assert "404" in job.error and "set-cookie" not in job.error and "sessionid" not in job.error, job.error
