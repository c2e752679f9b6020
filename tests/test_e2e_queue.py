"""The review queue on a real Label Studio: fields, saved views, sort order, labeled tasks leaving."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import httpx
import pytest
from label_studio_sdk import LabelStudio

from active_learning.pipeline import run_selection, write_queue
from active_learning.queue import LabelStudioQueue
from active_learning.selection import SelectionConfig, Strategy
from backend.datasets.shapes import generate_samples
from backend.dev.local_label_studio import upload_images
from backend.media.fetch import MediaFetcher, MediaSettings
from backend.server.app import create_app
from backend.serving import ModelHolder
from backend.settings import Settings
from tests.harness import ServerThread, png_bytes
from tests.test_server import RECT

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def _annotate(client: LabelStudio, task_id: int) -> None:
    client.annotations.create(id=task_id, result=[{
        "from_name": "label", "to_name": "image", "type": "rectanglelabels", "original_width": 320,
        "original_height": 240, "value": {"x": 10, "y": 10, "width": 20, "height": 20, "rotation": 0,
                                          "rectanglelabels": ["Square"]}}])


@pytest.fixture(scope="module")
def project(label_studio):
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    proj = client.projects.create(title="tandem e2e queue", label_config=RECT)
    items = generate_samples(14, seed=31337)
    upload_images(label_studio.url, label_studio.token, proj.id, {f"{s.name}.png": png_bytes(img) for img, s in items})
    tasks = list(client.tasks.list(project=proj.id, fields="all"))
    for t in tasks:  # extra keys a real project carries; the queue must not lose them
        client.tasks.update(id=str(t.id), data={**t.data, "site": f"camera-{t.id % 3}", "batch": 7})
    for t in tasks[:3]:
        _annotate(client, t.id)
    return client, proj.id, [t.id for t in tasks]


def _view_tasks(label_studio, view_id: int, project: int) -> list[dict]:
    r = httpx.get(f"{label_studio.url}/api/tasks", params={"project": project, "view": view_id, "fields": "all",
                                                           "page_size": 100},
                  headers={"Authorization": f"Token {label_studio.token}"})
    r.raise_for_status()
    return r.json()["tasks"]


def test_queue_fields_views_and_labeled_tasks(label_studio, project, detect_adapter, segment_adapter):
    client, pid, task_ids = project
    queue = LabelStudioQueue(client, pid)
    fetcher = MediaFetcher(MediaSettings(label_studio_url=label_studio.url, api_key=label_studio.token))
    config = SelectionConfig(strategy=Strategy.HYBRID, budget=6, control_fraction=0.2, seed=1)

    tasks = queue.tasks()
    outcome, table, ids = run_selection(tasks, queue.label_config(), fetcher, detect_adapter, config,
                                        second=segment_adapter)
    assert outcome.candidates == 11 and outcome.labeled == 3
    assert set(ids).isdisjoint(task_ids[:3])  # labeled tasks are never candidates
    assert len(outcome.entries) == 6 and sum(e.control for e in outcome.entries) == 1
    assert outcome.mode == "hybrid+k-center"
    write_queue(queue, outcome, tasks, run="r1")
    assert set(outcome.views) == {"Tandem: review queue", "Tandem: disagreements", "Tandem: uncertain"}

    by_id = {t["id"]: t for t in queue.tasks()}
    for e in outcome.entries:
        data = by_id[e.task_id]["data"]
        assert data["image"].startswith("/data/upload/") and data["batch"] == 7 and data["site"].startswith("camera-")
        assert data["tandem_rank"] == e.rank and data["tandem_reason"] == e.reason
        assert data["tandem_pick"] == ("control (random)" if e.control else "active")
        assert 0 <= data["tandem_disagreement"] <= 1
    unqueued = [t for i, t in by_id.items() if i not in {e.task_id for e in outcome.entries}]
    assert all("tandem_score" not in t["data"] and "image" in t["data"] for t in unqueued)

    listed = _view_tasks(label_studio, outcome.views["Tandem: disagreements"], pid)
    values = [t["data"]["tandem_disagreement"] for t in listed]
    assert len(listed) == 6 and values == sorted(values, reverse=True)
    ranks = [t["data"]["tandem_rank"] for t in _view_tasks(label_studio, outcome.views["Tandem: review queue"], pid)]
    assert ranks == sorted(ranks) == list(range(1, 7))

    # an annotator finishes the top task: it leaves the views at once, and its fields on the next run
    top = outcome.entries[0].task_id
    _annotate(client, top)
    assert top not in {t["id"] for t in _view_tasks(label_studio, outcome.views["Tandem: review queue"], pid)}
    tasks = queue.tasks()
    second_run, _, _ = run_selection(tasks, queue.label_config(), fetcher, detect_adapter, config, second=segment_adapter)
    write_queue(queue, second_run, tasks, run="r2")
    assert top not in {e.task_id for e in second_run.entries}
    assert second_run.views == outcome.views  # updated in place, not duplicated
    data = {t["id"]: t["data"] for t in queue.tasks()}
    assert not any(k.startswith("tandem_") for k in data[top]) and data[top]["batch"] == 7
    assert len(client.views.list(project=pid)) == 3


def test_cli_select_dry_run_writes_files_and_leaves_label_studio_alone(label_studio, project, detect_weights,
                                                                       segment_weights, tmp_path):
    client, pid, _ = project
    before = {t.id: dict(t.data) for t in client.tasks.list(project=pid, fields="all")}
    env = {**os.environ, "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
           "TANDEM_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, "-m", "backend.cli", "select", "--project", str(pid), "--budget", "4", "--strategy",
         "disagreement", "--model", str(detect_weights), "--second-model", str(segment_weights), "--dry-run",
         "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    said = " ".join(proc.stderr.split())
    assert "Top picks" in proc.stdout and "4 selected (dry run: Label Studio untouched) of" in said, said
    picks = list(csv.DictReader((tmp_path / "out" / "selection.csv").open()))
    assert len(picks) == 4
    summary = json.loads((tmp_path / "out" / "selection.json").read_text())
    assert summary["mode"].startswith("disagreement") and len(summary["entries"]) == 4
    scores = list(csv.DictReader((tmp_path / "out" / "scores.csv").open()))
    assert len(scores) == summary["candidates"]
    assert {t.id: dict(t.data) for t in client.tasks.list(project=pid, fields="all")} == before


def test_cli_select_ranks_without_a_served_second_opinion_that_cannot_fill_the_config(
        label_studio, project, detect_weights, classify_weights, tmp_path):
    """The second opinion the server served the project (here a classifier, for boxes) is skipped by the server
    for that project; `tandem select` warns and ranks without it instead of failing. Named with
    --second-model, its refusal is the answer."""
    from backend.storage.projects import ProjectRepo

    _, pid, _ = project
    home = tmp_path / "home"
    ProjectRepo(Settings(home=home).database_url).update(pid, served_second_opinion=str(classify_weights))
    env = {**os.environ, "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
           "TANDEM_HOME": str(home), "COLUMNS": "200"}
    base = [sys.executable, "-m", "backend.cli", "select", "--project", str(pid), "--budget", "3", "--model",
            str(detect_weights), "--dry-run", "--out", str(tmp_path / "out")]
    proc = subprocess.run(base, capture_output=True, text=True, env=env, timeout=300)
    said = " ".join(proc.stderr.split())
    assert proc.returncode == 0, said
    assert f"the second opinion {classify_weights} cannot fill project {pid}'s labeling config" in said, said
    assert "ranking without it" in said
    scores = list(csv.DictReader((tmp_path / "out" / "scores.csv").open()))
    assert scores and all(s["disagreement"] == "" for s in scores)
    named = subprocess.run([*base, "--second-model", str(classify_weights)], capture_output=True, text=True,
                           env=env, timeout=300)
    assert named.returncode == 2 and "error:" in named.stderr and "Traceback" not in named.stderr
    # uncertainty ranks without a second opinion: the served one is not even loaded (it once ran on every task)
    alone = subprocess.run([*base, "--strategy", "uncertainty"], capture_output=True, text=True, env=env, timeout=300)
    assert alone.returncode == 0 and str(classify_weights) not in alone.stderr, alone.stderr


def test_cli_select_unreachable_label_studio_is_a_clear_error(tmp_path, detect_weights):
    env = {**os.environ, "LABEL_STUDIO_URL": "http://127.0.0.1:9", "LABEL_STUDIO_API_KEY": "x",
           "TANDEM_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "backend.cli", "select", "--project", "1", "--model", str(detect_weights)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "cannot read project 1" in proc.stderr
    for command in ("accept", "report"):  # the same one line from the commands that read the project's evidence
        proc = subprocess.run([sys.executable, "-m", "backend.cli", command, "--project", "1"], capture_output=True,
                              text=True, env=env, timeout=120)
        said = " ".join(proc.stderr.split())
        assert proc.returncode == 2 and "cannot read project 1" in said and "Traceback" not in said, said


def test_cli_select_wrong_key_and_missing_second_opinion_are_clear(label_studio, project, tmp_path, detect_weights):
    _, pid, _ = project
    base = [sys.executable, "-m", "backend.cli", "select", "--project", str(pid), "--model", str(detect_weights)]
    env = {**os.environ, "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": "not-a-token",
           "TANDEM_HOME": str(tmp_path)}
    proc = subprocess.run(base, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Label Studio answered 401" in proc.stderr
    assert "warning" not in proc.stderr  # hybrid's no-second-model warning waits until the project is read
    assert "set-cookie" not in proc.stderr and "headers" not in proc.stderr
    proc = subprocess.run([*base, "--strategy", "disagreement"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "needs --second-model" in proc.stderr


def test_cli_select_refuses_a_model_that_cannot_fill_the_project(label_studio, project, tmp_path, classify_weights):
    """A classifier's doubt says nothing about a box project: refused as /setup refuses it, before any image."""
    _, pid, _ = project
    env = {**os.environ, "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
           "TANDEM_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "backend.cli", "select", "--project", str(pid), "--model",
                           str(classify_weights), "--dry-run", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120)
    said = " ".join(proc.stderr.split())  # rich wraps long lines
    assert proc.returncode == 2 and "cannot fill rectanglelabels" in said, said
    assert "tandem models bind --project ID --model WEIGHTS" in said and "tandem train-starter --task" in said, said
    assert f"tandem select used --model {classify_weights}: pass --model WEIGHTS made for this project" in said
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_cli_select_rejects_an_unknown_aggregate(tmp_path, detect_weights):
    proc = subprocess.run([sys.executable, "-m", "backend.cli", "select", "--project", "1", "--model", str(detect_weights),
                           "--aggregate", "median"], capture_output=True, text=True,
                          env={**os.environ, "TANDEM_HOME": str(tmp_path)}, timeout=120)
    assert proc.returncode == 2 and "--aggregate must be one of max, mean, capped_sum" in proc.stderr
    # refused before Label Studio is asked (none is configured here) and before any image is fetched
    for flags, words in ((["--budget", "0"], "budget must be at least 1"),  # the rest: test_al_selection
                         (["--weight-uncertainty", "0"], "needs --second-model")):
        proc = subprocess.run([sys.executable, "-m", "backend.cli", "select", "--project", "1", "--model",
                               str(detect_weights), *flags], capture_output=True, text=True,
                              env={**os.environ, "TANDEM_HOME": str(tmp_path)}, timeout=120)
        said = " ".join(proc.stderr.replace("│", " ").split())  # typer boxes and wraps the message
        assert proc.returncode == 2 and words in said and "Traceback" not in said, (flags, said)


