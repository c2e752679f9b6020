"""The `tandem` command as a user runs it: a real subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx

from backend.errors import ModelLoadError
from backend.registry import Registry
from backend.serving import ModelHolder
from backend.settings import Settings
from tests.harness import free_port

TANDEM = [sys.executable, "-m", "backend.cli"]


def _env(tmp_path):
    return {**os.environ, "TANDEM_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}


def test_help_is_useful_on_its_own():
    out = subprocess.run([*TANDEM, "--help"], capture_output=True, text=True, check=True).stdout
    for word in ("serve", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "TANDEM_HOME"):
        assert word in out
    serve = subprocess.run([*TANDEM, "serve", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--model" in serve and "--port" in serve


def test_missing_weights_fail_at_start_with_a_clear_error(tmp_path):
    t0 = time.perf_counter()
    proc = subprocess.run([*TANDEM, "serve", "--model", str(tmp_path / "nope.pt"), "--port", str(free_port())],
                          capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert proc.returncode == 2
    assert "model weights not found" in proc.stderr
    proc = subprocess.run([*TANDEM, "serve", "--model", "yolov8n.pt", "--port", str(free_port())], capture_output=True,
                          text=True,
                          env={**_env(tmp_path), "YOLO_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 2 and "cannot be reached" in proc.stderr
    assert time.perf_counter() - t0 < 60  # two interpreter starts with torch imports, no network waits


def test_an_unavailable_vlm_fails_at_start_in_seconds(tmp_path):
    """The check runs before torch is imported: the whole command, interpreter start included, is quick."""
    env = {**_env(tmp_path), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-hf-cache")}
    t0 = time.perf_counter()
    proc = subprocess.run([*TANDEM, "serve", "--vlm", "google/owlv2-base-patch16-ensemble", "--port", str(free_port())],
                          capture_output=True,
                          text=True, env=env, timeout=120)
    took = time.perf_counter() - t0
    assert proc.returncode == 2 and "HF_HUB_OFFLINE=1" in proc.stderr and "hf download" in proc.stderr
    assert took < 10, took
    proc = subprocess.run([*TANDEM, "serve", "--vlm", str(tmp_path / "no-such-folder"), "--port", str(free_port())],
                          capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "no such model folder" in proc.stderr


def _wait_health(proc, port: int, deadline_s: float = 90) -> dict:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
        except httpx.HTTPError:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.5)


def test_serve_answers_label_studio_routes(tmp_path, detect_weights):
    port = free_port()
    proc = subprocess.Popen([*TANDEM, "serve", "--model", str(detect_weights), "--port", str(port)],
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        health = _wait_health(proc, port)
        assert health["ready"] and health["model_version"].startswith("shapes-yolov8n-detect-")
        versions = httpx.get(f"http://127.0.0.1:{port}/versions").json()["versions"]
        assert versions == [health["model_version"]]
    finally:
        proc.terminate()
        proc.wait(20)
    assert (tmp_path / "home" / "tandem.sqlite3").is_file()


def test_a_restart_without_model_serves_the_version_promoted_last(tmp_path, detect_weights):
    """Not the starter again: a retrain promoted before the restart is what Label Studio gets after it, and
    promoted weights that no longer load are passed over for the promotion before them."""
    registry = Registry(Settings(home=tmp_path / "home").database_url)
    good = tmp_path / "p1-job7.pt"
    good.write_bytes(detect_weights.read_bytes())
    registry.add_candidate("p1-job7-aaaa", "p1-job7", "detect", str(good), None, "d7", {})
    registry.set_status("p1-job7-aaaa", "promoted")
    time.sleep(0.01)
    bad = tmp_path / "p1-job8.pt"
    bad.write_bytes(b"\x80\x02 truncated checkpoint")
    registry.add_candidate("p1-job8-bbbb", "p1-job8", "detect", str(bad), "p1-job7-aaaa", "d8", {})
    registry.set_status("p1-job8-bbbb", "promoted")
    registry.add_candidate("p1-job9-cccc", "p1-job9", "detect", str(good), "p1-job7-aaaa", "d9", {})
    registry.set_status("p1-job9-cccc", "promoted")
    registry.set_status("p1-job9-cccc", "rejected")  # rolled back: never resumed
    port = free_port()
    proc = subprocess.Popen([*TANDEM, "serve", "--port", str(port), "--engine", "torch"], env=_env(tmp_path),
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        health = _wait_health(proc, port)
        assert health["model_version"].startswith("p1-job7-")
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    assert "cannot resume p1-job8-bbbb" in out and "resuming p1-job7-aaaa" in " ".join(out.split())
    assert "starter" not in out and "p1-job9" not in out


def test_other_yolo_weights_as_the_second_opinion_keep_the_cnn(tmp_path, detect_weights, segment_weights):
    """`--second-opinion other.pt` without --model: the version promoted last (else the starter) pre-annotates and
    the other YOLO is the second opinion (it used to become the only model, served as 'the vlm')."""
    from backend.cli.serve import default_pre_annotator

    assert default_pre_annotator(None, str(segment_weights)) is None
    assert default_pre_annotator(None, "IDEA-Research/grounding-dino-tiny") == "vlm"
    assert default_pre_annotator(str(detect_weights), "IDEA-Research/grounding-dino-tiny") is None
    assert default_pre_annotator(None, "yoloe-11s-seg.pt") == "vlm"  # open vocabulary: names any label
    # an explicit starter task asks for the starter CNN beside the VLM (README: YOLO-seg pre-annotates, SAM 3 second)
    assert default_pre_annotator(None, "facebook/sam3", "segment") is None
    registry = Registry(Settings(home=tmp_path / "home").database_url)
    good = tmp_path / "p1-job7.pt"
    good.write_bytes(detect_weights.read_bytes())
    registry.add_candidate("p1-job7-aaaa", "p1-job7", "detect", str(good), None, "d7", {})
    registry.set_status("p1-job7-aaaa", "promoted")
    port = free_port()
    proc = subprocess.Popen([*TANDEM, "serve", "--port", str(port), "--engine", "torch", "--second-opinion",
                             str(segment_weights)], env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        health = _wait_health(proc, port)
        assert health["model_version"].startswith("p1-job7-") and health["pre_annotator"] == "cnn", health
        assert health["second_opinion"] and health["second_opinion"] != health["model_version"], health
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    assert "receives the cnn's predictions, the other's are kept for disagreement" in " ".join(out.split()), out


def test_failed_reload_keeps_serving_the_last_good_model(detect_adapter):
    holder = ModelHolder(detect_adapter)

    def broken():
        raise ModelLoadError("cannot load YOLO weights new.pt: truncated")

    holder.load_in_background(broken).join()
    assert holder.adapter is detect_adapter and holder.ready
    assert "truncated" in holder.error
    assert holder.wait(0.1) is detect_adapter


def test_serve_with_a_vlm_beside_the_cnn(tmp_path, detect_weights, tiny_vlm):
    """`tandem serve --model cnn.pt --vlm DIR`: the CNN pre-annotates, the VLM loads in the background."""
    port = free_port()
    # --engine torch: the OpenVINO export a fresh TANDEM_HOME would do first is not what this test is about
    proc = subprocess.Popen([*TANDEM, "serve", "--model", str(detect_weights), "--vlm", str(tiny_vlm("clip")),
                             "--engine", "torch", "--port", str(port)], env={**_env(tmp_path), "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        health: dict = {}
        while not health.get("second_opinion"):
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else health
            time.sleep(0.5)
        assert health["pre_annotator"] == "cnn" and health["model_task"] == "detect"
        assert health["second_opinion"].startswith("clip-")
        versions = httpx.get(f"http://127.0.0.1:{port}/versions").json()["versions"]
        assert set(versions) == {health["model_version"], health["second_opinion"]}
    finally:
        proc.terminate()
        proc.wait(20)


def test_a_model_loaded_after_subscribing_is_announced(detect_adapter, classify_adapter):
    """The registry subscribes when the app starts; a model still loading then must reach it too."""
    holder = ModelHolder()
    seen = []
    holder.subscribe(seen.append)
    holder.load_in_background(lambda: detect_adapter).join()
    assert seen == [detect_adapter]
    late = []
    holder.subscribe(late.append)  # a subscriber after the load hears the current model at once
    holder.swap(classify_adapter)
    assert late == [detect_adapter, classify_adapter] and seen == [detect_adapter, classify_adapter]


def test_train_queues_a_vlm_lora_job(tmp_path):
    """`tandem train --model vlm` as the README shows it: a LoRA job with LoRA's own epochs (with a VLM to
    adapt: without one it is refused before a job opens, tests/test_training.py)."""
    from backend.training.jobs import JobStore
    from backend.training.runner import wait

    out = subprocess.run([*TANDEM, "train", "--project", "4", "--model", "vlm", "--no-wait"],
                         env={**_env(tmp_path), "TANDEM_VLM": str(tmp_path / "some-vlm")},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "job 1 started (local)" in out.stderr  # messages go to stderr, results to stdout
    store = JobStore(tmp_path / "home" / "tandem.sqlite3")
    job = store.get(1)
    assert job.model_kind == "vlm" and "epochs" not in job.params
    done = wait(store, 1, timeout=120)  # no Label Studio configured: it fails, with the reason
    assert "LABEL_STUDIO_URL" in done.error, done.error


def test_int8_without_calibration_images_fails_at_start(tmp_path):
    proc = subprocess.run([*TANDEM, "serve", "--engine", "int8", "--port", str(free_port())], capture_output=True,
                          text=True, env=_env(tmp_path), timeout=120)
    assert proc.returncode == 2 and "--calibration" in proc.stderr
    proc = subprocess.run([*TANDEM, "serve", "--engine", "int8", "--calibration", str(tmp_path / "none"), "--port",
                           str(free_port())],
                          capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert proc.returncode == 2 and "none" in proc.stderr


def test_a_busy_port_fails_before_the_model_loads(tmp_path, detect_weights):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([*TANDEM, "serve", "--model", str(detect_weights), "--port", str(port)],
                              capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert proc.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "CNN " not in proc.stderr  # refused before the model was loaded


def test_logs_of_a_job_that_does_not_exist_is_an_error(tmp_path):
    proc = subprocess.run([*TANDEM, "jobs", "logs", "99"], capture_output=True, text=True, env=_env(tmp_path),
                          timeout=120)
    assert proc.returncode == 2 and "no job 99" in proc.stderr


def test_logs_of_a_job_that_never_wrote_one_say_so(tmp_path):
    """A queued job, or one another replica ran before logs were stored: not a blank line and exit 0 in silence."""
    from backend.training.jobs import JobStore

    home = tmp_path / "home"
    store = JobStore(Settings(home=home).database_url)
    job = store.create(4, "detect", "local", "test", kind="predict", holder="elsewhere:1:ab", lease_s=60)
    proc = subprocess.run([*TANDEM, "jobs", "logs", str(job.id)], capture_output=True, text=True,
                          env=_env(tmp_path), timeout=120)
    said = " ".join(proc.stderr.split())
    assert proc.returncode == 0 and f"job {job.id} has no log here" in said and "artifact store" in said, said
    assert f"tandem jobs show {job.id}" in said and proc.stdout.strip() == ""
    # and when its lease runs out, the advice is the predict job's own command, not `tandem train`
    assert store.claim(job.id, "elsewhere:1:ab", lease_s=60) and store.start(job.id)
    (expired,) = store.expire_leases(now=time.time() + 120)
    assert "`tandem predict --project 4` goes on where it stopped" in expired.error and "tandem train" not in expired.error


def test_a_bad_option_value_is_one_line_before_any_model_loads(tmp_path):
    port = str(free_port())
    for args in (["serve", "--engine", "bogus", "--port", port], ["serve", "--conf", "2", "--port", port],
                 ["jobs", "list"]):
        env = {**_env(tmp_path), **({"TANDEM_CONF": "x"} if args[0] == "jobs" else {})}
        out = subprocess.run([*TANDEM, *args], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and out.stderr.startswith("error: invalid "), out.stderr
        assert "Traceback" not in out.stderr and not (tmp_path / "home" / "models").exists()


def test_job_logs_keep_tandems_own_lines_ahead_of_the_tail():
    """ultralytics' progress would push the export, split and replay lines out of the last N lines."""
    from backend.cli.jobs import with_own_lines

    log = "\n".join(["[tandem 10:00:00] exporting 26 annotated tasks", "Ultralytics 8.4", *(f"epoch {i}" for i in range(50)),
                     "[tandem 10:00:09] dataset: 20 train / 6 frozen val", *(f"epoch {i}" for i in range(50, 60)),
                     "[tandem 10:01:00] candidate 0.71 vs 0.69: promoted"])
    out = with_own_lines(log, 3).splitlines()
    assert out == ["[tandem 10:00:00] exporting 26 annotated tasks", "[tandem 10:00:09] dataset: 20 train / 6 frozen val",
                   "… 59 lines of training output left out (--lines 0 shows the whole log)", "epoch 58", "epoch 59",
                   "[tandem 10:01:00] candidate 0.71 vs 0.69: promoted"]
    assert with_own_lines(log, 0) == log and with_own_lines(log, 1000) == log


