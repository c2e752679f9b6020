"""Training triggers, coalescing, orphaned and corrupt jobs — real worker processes, no Label Studio."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from backend.registry import Registry
from backend.server.app import create_app
from backend.serving import ModelHolder
from backend.settings import Settings
from backend.training.jobs import JobStatus, JobStore
from backend.training.runner import log_path, mark_orphans, wait
from backend.training.service import TrainingPolicy, TrainingService
from tests.harness import ServerThread


def test_100_webhook_events_make_one_job_and_each_answers_fast(tmp_path, detect_adapter):
    settings = Settings(home=tmp_path / "home")
    app = create_app(settings, ModelHolder(detect_adapter), policy=TrainingPolicy(train_after=100))
    store = app.state.training.store
    with ServerThread(app) as srv, httpx.Client() as http:
        slowest = 0.0
        for i in range(100):
            t0 = time.perf_counter()
            r = http.post(f"{srv.url}/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 7},
                                                      "annotation": {"id": i}})
            slowest = max(slowest, time.perf_counter() - t0)
            assert r.status_code == 200
            if i == 98:
                assert store.list(7) == []
        assert slowest < 1.0  # Label Studio gives annotation webhooks 1 s
        jobs = store.list(7)
        assert len(jobs) == 1 and jobs[0].reason == "100 new corrections"
        # no Label Studio is configured here, so the worker fails — with the reason, in its own process
        done = wait(store, jobs[0].id, timeout=120)
        assert done.status is JobStatus.FAILED and "LABEL_STUDIO_URL" in done.error
        assert httpx.get(f"{srv.url}/health").json()["ready"]
        assert httpx.get(f"{srv.url}/jobs/{done.id}").json()["status"] == "failed"
        logs = httpx.get(f"{srv.url}/jobs/{done.id}/logs").text
        assert "error: training needs LABEL_STUDIO_URL" in logs and "Traceback" not in logs  # said, not dumped


def test_triggers_during_a_job_coalesce_into_one_follow_up(tmp_path, detect_adapter):
    settings = Settings(home=tmp_path / "home")
    service = TrainingService(settings, ModelHolder(detect_adapter), Registry(settings.database_url))
    first = service.trigger(3, "button")
    for reason in ("schedule", "button again", "webhooks", "cli"):
        assert service.trigger(3, reason).id == first.id
    other = service.trigger(4, "another project")  # projects do not block each other
    assert other.id != first.id
    wait(service.store, first.id, timeout=120)
    deadline = time.monotonic() + 120
    while len(service.store.list(3)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    jobs = service.store.list(3)
    assert len(jobs) == 2 and jobs[0].reason == "coalesced: cli"
    wait(service.store, jobs[0].id, timeout=120)
    time.sleep(1.5)
    assert len(service.store.list(3)) == 2  # the follow-up had nothing pending: no third job
    service.close()


def test_the_follow_up_runs_the_trigger_folded_in_not_the_job_before_it(tmp_path, detect_adapter):
    """A LoRA trigger folded into a running YOLO job's follow-up runs as LoRA with its own params (it used to
    run as YOLO with the ended job's params). With no Label Studio configured every job fails at once."""
    settings = Settings(home=tmp_path / "home", vlm=str(tmp_path / "some-vlm"))  # a VLM to adapt, or no LoRA job
    service = TrainingService(settings, ModelHolder(detect_adapter), Registry(settings.database_url))
    first = service.trigger(5, "button", params={"epochs": 7})
    assert first.model_kind == "yolo" and first.params["epochs"] == 7
    assert service.trigger(5, "lora button", model_kind="vlm", params={"lora_rank": 4}).id == first.id
    # counted corrections (automatic) do not replace a follow-up someone asked for
    assert service.trigger(5, "10 new corrections", automatic=True).id == first.id
    assert service.store.get(first.id).follow_up == "lora button"

    def next_job(after: int):
        deadline = time.monotonic() + 120
        while service.store.list(5)[0].id == after and time.monotonic() < deadline:
            time.sleep(0.2)
        return service.store.list(5)[0]

    assert wait(service.store, first.id, timeout=120).status is JobStatus.FAILED
    follow = next_job(first.id)
    assert follow.reason == "coalesced: lora button"
    assert (follow.model_kind, follow.params, follow.runner) == ("vlm", {"lora_rank": 4}, first.runner)
    wait(service.store, follow.id, timeout=120)

    # a follow-up folded in by a replica from before migration 0003 (reason only) runs as the job before it
    third = service.trigger(5, "button", params={"epochs": 9})
    assert service.store.set_follow_up(third.id, "an older replica's trigger")
    wait(service.store, third.id, timeout=120)
    fourth = next_job(third.id)
    assert fourth.reason == "coalesced: an older replica's trigger"
    assert (fourth.model_kind, fourth.params) == ("yolo", third.params)
    wait(service.store, fourth.id, timeout=120)
    service.close()


def test_cancel_and_orphans(tmp_path, detect_adapter):
    settings = Settings(home=tmp_path / "home")
    store = JobStore(settings.database_url)
    orphan = store.create(1, "yolo", "local", "test")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.update(orphan.id, status=JobStatus.RUNNING, pid=dead.pid)
    assert mark_orphans(store) == 1
    assert store.get(orphan.id).status is JobStatus.FAILED
    service = TrainingService(settings, ModelHolder(detect_adapter), Registry(settings.database_url))
    job = service.trigger(2, "to cancel")
    assert store.set_follow_up(job.id, "3 new corrections")
    assert service.cancel(job.id)
    assert store.get(job.id).status is JobStatus.CANCELLED  # the dying worker cannot overwrite it
    log = log_path(settings.home, job.id).read_text()  # the verdict a stopped worker cannot write, and what it drops
    assert log.rstrip().endswith(f"job {job.id} cancelled: nothing from it is registered or served; its queued "
                                 "follow-up (3 new corrections) is dropped too"), log
    time.sleep(1.5)
    assert store.get(job.id).status is JobStatus.CANCELLED and not service.cancel(job.id)
    service.close()