def test_cli_select_takes_a_vlm_as_the_second_opinion(label_studio, project, detect_weights, tiny_vlm, tmp_path):
    client, pid, _ = project
    env = {**os.environ, "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
           "TANDEM_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, "-m", "backend.cli", "select", "--project", str(pid), "--budget", "3", "--strategy",
         "disagreement", "--model", str(detect_weights), "--second-model", str(tiny_vlm("grounding_dino")),
         "--aggregate", "max", "--dry-run", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "out" / "selection.json").read_text())
    assert summary["mode"].startswith("disagreement") and len(summary["entries"]) == 3
    scores = list(csv.DictReader((tmp_path / "out" / "scores.csv").open()))
    assert all(0.0 <= float(s["disagreement"]) <= 1.0 for s in scores)
    assert any("grounding_dino" in s["reason"] for s in scores)  # reasons name the VLM


def test_cli_select_reads_the_label_map_from_the_projects_ml_backend(label_studio, detect_adapter, detect_weights,
                                                                      tmp_path):
    """Labels that are not the model's class names, mapped in Label Studio's Model settings (extra params):
    select scores in those labels, as /setup serves them, instead of refusing the model."""
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    config = RECT.replace("Square", "Box").replace("Circle", "Ring").replace("Triangle", "Wedge")
    proj = client.projects.create(title="tandem e2e mapped labels", label_config=config)
    items = generate_samples(4, seed=404)
    upload_images(label_studio.url, label_studio.token, proj.id, {f"{s.name}.png": png_bytes(img) for img, s in items})
    extra = {"label_map": {"square": "Box", "circle": "Ring", "triangle": "Wedge"}}
    served = Settings(home=tmp_path / "srv", label_studio_url=label_studio.url, label_studio_api_key=label_studio.token)
    with ServerThread(create_app(served, ModelHolder(detect_adapter))) as srv:  # Label Studio checks it at connect
        client.ml.create(project=proj.id, url=srv.url, title="Tandem", is_interactive=False, extra_params=extra)

    env = {**os.environ, "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
           "TANDEM_HOME": str(tmp_path / "home")}
    env.pop("TANDEM_LABEL_MAP", None)
    proc = subprocess.run(
        [sys.executable, "-m", "backend.cli", "select", "--project", str(proj.id), "--budget", "2", "--model",
         str(detect_weights), "--dry-run", "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env,
        timeout=300)
    assert proc.returncode == 0, proc.stderr
    scores = list(csv.DictReader((tmp_path / "out" / "scores.csv").open()))
    assert len(scores) == 4
    assert not any(name in s["reason"] for s in scores for name in ("square", "circle", "triangle"))


def test_select_ranks_every_task_from_stored_predictions_with_the_images_gone(label_studio, detect_adapter,
                                                                                tiny_vlm, tmp_path):
    """Retrieve predictions with a second opinion configured, then delete the task images from Label Studio's
    media folder: `tandem select` still ranks every task, from what serving stored, and names both models."""
    import shutil
    from pathlib import Path

    from backend.models.vlm.loader import load_vlm

    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    proj = client.projects.create(title="tandem e2e stored predictions", label_config=RECT)
    items = generate_samples(8, seed=2026)
    upload_images(label_studio.url, label_studio.token, proj.id, {f"{s.name}.png": png_bytes(img) for img, s in items})
    vlm = load_vlm(str(tiny_vlm("grounding_dino")), device="cpu")
    settings = Settings(home=tmp_path / "home", label_studio_url=label_studio.url,
                        label_studio_api_key=label_studio.token)
    app = create_app(settings, ModelHolder(detect_adapter), training=False, vlm=ModelHolder(vlm))
    with ServerThread(app) as srv:
        client.ml.create(project=proj.id, url=srv.url, title="Tandem", is_interactive=False)
        client.actions.create(id="retrieve_tasks_predictions", project=proj.id,
                              selected_items={"all": True, "excluded": []})
        assert app.state.deferred.wait_idle(300)  # the second opinion runs in the background
        app.state.store.flush()
    stored = app.state.store.for_project(proj.id)
    assert {r.role for r in stored} == {"pre-annotation", "second-opinion"} and len(stored) == 16

    media = Path(label_studio.log_path).parent / "media" / "upload" / str(proj.id)
    removed = [f for f in media.iterdir() if f.is_file()]
    assert len(removed) == 8
    shutil.rmtree(media)
    task = next(iter(client.tasks.list(project=proj.id, fields="all")))
    gone = httpx.get(f"{label_studio.url}{task.data['image']}", headers={"Authorization": f"Token {label_studio.token}"})
    assert gone.status_code != 200  # Label Studio 1.23 answers 500 for a missing upload

    env = {**os.environ, "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
           "TANDEM_HOME": str(settings.home)}
    proc = subprocess.run(  # no --model, no --second-model: what served the project
        [sys.executable, "-m", "backend.cli", "select", "--project", str(proj.id), "--budget", "3", "--dry-run",
         "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    said = " ".join(proc.stderr.split())
    assert "8 ranked from stored predictions, 0 predicted now" in said and "skipped" not in said, said
    scores = list(csv.DictReader((tmp_path / "out" / "scores.csv").open()))
    assert len(scores) == 8 and all(s["disagreement"] != "" for s in scores)
    assert all("CNN" in s["reason"] and "grounding_dino" in s["reason"] for s in scores), scores