def test_models_bind_says_when_the_project_never_connected(tmp_path, detect_weights):
    """Binding before connecting is allowed, but a mistyped id must not pass unnoticed."""
    from backend.storage.projects import ProjectRepo

    env = _env(tmp_path)
    bind = [*TANDEM, "models", "bind", "--project", "99", "--model", str(detect_weights)]
    proc = subprocess.run(bind, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "project 99 has not connected to a server with this database yet" in proc.stderr
    assert f"project 99 bound: model={detect_weights.resolve()}" in proc.stderr
    # the file was checked with PyTorch: no OpenVINO export (its cache, its screens of output) just to check it
    assert not (tmp_path / "home" / "cache" / "openvino").exists() and "OpenVINO" not in proc.stdout + proc.stderr
    ProjectRepo(Settings(home=tmp_path / "home").database_url).update(  # as /setup records it
        7, label_config="<View/>", label_map={"square": "Würfel, rot"})
    proc = subprocess.run([*TANDEM, "models", "bind", "--project", "7", "--pre-annotator", "cnn"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "has not connected" not in proc.stderr, proc.stderr
    shown = subprocess.run([*TANDEM, "models", "bind", "--project", "98"], capture_output=True, text=True, env=env,
                           timeout=120)
    assert shown.returncode == 0 and "project 98 has not connected" in shown.stderr
    shown = subprocess.run([*TANDEM, "models", "bind", "--project", "7"], capture_output=True, text=True, env=env,
                           timeout=120)  # shown as binding said it: no "None" where the server's default applies
    assert "project 7: model=server default second_opinion=server default pre_annotator=cnn" in shown.stdout
    assert 'label_map (extra params): {"square": "Würfel, rot"}' in shown.stdout  # the other half of what it serves


def test_models_bind_refuses_weights_that_do_not_load(tmp_path, detect_weights):
    """A 0-byte or foreign file, or a folder without a model, is refused with the loader's reason and binds
    nothing; a server would otherwise fall back to its defaults in a log line nobody reads."""
    from backend.storage.projects import ProjectRepo

    env = _env(tmp_path)
    empty, foreign, folder = tmp_path / "empty.pt", tmp_path / "notes.pt", tmp_path / "not-a-model"
    empty.write_bytes(b"")
    foreign.write_text("these are not weights\n")
    folder.mkdir()
    for option, spec, reason in (("--model", empty, "the file is empty"), ("--model", foreign, "cannot load YOLO"),
                                 ("--second-opinion", folder, "has no config.json")):
        proc = subprocess.run([*TANDEM, "models", "bind", "--project", "5", option, str(spec)], capture_output=True,
                              text=True, env=env, timeout=120)
        assert proc.returncode == 2 and "not bound" in proc.stderr and reason in proc.stderr, proc.stderr
    assert ProjectRepo(Settings(home=tmp_path / "home").database_url).get(5) is None
    proc = subprocess.run([*TANDEM, "models", "bind", "--project", "5", "--model", str(detect_weights)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and ProjectRepo(Settings(home=tmp_path / "home").database_url).get(5).model == \
        str(detect_weights.resolve())
    # a registry version whose weights were damaged since it was registered: refused the same way
    damaged = tmp_path / "p5-job1.pt"
    damaged.write_bytes(detect_weights.read_bytes()[:1000])
    Registry(Settings(home=tmp_path / "home").database_url).add_candidate(
        "p5-job1-0badf00d", "yolo", "detect", str(damaged), "x", "ds", {}, project_id=5)
    proc = subprocess.run([*TANDEM, "models", "bind", "--project", "6", "--model", "p5-job1-0badf00d"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "p5-job1-0badf00d" in proc.stderr and "cannot load YOLO" in proc.stderr, proc.stderr
    assert ProjectRepo(Settings(home=tmp_path / "home").database_url).get(6) is None


def test_demo_refuses_a_port_in_use_before_starting_anything(tmp_path):
    env = _env(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        taken = busy.getsockname()[1]
        proc = subprocess.run([*TANDEM, "demo", "--label-studio-port", str(taken)], capture_output=True, text=True,
                              env=env, timeout=120)
    assert proc.returncode == 2 and f"port {taken} on 127.0.0.1 is in use" in proc.stderr, proc.stderr
    assert not (tmp_path / "home" / "demo").exists()


def test_logs_written_to_a_file_are_one_line_per_record():
    """`nohup tandem serve > log 2>&1`: a task's reason must be one greppable line, not wrapped at 80 columns."""
    code = ("import logging; from backend.cli.common import setup_logging; setup_logging('info'); "
            "logging.getLogger('tandem.predict').warning('task 74: image /data/local-files/?d=hostile/bomb.png ' + "
            "'is over the 80000000-pixel limit ' + 'x' * 120)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "WARNING" in lines[0] and lines[0].endswith("x" * 120), proc.stderr
    assert "task 74: image /data/local-files/?d=hostile/bomb.png is over the 80000000-pixel limit" in lines[0]


def test_a_progress_bar_in_a_log_file_keeps_its_whole_text():
    """Piped to a file (a server's log, CI), the console is not cut at 80 columns: a stage's text reads whole."""
    text = "predict 30 not stored (0 from the store; 30 of them lack only the second opinion) and what follows"
    code = ("from rich.progress import BarColumn, Progress, TextColumn\n"
            "from backend.cli.common import console\n"
            "with Progress(TextColumn('{task.description}'), BarColumn(), console=console) as p:\n"
            f"    p.add_task({text!r}, total=3, completed=3)\n")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert text in proc.stderr, proc.stderr


def test_projects_list_and_forget_a_project_deleted_in_label_studio(tmp_path):
    """Label Studio says nothing when a project is deleted: its record stays until someone forgets it here,
    and forgetting removes that project's record only (its stored predictions stay)."""
    from backend.storage.predictions import PredictionRepo, PredictionRow
    from backend.storage.projects import ProjectRepo

    env = _env(tmp_path)
    url = Settings(home=tmp_path / "home").database_url
    repo = ProjectRepo(url)
    rect = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
            '<Label value="Square"/><Label value="Circle"/></RectangleLabels></View>')
    repo.update(3, label_config=rect, hostname="http://ls.example:8080", label_map={"square": "Square"})
    repo.update(4, label_config="<View><Text name='t' value='$t'/></View>", model="/weights/best.pt")
    PredictionRepo(url).put_many([PredictionRow(11, "v1", "fp", 3, "cnn", "pre-annotation",
                                                {"result": [], "model_version": "v1"})])
    before = PredictionRepo(url).count(3)
    assert before == 1

    listed = subprocess.run([*TANDEM, "projects", "list"], capture_output=True, text=True, env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split("│")[1].strip(): line for line in listed.stdout.splitlines() if line.count("│") > 3}
    assert set(rows) >= {"3", "4"} and "2 of at most" in listed.stdout
    assert "rectanglelabels 'label' (2 labels)" in rows["3"] and "http://ls.example:8080" in rows["3"]
    assert "unservable config" in rows["4"] and "/weights/best.pt" in rows["4"]

    gone = subprocess.run([*TANDEM, "projects", "forget", "3"], capture_output=True, text=True, env=env, timeout=120)
    assert gone.returncode == 0 and "project 3 forgotten" in " ".join(gone.stderr.split()), gone.stderr
    assert repo.get(3) is None and repo.get(4) is not None and PredictionRepo(url).count(3) == before
    again = subprocess.run([*TANDEM, "projects", "forget", "3"], capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 2 and "project 3 is not recorded" in " ".join(again.stderr.split())


def test_a_damaged_sqlite_file_is_one_line_that_names_it_and_says_what_to_do(tmp_path):
    """Not a 468-line traceback ending in "file is not a database", and not "is it running?" either."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "tandem.sqlite3").write_bytes(os.urandom(8192))
    (home / "tandem.sqlite3").chmod(0o600)
    for command in (["jobs", "list"], ["models", "list"]):
        proc = subprocess.run([*TANDEM, *command], capture_output=True, text=True, env=_env(tmp_path), timeout=120)
        said = " ".join(proc.stderr.split())
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(said) < 400, proc.stderr
        assert f"{home / 'tandem.sqlite3'} is damaged: restore it from a backup, or move it aside" in said, said
        assert "is it running" not in said


def test_database_advice_fits_the_driver_s_reason():
    from sqlalchemy.exc import OperationalError

    from backend.storage.db import unavailable

    def said(reason: str) -> str:
        return unavailable(OperationalError("SELECT 1", {}, Exception(reason)), "sqlite:////srv/t.sqlite3")

    assert "is not writable: check the permissions" in said("attempt to write a readonly database")
    assert "its folder exists and is writable" in said("unable to open database file")
    io = said("disk I/O error")  # SQLite's word for a full disk and for a file it may not write alike
    assert "t.sqlite3 is refusing writes: check free disk space" in io and "may be written" in io
    assert "did not answer: connection refused (is it running?" in said("connection refused")


def test_a_starter_that_no_longer_loads_is_moved_aside_and_trained_again(tmp_path):
    """The starter is Tandem's own file: a truncated one (a copy cut short, a full disk) used to stop `tandem
    serve` with exit 2; it is now kept as `.damaged` and made again from its recipe."""
    from backend.models.starter import starter_weights_path

    stored = starter_weights_path(tmp_path / "home", "classify")
    stored.parent.mkdir(parents=True)
    stored.write_bytes(b"\x80\x02 truncated checkpoint")
    port = free_port()
    proc = subprocess.Popen([*TANDEM, "serve", "--starter-task", "classify", "--engine", "torch", "--port", str(port)],
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        health = _wait_health(proc, port, deadline_s=600)
        assert health["ready"] and health["model_version"].startswith("shapes-yolov8n-classify-")
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    aside = stored.with_name(stored.name + ".damaged")
    assert aside.read_bytes() == b"\x80\x02 truncated checkpoint"  # kept, not deleted
    assert stored.stat().st_size > 100_000
    said = " ".join(out.split())
    assert f"{stored} does not load" in said and f"kept as {aside.name} and trained again — under a minute" in said


def test_a_starter_that_loads_is_kept_when_only_the_engine_fails(tmp_path, classify_weights):
    """The engine (an OpenVINO that cannot load, an export that fails) is not the file's fault: the
    starter is not renamed .damaged nor trained again for minutes, and the error is the engine's, at once."""
    from backend.models.starter import starter_weights_path

    stored = starter_weights_path(tmp_path / "home", "classify")
    stored.parent.mkdir(parents=True)
    stored.write_bytes(classify_weights.read_bytes())
    broken = tmp_path / "site" / "openvino"  # an OpenVINO that cannot be imported (a wheel broken for this CPU)
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('openvino is broken here')\n")
    env = {**_env(tmp_path), "PYTHONPATH": str(broken.parent)}
    proc = subprocess.run([*TANDEM, "serve", "--starter-task", "classify", "--engine", "openvino", "--port",
                           str(free_port())], env=env, capture_output=True, text=True, timeout=300)
    said = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2 and "openvino is broken here" in said, said
    assert stored.read_bytes() == classify_weights.read_bytes() and not list(stored.parent.glob("*.damaged"))
    assert "trained again" not in said