def test_corrupt_promoted_weights_are_never_served(tmp_path, detect_adapter, detect_weights):
    settings = Settings(home=tmp_path / "home")
    registry = Registry(settings.database_url)
    holder = ModelHolder(detect_adapter)
    registry.record_served(detect_adapter.version, "start", "detect", str(detect_weights))
    service = TrainingService(settings, holder, registry, watch_interval_s=3600)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02 truncated checkpoint")
    registry.add_candidate("bad-v2", "bad", "detect", str(bad), detect_adapter.version, "x", {})
    registry.set_status("bad-v2", "promoted")
    service.check_promotions().join(30)
    assert holder.adapter is detect_adapter and "cannot load YOLO weights" in holder.error
    service.close()

    env = {**os.environ, "TANDEM_HOME": str(settings.home)}
    registry.add_candidate("bad-v3", "bad", "detect", str(bad), detect_adapter.version, "x", {})
    proc = subprocess.run([sys.executable, "-m", "backend.cli", "models", "promote", "bad-v3"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "cannot load" in proc.stderr
    assert registry.get("bad-v3").status == "candidate"
    listing = subprocess.run([sys.executable, "-m", "backend.cli", "models", "list"], capture_output=True, text=True,
                             env=env, timeout=120).stdout
    assert "bad-v2" in listing and detect_adapter.version in listing


def test_fine_tune_skips_ultralytics_own_validation(tmp_path, detect_weights):
    """With val=False ultralytics still validates twice (last epoch, then best.pt); the promotion gate
    scores the candidate itself, so the fine-tune trainer runs no validation and its weights still load."""
    from ultralytics import YOLO

    from backend.datasets.shapes import write_yolo_dataset
    from backend.models.yolo import YoloAdapter
    from backend.training.yolo_finetune import trainer_without_validation

    data = str(write_yolo_dataset(tmp_path / "data", train=8, val=4, seed=3))
    args = dict(data=data, epochs=1, imgsz=64, batch=8, workers=0, device="cpu", val=False, plots=False,
                verbose=False, exist_ok=True)
    counts = {}
    for name, trainer in (("plain", None), ("tandem", trainer_without_validation("detect"))):
        model, calls = YOLO(str(detect_weights)), []
        model.add_callback("on_val_start", lambda v, calls=calls: calls.append(1))
        model.train(trainer=trainer, project=str(tmp_path / name), name="train", **args)
        counts[name] = len(calls)
    assert counts == {"plain": 2, "tandem": 0}
    last = tmp_path / "tandem" / "train" / "weights" / "last.pt"
    assert last.stat().st_size < 1.5 * detect_weights.stat().st_size  # optimizer state stripped, as ultralytics does
    adapter = YoloAdapter(last, device="cpu")
    assert adapter.class_names == ("square", "circle", "triangle")

    from backend.training import yolo_finetune  # ultralytics' multi-GPU launcher imports the class by name

    assert yolo_finetune.TandemSegmentationTrainer.__module__ == "backend.training.yolo_finetune"


def test_vlm_jobs_do_not_inherit_the_yolo_epochs(tmp_path, detect_adapter):
    """TANDEM_TRAIN_EPOCHS (30) is for YOLO; a LoRA job keeps its own default (3) unless given one."""
    app = create_app(Settings(home=tmp_path / "home", vlm=str(tmp_path / "some-vlm")), ModelHolder(detect_adapter))
    with ServerThread(app) as srv:
        vlm_job = httpx.post(f"{srv.url}/train", json={"project": 1, "model": "vlm"}).json()
        yolo_job = httpx.post(f"{srv.url}/train", json={"project": 2}).json()
        explicit = httpx.post(f"{srv.url}/train", json={"project": 3, "model": "vlm", "params": {"epochs": 5}}).json()
        store = app.state.training.store
        assert "epochs" not in store.get(vlm_job["id"]).params
        assert store.get(yolo_job["id"]).params["epochs"] == 30
        assert store.get(explicit["id"]).params["epochs"] == 5
        for job in (vlm_job, yolo_job, explicit):
            wait(store, job["id"], timeout=120)  # they fail without Label Studio; let the workers finish


def test_a_frozen_backbone_stays_put_while_the_head_learns(tmp_path, detect_weights):
    """The worker freezes the first 10 layers on very few images; fine_tune must pass that to ultralytics."""
    import torch
    from ultralytics import YOLO

    from backend.datasets.shapes import write_yolo_dataset
    from backend.training.yolo_finetune import fine_tune

    data = str(write_yolo_dataset(tmp_path / "data", train=8, val=4, seed=5))
    out = fine_tune(str(detect_weights), data, tmp_path / "run", {"epochs": 2, "imgsz": 96, "freeze": 10}, "cpu")
    before = YOLO(str(detect_weights)).model.state_dict()
    after = YOLO(out["weights"]).model.state_dict()

    def changed(prefix):
        return any(not torch.equal(before[k].float(), after[k].float()) for k in before
                   if k.startswith(prefix) and before[k].is_floating_point() and "running" not in k)

    assert not changed("model.0.") and not changed("model.9.")  # backbone: frozen
    assert changed("model.22.")  # the detection head trained


def test_a_promoted_version_is_served_on_the_same_engine(tmp_path, detect_adapter, detect_weights):
    """A retrained model must not fall back to PyTorch because the server was started with OpenVINO."""
    settings = Settings(home=tmp_path / "home", device="cpu", engine="openvino")
    registry = Registry(settings.database_url)
    holder = ModelHolder(detect_adapter)
    registry.record_served(detect_adapter.version, "start", "detect", str(detect_weights))
    service = TrainingService(settings, holder, registry, watch_interval_s=3600)
    retrained = tmp_path / "retrained.pt"
    retrained.write_bytes(detect_weights.read_bytes() + b"\0")  # other bytes: another version
    registry.add_candidate("p1-job1", "retrained", "detect", str(retrained), detect_adapter.version, "x", {})
    registry.set_status("p1-job1", "promoted")
    service.check_promotions().join(120)
    assert holder.adapter is not detect_adapter and holder.adapter.engine == "openvino"
    assert (settings.home / "cache" / "openvino" / f"{holder.adapter.version}_openvino_model").is_dir()
    service.close()


def test_the_promotion_gate_scores_every_box_not_only_those_above_the_serving_threshold(tmp_path, detect_weights):
    """A fine-tune whose confidences fell below 0.25 must still be scored on how well it localises."""
    from backend.datasets.shapes import CLASS_NAMES, write_yolo_dataset
    from backend.models.yolo import YoloAdapter
    from backend.training.evaluate import evaluate
    from backend.training.export import ExportedDataset
    from backend.training.worker import scoring_adapter

    data = write_yolo_dataset(tmp_path / "data", train=1, val=12, seed=21)
    dataset = ExportedDataset(root=tmp_path / "data", task="detect", class_names=list(CLASS_NAMES), data=str(data),
                              train=1, val=12)
    gate = evaluate(scoring_adapter(detect_weights, "cpu"), dataset)
    # the same weights cut at a threshold above their confidences: the score a served-threshold gate would see
    cut = evaluate(YoloAdapter(detect_weights, device="cpu", conf=0.999), dataset)
    assert gate["images"] == 12 and gate["map50"] > 0.5
    assert cut["map50_95"] < gate["map50_95"] / 2


def test_models_list_shows_yolo_fitness_and_vlm_loss_side_by_side(tmp_path):
    settings = Settings(home=tmp_path / "home")
    registry = Registry(settings.database_url)
    registry.add_candidate("p1-job1", "yolo", "detect", "x.pt", None, "s",
                           {"candidate": {"fitness": 0.61}, "serving": {"fitness": 0.55}})
    registry.add_candidate("p1-job2", "lora", "vlm-generative", "adapter", None, "s",
                           {"candidate": {"val_loss": 0.42}, "serving": {"val_loss": 0.7}})
    from backend.storage.projects import ProjectRepo

    registry.add_candidate("p1-job3", "yolo", "detect", "y.pt", "p1-job1", "s", {}, project_id=1)
    projects = ProjectRepo(settings.database_url)
    projects.update(1, model="p1-job3")  # what a promotion into project 1 writes
    projects.update(2, second_opinion="p1-job2")  # a LoRA version bound as a project's second opinion
    other = tmp_path / "other-yolo.pt"  # a YOLO second opinion bound by path: no registry version
    projects.update(3, second_opinion=str(other), pre_annotator="cnn")
    proc = subprocess.run([sys.executable, "-m", "backend.cli", "models", "list"], capture_output=True, text=True,
                          env={**os.environ, "TANDEM_HOME": str(settings.home), "COLUMNS": "400"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "0.6100" in proc.stdout and "loss 0.4200" in proc.stdout and "loss 0.7000" in proc.stdout
    marked = [line for line in proc.stdout.splitlines() if "▷" in line]
    assert len(marked) == 3 and "bound to a project" in marked[2]  # two versions, then the key
    assert {"p1-job2", "p1-job3"} == {line.split()[3] for line in marked[:2]}  # the LoRA as well as the CNN
    assert any("p1-job3" in line and "project 1" in line for line in marked)  # "serves now"
    assert any("p1-job2" in line and "project 2" in line for line in marked)
    rows = proc.stdout.split("Project bindings")[1].splitlines()
    row = {int(line.split()[1]): line for line in rows if line.strip().startswith("│ ")
           and line.split()[1].isdigit()}
    assert set(row) == {1, 2, 3}
    assert "p1-job3" in row[1] and "p1-job2" in row[2] and str(other) in row[3] and "cnn" in row[3]
    assert "weights" not in proc.stdout  # relative names (hub ids) are not looked for on disk


def test_models_list_flags_versions_whose_weights_are_gone(tmp_path, detect_weights):
    """A version whose file was deleted or emptied (a cleaned disk, a full one) is marked, and counted below the
    table; one whose file is there, and hub names, are not."""
    settings = Settings(home=tmp_path / "home")
    registry = Registry(settings.database_url)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    spaced = tmp_path / "my models" / "w.pt"  # a file:// URL percent-encodes the space
    spaced.parent.mkdir()
    spaced.write_bytes(detect_weights.read_bytes())
    (tmp_path / "cleaned-lora").mkdir()  # an adapter folder whose files were deleted
    registry.add_candidate("p1-job4", "lora", "vlm-generative", str(tmp_path / "cleaned-lora"), None, "s", {})
    registry.add_candidate("p1-job5", "yolo", "detect", spaced.as_uri(), None, "s", {})
    registry.add_candidate("p1-job1", "yolo", "detect", str(detect_weights), None, "s", {})
    registry.add_candidate("p1-job2", "yolo", "detect", str(tmp_path / "deleted.pt"), None, "s", {})
    registry.add_candidate("p1-job3", "yolo", "detect", f"file://{empty}", None, "s", {})
    registry.record_served("yolov8n-hub", "yolov8n", "detect", "yolov8n.pt")
    proc = subprocess.run([sys.executable, "-m", "backend.cli", "models", "list"], capture_output=True, text=True,
                          env={**os.environ, "TANDEM_HOME": str(settings.home), "COLUMNS": "400"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = {v: next(x for x in proc.stdout.splitlines() if f" {v} " in x)
            for v in ("p1-job1", "p1-job2", "p1-job3", "p1-job4", "p1-job5", "yolov8n-hub")}
    assert "weights missing" in line["p1-job2"] and "weights empty" in line["p1-job3"]
    assert "weights empty" in line["p1-job4"]
    assert all("weights" not in line[v] for v in ("p1-job1", "p1-job5", "yolov8n-hub"))
    said = " ".join(proc.stdout.split())
    assert "3 version(s) cannot be served from this machine (" in said
    assert all(v in said.split("cannot be served from this machine (")[1].split(")")[0]
               for v in ("p1-job2", "p1-job3", "p1-job4"))


def test_the_gate_promotes_not_worse_but_never_a_candidate_that_scores_nothing():
    from backend.training.worker import gate

    assert gate(0.50, 0.50, 0.0, "v1") == (True, "promoted (not worse than v1 on the frozen split; on a tie the "
                                                  "newer model, which learned the latest corrections, serves)")
    assert gate(0.51, 0.50, 0.0, "v1") == (True, "promoted")
    assert gate(0.49, 0.50, 0.02, "v1")[0]  # within the margin
    promote, why = gate(0.40, 0.50, 0.02, "v1")
    assert not promote and "worse than v1 by more than 0.02" in why
    promote, why = gate(0.0, 0.0, 0.0, "v1")  # the 0-vs-0 tie a walkthrough saw promoted on 2 images
    assert not promote and "scores 0" in why


def test_the_gate_scores_a_parent_through_the_projects_label_map(tmp_path, detect_weights):
    """A starter served as Box/Ring/Wedge via a label map is scored as served, not as 0 (which any candidate beats)."""
    from backend.datasets.shapes import CLASS_NAMES, write_yolo_dataset
    from backend.labeling.config import parse_label_config
    from backend.training.evaluate import evaluate
    from backend.training.export import ExportedDataset
    from backend.training.worker import scoring_adapter

    renamed = {"square": "Box", "circle": "Ring", "triangle": "Wedge"}
    control = parse_label_config('<View><Image name="image" value="$image"/><RectangleLabels name="label" '
                                 'toName="image"><Label value="Box"/><Label value="Ring"/><Label value="Wedge"/>'
                                 '</RectangleLabels></View>').controls[0]
    data = write_yolo_dataset(tmp_path / "data", train=1, val=8, seed=5)
    kw = dict(root=tmp_path / "data", task="detect", data=str(data), train=1, val=8)
    by_name = ExportedDataset(class_names=list(CLASS_NAMES), **kw)
    mapped = ExportedDataset(class_names=[renamed[c] for c in CLASS_NAMES], control=control, **kw)
    adapter = scoring_adapter(detect_weights, "cpu")
    expected = evaluate(adapter, by_name)["map50_95"]
    assert expected > 0.3
    assert evaluate(adapter, mapped)["fitness"] == 0.0  # no label map: none of its classes is a label
    assert evaluate(adapter, mapped, label_map=renamed)["map50_95"] == expected


def test_models_promote_and_rollback_handle_vlm_versions(tmp_path, tiny_vlm, detect_adapter, detect_weights):
    """A VLM version is checked by loading it as the server would (not as YOLO weights), and `rollback --vlm`
    returns to the VLM's parent while the CNN stays as it is."""
    home = tmp_path / "home"
    registry = Registry(Settings(home=home).database_url)
    registry.record_served(detect_adapter.version, "start", "detect", str(detect_weights))
    clip = str(tiny_vlm("clip"))
    registry.record_served("clip-base", "clip", "vlm:classify", clip)
    registry.add_candidate("clip-v2", "clip", "vlm:classify", clip, "clip-base", "x", {})
    broken = tmp_path / "broken-vlm"
    broken.mkdir()
    registry.add_candidate("clip-v3", "clip", "vlm:classify", str(broken), "clip-base", "x", {})
    env = {**os.environ, "TANDEM_HOME": str(home)}

    def tandem(*args):
        proc = subprocess.run([sys.executable, "-m", "backend.cli", "models", *args], capture_output=True, text=True,
                              env=env, timeout=300)
        proc.stderr = " ".join(proc.stderr.split())  # rich wraps its console at 80 columns
        return proc

    refused = tandem("promote", "clip-v3")
    assert refused.returncode == 2 and "no config.json" in refused.stderr, refused.stderr
    assert registry.get("clip-v3").status == "candidate"
    promoted = tandem("promote", "clip-v2")
    assert promoted.returncode == 0, promoted.stderr
    assert registry.current("vlm").version == "clip-v2"
    back = tandem("rollback", "--vlm")
    assert back.returncode == 0 and "from clip-v2 to clip-base" in back.stderr, back.stderr
    assert registry.current("vlm").version == "clip-base" and registry.get("clip-v2").status == "rolled back"
    assert registry.current("cnn").version == detect_adapter.version  # the CNN was not touched
    cnn = tandem("rollback")
    assert cnn.returncode == 2 and "has no parent" in cnn.stderr


def test_a_yolo_second_opinion_is_never_the_cnn_a_promotion_swaps_in(tmp_path, detect_adapter, classify_adapter):
    """Other YOLO weights served as the second opinion are recorded as such: the server's CNN stays the CNN when
    anything is promoted (it used to become the second opinion, the most recently served YOLO)."""
    settings = Settings(home=tmp_path / "home")
    app = create_app(settings, ModelHolder(detect_adapter), training=False, vlm=ModelHolder(classify_adapter))
    registry = app.state.registry
    assert registry.get(classify_adapter.version).kind == "second"
    assert registry.get(classify_adapter.version).task.startswith("second:")
    assert registry.current("cnn").version == detect_adapter.version
    assert registry.current("vlm") is None and registry.last_served("cnn").version == detect_adapter.version
    # the CNN's weights also served as a second opinion (say, to compare with a fine-tune): still the CNN, and
    # serving it as the second opinion does not make it the newest CNN
    before = registry.get(detect_adapter.version)
    registry.record_served(detect_adapter.version, "start", f"second:{before.task}", before.path)
    after = registry.get(detect_adapter.version)
    assert after.kind == "cnn" and after.served_at == before.served_at
    # weights first seen as a second opinion take the CNN's role once served as the CNN
    second = registry.get(classify_adapter.version)
    registry.record_served(second.version, second.name, "classify", second.path)
    assert registry.get(second.version).kind == "cnn" and registry.current("cnn").version == second.version


def test_promote_and_rollback_of_a_project_version_go_through_its_binding(tmp_path, detect_adapter,
                                                                           detect_weights):
    """A project's retrain is served to that project only: `models promote` puts it in the project's binding (the
    server default stays), and `models rollback --project` binds the parent again."""
    from backend.storage.projects import ProjectRepo

    home = tmp_path / "home"
    registry = Registry(Settings(home=home).database_url)
    registry.record_served(detect_adapter.version, "start", "detect", str(detect_weights))
    registry.add_candidate("p1-job1-aa", "p1-job1", "detect", str(detect_weights), detect_adapter.version, "snap",
                           {}, project_id=1)
    registry.set_status("p1-job1-aa", "rejected")
    env = {**os.environ, "TANDEM_HOME": str(home), "COLUMNS": "200"}

    def tandem(*args):
        proc = subprocess.run([sys.executable, "-m", "backend.cli", "models", *args], capture_output=True, text=True,
                              env=env, timeout=300)
        return proc.returncode, " ".join((proc.stdout + proc.stderr).split())

    projects = ProjectRepo(Settings(home=home).database_url)
    rc, said = tandem("rollback", "--project", "1")
    assert rc == 2 and "project 1 has no CNN version bound" in said, said
    rc, said = tandem("promote", "p1-job1-aa")
    assert rc == 0 and "p1-job1-aa promoted for project 1" in said, said
    assert "note: the gate had rejected p1-job1-aa; promoting it anyway" in said, said
    assert projects.get(1).model == "p1-job1-aa"
    assert registry.current("cnn").version == detect_adapter.version  # the server's default is untouched
    rc, said = tandem("list")
    assert rc == 0 and "p1-job1-aa" in said
    rc, said = tandem("rollback", "--project", "1")
    assert rc == 0 and f"rolled back from p1-job1-aa to {detect_adapter.version} for project 1" in said, said
    assert projects.get(1).model == detect_adapter.version and registry.get("p1-job1-aa").status == "rolled back"
    # a project bound to a server-wide version: its rollback changes that project only, not the version's status
    registry.add_candidate("srv-ft-cc", "srv-ft", "detect", str(detect_weights), detect_adapter.version, "snap2", {})
    registry.set_status("srv-ft-cc", "promoted")
    projects.update(2, model="srv-ft-cc")
    rc, said = tandem("rollback", "--project", "2")
    assert rc == 0 and f"rolled back from srv-ft-cc to {detect_adapter.version} for project 2" in said, said
    assert projects.get(2).model == detect_adapter.version and registry.get("srv-ft-cc").status == "promoted"
    # --project: a server-wide candidate served to one project; it does not become the server's default
    registry.add_candidate("srv-ft-dd", "srv-ft", "detect", str(detect_weights), detect_adapter.version, "snap3", {})
    projects.update(3, label_config="<View/>")
    default = registry.current("cnn").version
    rc, said = tandem("promote", "srv-ft-dd", "--project", "3")
    assert rc == 0 and "srv-ft-dd promoted for project 3 (its binding's model" in said, said
    assert projects.get(3).model == "srv-ft-dd" and registry.get("srv-ft-dd").status == "candidate"
    assert registry.current("cnn").version == default != "srv-ft-dd" and projects.get(2).model != "srv-ft-dd"
    rc, said = tandem("promote", "p1-job1-aa", "--project", "4")  # another project's retrain: allowed, said
    assert rc == 0 and "p1-job1-aa was trained for project 1; serving it to project 4 too" in said, said
    assert "project 4 has not connected" in said and projects.get(4).model == "p1-job1-aa"


def test_train_with_server_follows_the_job_on_that_server_not_in_local_state(tmp_path, detect_adapter):
    """The job runs in the server's TANDEM_HOME; the CLI, with another home, follows it over HTTP to its end
    (here a failure: that server reaches no Label Studio) instead of waiting on a job its own state lacks."""
    server_home = tmp_path / "server-home"
    settings = Settings(home=server_home, label_studio_url="http://127.0.0.1:9", label_studio_api_key="k")
    app = create_app(settings, ModelHolder(detect_adapter), policy=TrainingPolicy(train_after=100))
    env = {**os.environ, "TANDEM_HOME": str(tmp_path / "cli-home")}
    with ServerThread(app) as srv:
        proc = subprocess.run([sys.executable, "-m", "backend.cli", "train", "--project", "5", "--server", srv.url],
                              capture_output=True, text=True, env=env, timeout=300)
        job = app.state.training.store.list(5)[0]
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 1, err
    assert f"queued job {job.id} through {srv.url}" in err and f"job {job.id} failed" in err
    assert job.status is JobStatus.FAILED and job.error.split()[0] in err  # the server's verdict, as it recorded it
    assert not JobStore(Settings(home=tmp_path / "cli-home").database_url).list(5)  # nothing ran here

    gone = subprocess.run([sys.executable, "-m", "backend.cli", "train", "--project", "5", "--server", srv.url],
                          capture_output=True, text=True, env=env, timeout=120)
    assert gone.returncode == 2 and "cannot reach Tandem at" in " ".join(gone.stderr.split())
    assert "Traceback" not in gone.stderr


def test_train_with_server_during_a_job_follows_its_own_follow_up(tmp_path, detect_adapter):
    """A request the server folds into the active job's follow-up says so, and the CLI follows that job and
    then the follow-up that runs its options, not only the job before it (which ran someone else's)."""
    server_home = tmp_path / "server-home"
    settings = Settings(home=server_home, label_studio_url="http://127.0.0.1:9", label_studio_api_key="k")
    app = create_app(settings, ModelHolder(detect_adapter), policy=TrainingPolicy(train_after=100))
    store = app.state.training.store
    # a job of another replica, running under its lease
    other = store.create(5, "yolo", "local", "button", {"epochs": 3}, kind="train", holder="another-replica",
                         lease_s=600)
    assert store.start(other.id)
    env = {**os.environ, "TANDEM_HOME": str(tmp_path / "cli-home"), "COLUMNS": "200"}
    with ServerThread(app) as srv:
        proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "train", "--project", "5", "--epochs", "2",
                                 "--server", srv.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)
        deadline = time.monotonic() + 120
        while store.get(other.id).follow_up is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert store.get(other.id).follow_up == "tandem train"
        assert store.heartbeat(other.id, "another-replica", lease_s=0.1)  # that replica dies: its lease runs out
        out, err = proc.communicate(timeout=240)
        jobs = store.list(5)
    said = " ".join((out + err).split())
    follow = next(j for j in jobs if j.id != other.id)
    assert follow.reason == "coalesced: tandem train" and follow.params["epochs"] == 2
    assert f"project 5 already has job {other.id} (running)" in said and "epochs=2" in said, said
    assert f"job {other.id} failed" in said and f"your request runs as job {follow.id}" in said, said
    assert f"job {follow.id} failed" in said.split(f"your request runs as job {follow.id}")[1], said  # followed
    assert proc.returncode == 1 and "Traceback" not in said


def test_the_cli_fails_a_job_whose_worker_died_with_no_server_running(tmp_path):
    """Else it showed 'running' for good and `tandem train` on its project answered 'already has job N'."""
    home = tmp_path / "home"
    store = JobStore(Settings(home=home).database_url)
    job = store.create(1, "yolo", "local", "tandem train")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.update(job.id, status=JobStatus.RUNNING, pid=dead.pid)
    listing = subprocess.run([sys.executable, "-m", "backend.cli", "jobs", "list"], capture_output=True, text=True,
                             env={**os.environ, "TANDEM_HOME": str(home)}, timeout=120)
    assert listing.returncode == 0 and "failed" in listing.stdout and "worker process disappeared" in listing.stdout
    assert store.get(job.id).status is JobStatus.FAILED and not store.active(1)


def test_a_follow_up_with_other_options_on_the_same_data_is_not_skipped():
    """`tandem train --epochs 2` folded behind a 1-epoch job used to stop at once as 'nothing new'."""
    from backend.training.worker import DEFAULTS, asked_options, other_options

    server = {"epochs": 30, "imgsz": None}  # Settings.training_params()
    assert asked_options({"epochs": 30, "imgsz": None}, server) == {}  # an automatic follow-up asks for nothing
    assert asked_options({"epochs": 2, "imgsz": None}, server) == {"epochs": 2}
    assert other_options(asked_options({"epochs": 30, "imgsz": None}, server), {**DEFAULTS, "epochs": 2}) == {}
    earlier = {**DEFAULTS, "epochs": 1, "imgsz": 160}
    assert other_options({"epochs": 2, "imgsz": None}, earlier) == {"epochs": 2}
    assert other_options({"epochs": 1}, earlier) == {}  # the same request: nothing new
    assert other_options({"epochs": 1, "imgsz": 160, "note": "x"}, earlier) == {}  # unknown keys are not options
    assert other_options({"epochs": 5}, None) == {}  # a version from before options were recorded


def test_a_version_promoted_into_a_project_starts_loading_before_the_project_asks(tmp_path, detect_adapter,
                                                                               segment_weights):
    """A retrain promotes into the project's binding; the server starts loading it at once (the watcher sees
    the promotion, then the binding a job writes right after it), so the project's next "Retrieve predictions"
    is answered by the new version rather than the old one while it loads."""
    from backend.storage.projects import ProjectRepo

    settings = Settings(home=tmp_path / "home")
    app = create_app(settings, ModelHolder(detect_adapter))
    registry, pool = app.state.registry, app.state.tandem.serving.pool
    projects = ProjectRepo(settings.database_url)
    projects.update(7, model=str(segment_weights) + "#never-loaded")  # bound before, never asked for
    try:
        registry.add_candidate("p7-job1", "p7-job1", "segment", str(segment_weights), None, "snap", {},
                               project_id=7)
        registry.set_status("p7-job1", "promoted")  # as the worker: the promotion first ...
        time.sleep(1.5)
        projects.update(7, model="p7-job1")  # ... then the binding
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and "p7-job1" not in pool.loaded():
            time.sleep(0.2)
        assert pool.loaded()["p7-job1"].version.startswith("shapes-yolov8n-segment")  # no request was made
        assert not any(spec.endswith("#never-loaded") for spec in pool.loaded())  # only the promoted binding
    finally:
        app.state.training.close()


def test_tandem_accept_s_own_annotations_are_no_corrections_unless_training_uses_them(tmp_path, detect_adapter):
    """`tandem accept --create-annotations` makes Label Studio send ANNOTATION_CREATED for each task it writes;
    those are no correction, and a job they started would find nothing new to learn (the export leaves them
    out unless TANDEM_TRAIN_AUTO_ACCEPTED is set, and then they count)."""
    from active_learning.queue import AUTO_MARKER

    def event(i: int, marked: bool) -> dict:
        region = {"from_name": "label", "to_name": "image", "type": "rectanglelabels",
                  "value": {"x": 1, "y": 1, "width": 5, "height": 5, "rectanglelabels": ["Square"]}}
        if marked:
            region["meta"] = {"text": [AUTO_MARKER]}
        return {"action": "ANNOTATION_CREATED", "project": {"id": 7},
                "annotation": {"id": i, "updated_at": "2026-12-07T10:00:00Z", "result": [region]}}

    for trains_on_them, expected in ((False, []), (True, ["2 new corrections"])):
        settings = Settings(home=tmp_path / f"home-{trains_on_them}", train_auto_accepted=trains_on_them)
        app = create_app(settings, ModelHolder(detect_adapter), policy=TrainingPolicy(train_after=2))
        with ServerThread(app) as srv, httpx.Client() as http:
            answers = [http.post(f"{srv.url}/webhook", json=event(i, marked=True)).json() for i in range(2)]
            assert [j.reason for j in app.state.training.store.list(7)] == expected
            assert all(a.get("counted", True) is trains_on_them for a in answers)
            if not trains_on_them:  # a person's annotations still count
                for i in (10, 11):
                    http.post(f"{srv.url}/webhook", json=event(i, marked=False))
                assert [j.reason for j in app.state.training.store.list(7)] == ["2 new corrections"]
        app.state.training.close()


def test_a_lora_job_with_no_vlm_to_adapt_is_refused_before_a_job_opens(tmp_path, detect_adapter):
    settings = Settings(home=tmp_path / "home")
    app = create_app(settings, ModelHolder(detect_adapter))
    with ServerThread(app) as srv:
        r = httpx.post(f"{srv.url}/train", json={"project": 4, "model": "vlm"})
        assert r.status_code == 422 and "no VLM serves it" in r.json()["detail"], r.text
        assert app.state.training.store.list(4) == []
    app.state.training.close()
    env = {**os.environ, "TANDEM_HOME": str(settings.home)}
    env.pop("TANDEM_VLM", None)
    proc = subprocess.run([sys.executable, "-m", "backend.cli", "train", "--project", "4", "--model", "vlm"],
                          env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "no VLM serves it" in out and "started" not in out, out
    assert JobStore(settings.database_url).list(4) == []


def test_a_person_s_edit_of_an_auto_accepted_annotation_counts_as_a_correction(tmp_path, detect_adapter):
    """The editor keeps a moved region's meta (the marker): an ANNOTATION_UPDATED saved later than the
    annotation was written is a person's correction, and counts."""
    from active_learning.queue import AUTO_MARKER

    region = {"from_name": "label", "to_name": "image", "type": "rectanglelabels", "meta": {"text": [AUTO_MARKER]},
              "value": {"x": 3, "y": 1, "width": 5, "height": 5, "rectanglelabels": ["Square"]}}
    app = create_app(Settings(home=tmp_path / "home"), ModelHolder(detect_adapter), policy=TrainingPolicy(train_after=2))
    with ServerThread(app) as srv, httpx.Client() as http:
        for i in range(2):
            r = http.post(f"{srv.url}/webhook", json={
                "action": "ANNOTATION_UPDATED", "project": {"id": 8},
                "annotation": {"id": i, "result": [region], "created_at": "2026-12-07T10:00:00.000000Z",
                               "updated_at": "2026-12-07T10:05:30.250000Z"}})
            assert r.json().get("counted", True)
        assert [j.reason for j in app.state.training.store.list(8)] == ["2 new corrections"]
    app.state.training.close()


def test_a_project_served_by_the_default_keeps_it_while_its_first_bound_version_loads(tmp_path, detect_adapter,
                                                                                      detect_weights):
    """A first promotion into a project that the server's default served: until the new version has loaded,
    the project is served the default it had, not nothing (`/health` read model_version null meanwhile)."""
    from backend.storage.projects import ProjectRepo

    settings = Settings(home=tmp_path / "home")
    app = create_app(settings, ModelHolder(detect_adapter), training=False)
    serving = app.state.tandem.serving
    before = serving.models(9)
    assert before.cnn is detect_adapter
    serving.record_served(9, before)  # what /predict records
    copy = tmp_path / "p9-job1.pt"
    copy.write_bytes(detect_weights.read_bytes() + b"\0")  # another version: loaded afresh
    ProjectRepo(settings.database_url).update(9, model=str(copy))
    now = serving.models(9)  # the load has only started
    assert serving.pool.is_loading(str(copy)) and now.cnn is detect_adapter and now.cnn_spec == str(copy)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and serving.models(9).cnn is detect_adapter:
        time.sleep(0.2)
    assert serving.models(9).cnn.version != detect_adapter.version  # then the bound version
    other = serving.models(10)  # a project never served: bound first, it waits for its own model
    ProjectRepo(settings.database_url).update(11, model=str(tmp_path / "missing.pt"))
    assert other.cnn is detect_adapter and serving.models(11).cnn is None


def test_a_stopped_follow_names_the_runner_that_holds_the_job_not_the_server_asked():
    """With replicas, the server `--server` named queued the job, but any replica's runner may hold it."""
    from backend.cli.train import _where

    assert _where(lambda: ({"holder": "replica-b:4242:9f3a1c2e"}, "")) == " (runner replica-b:4242)"
    assert _where(lambda: ({"holder": None}, "")) == ""  # still queued: held by nobody yet

    def down():
        raise OSError("connection refused")
    assert _where(down) == ""  # a goodbye line never fails on the hint


def test_a_label_studio_that_hangs_in_the_export_is_said_while_the_job_waits(tmp_path, monkeypatch, capsys):
    """A job's log silent for two minutes looks hung: it says whom it asked, that it still waits, and then
    that the export failed (here a server that accepts the connection and never answers)."""
    import socket
    import threading

    import pytest

    from backend.errors import TandemError
    from backend.training import worker

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:  # take connections, read nothing, answer nothing
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setattr(worker, "EXPORT_TIMEOUT_S", 2)
    monkeypatch.setattr(worker, "WAIT_LINE_S", 0.5)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        with pytest.raises(TandemError, match="cannot export project 7"):
            worker.fetch_annotated_tasks(Settings(home=tmp_path, label_studio_url=url, label_studio_api_key="k"), 7)
    finally:
        stop.set()
        for conn in held:
            conn.close()
        listener.close()
    out = capsys.readouterr().out
    assert f"asking Label Studio ({url}) for project 7's annotations" in out
    waits = [line for line in out.splitlines() if "still waiting for Label Studio's export of project 7" in line]
    assert len(waits) >= 2 and "each request gives up after 2 s" in waits[0], out
    time.sleep(1.0)  # the ticker stopped with the call: nothing more is printed afterwards
    assert "still waiting" not in capsys.readouterr().out


def test_annotation_webhooks_that_name_no_annotation_are_not_counted(tmp_path, detect_adapter):
    """Label Studio's annotation deliveries always carry their annotation(s); a body without one (a script, a
    replay, a forgery) counted every time and, ten of them, started a retrain for a project nobody corrected."""
    app = create_app(Settings(home=tmp_path / "home"), ModelHolder(detect_adapter),
                     policy=TrainingPolicy(train_after=3))
    store = app.state.training.store
    with ServerThread(app) as srv:
        for _ in range(10):
            r = httpx.post(f"{srv.url}/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1031}})
            assert r.status_code == 200
        assert store.list(1031) == []
        for i in range(3):  # three real corrections do start one
            httpx.post(f"{srv.url}/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1031},
                                                   "annotation": {"id": i, "updated_at": "t"}})
        assert [j.reason for j in store.list(1031)] == ["3 new corrections"]


def test_a_write_the_disk_refuses_fails_the_job_in_one_line(tmp_path):
    """torch.save and plain writes cut off by the disk (here a file-size limit, as `ulimit -f` or a full disk)
    are named in one line with what to do, not a traceback; other errors are not mistaken for them."""
    import errno

    from backend.training.worker import disk_failure

    code = ("import resource, signal, sys, torch; from pathlib import Path; "
            "from backend.training.worker import disk_failure; "
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            "for write in (lambda p: torch.save(torch.zeros(100_000), p), lambda p: Path(p).write_bytes(b'w' * 9000)):\n"
            "    try:\n"
            "        write(sys.argv[1])\n"
            "    except Exception as exc:\n"
            "        print(disk_failure(exc, Path('/srv/tandem')))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "last.pt")], capture_output=True, text=True,
                         timeout=120, check=True).stdout.splitlines()
    assert len(out) == 2, out
    assert "writing the model failed" in out[0] and "under /srv/tandem (TANDEM_HOME) and retrain" in out[0]
    assert "File too large" in out[1] and "ulimit -f" in out[1] and "under /srv/tandem (TANDEM_HOME)" in out[1]  # a
    # write() names no file
    full = OSError(errno.ENOSPC, "No space left on device", "/srv/tandem/jobs/3/best.pt")
    try:
        try:
            raise full
        except OSError as inner:
            raise RuntimeError("ultralytics could not save") from inner
    except RuntimeError as wrapped:
        line = disk_failure(wrapped, tmp_path)
    assert line.startswith("No space left on device (/srv/tandem/jobs/3/best.pt): free space under /srv/tandem/jobs/3")
    assert disk_failure(ValueError("bad label"), tmp_path) is None
    assert disk_failure(OSError(errno.ECONNREFUSED, "Connection refused"), tmp_path) is None
    assert disk_failure(PermissionError(errno.EPERM, "Operation not permitted"), tmp_path) is None  # os.kill's
    assert disk_failure(RuntimeError("PytorchStreamReader failed reading zip archive"), tmp_path) is None  # a read
    looped = RuntimeError("a")
    looped.__context__ = ValueError("b")
    looped.__context__.__context__ = looped  # a cycle in the chain ends the walk
    assert disk_failure(looped, tmp_path) is None


def test_a_job_whose_folder_cannot_be_written_fails_in_one_line(tmp_path):
    """Through the worker's own entry point: the job is failed with the one line (no traceback in its log).
    chattr +i stands in for a folder the job may not write (root ignores file modes)."""
    import shutil

    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    home = tmp_path / "home"
    store = JobStore(Settings(home=home).database_url)
    job = store.create(1, "cnn", "local", "webhook")
    (home / "jobs").mkdir(parents=True)
    if subprocess.run(["chattr", "+i", str(home / "jobs")], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not permitted here")
    try:
        proc = subprocess.run([sys.executable, "-m", "backend.training.worker", str(job.id)], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "TANDEM_HOME": str(home)})
    finally:
        subprocess.run(["chattr", "-i", str(home / "jobs")], check=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert f"error: Operation not permitted ({home / 'jobs' / str(job.id)}): fix its permissions under {home / 'jobs'}" \
        in proc.stdout
    done = store.get(job.id)
    assert done.status is JobStatus.FAILED and done.error.startswith("Operation not permitted (")
