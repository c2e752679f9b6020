"""Whole-project pre-annotation (`tandem predict`) on a real Label Studio, with the fastest CPU engine.

1. `--tasks` generated 640x480 JPEGs (the shapes set) uploaded into a new Label Studio 1.23 project: Label
   Studio's own import time.
2. The local predict job on the whole project (OpenVINO engine, in this process): tasks/s from the job's
   start (model loaded) to its end, peak RSS; and the raw engine's images/s on the first `--raw` of the same
   images, in batches of the job's size, measured in this same process after the job (`raw_baselines`): from
   the files with a whole decode (target: job tasks/s >= 0.9x this), from the files with the job's own
   reduced decode, and on images decoded beforehand.
3. "Retrieve predictions" on 1,000 stored tasks: the Tandem server's /predict called as Label Studio calls
   it (every selected task in one request, the tasks as Label Studio serialises them), and Label Studio's
   own "Retrieve predictions" action on the same 1,000 tasks (wall time including Label Studio). Target < 5 s.
4. Resume: a second project of `--resume-tasks` tasks (the same uploaded images), `tandem predict` in a
   subprocess killed with SIGKILL at ~50 % stored, then run again: total predictions == tasks, none twice.

    uv run python benchmarks/predict_job.py [--tasks 5000] [--resume-tasks 1000] [--out benchmarks/results/predict_job.md]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

RECT = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="square"/><Label value="circle"/><Label value="triangle"/>
  </RectangleLabels>
</View>"""


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (Label Studio runs its server under a launcher)."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (every core), to show what else took the cores."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def _write_images(folder: Path, count: int, chunk: int = 200) -> None:
    from backend.datasets.shapes import generate_samples

    for start in range(0, count, chunk):  # a chunk at a time: 5,000 decoded 640x480 images would take 4.6 GB
        paths = [folder / f"img_{i:05d}.jpg" for i in range(start, min(start + chunk, count))]
        if all(p.is_file() for p in paths):
            continue
        for path, (img, _) in zip(paths, generate_samples(len(paths), seed=5 + start, size=(640, 480)), strict=True):
            img.convert("RGB").save(path, quality=90)


def make_images(folder: Path, count: int) -> list[Path]:
    """`count` 640x480 JPEGs (quality 90), reused when already there; made in a child process, so this process's
    peak RSS is the job's, not the generator's."""
    import multiprocessing

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img_{i:05d}.jpg" for i in range(count)]
    if not all(p.is_file() for p in paths):
        child = multiprocessing.get_context("spawn").Process(target=_write_images, args=(folder, count))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"making the images failed (exit {child.exitcode})")
    return paths


def raw_baselines(adapter, paths: list[Path], batch: int, job_rate: float, max_pixels: int) -> str:
    """The raw engine's images/s on `paths`, one loop in this process, no Label Studio and no store:
    - files, whole decode: read each file, decode every pixel, predict (what `YOLO(...).predict(paths)` does);
      the job is held to 0.9x of this;
    - files, the job's decode: read, decode reduced as the job does (`decode_sized` at the model's input side),
      predict, scale the boxes back: the job's own work without the job;
    - pre-decoded: the images decoded beforehand, inference alone (the engine's ceiling)."""
    from PIL import Image

    from backend.media.fetch import decode_sized

    side = getattr(adapter, "decode_side", None)

    def from_files(min_side: int | None) -> float:
        t0 = time.perf_counter()
        for start in range(0, len(paths), batch):
            decoded = [decode_sized(p.read_bytes(), p.name, max_pixels, min_side=min_side)
                       for p in paths[start : start + batch]]
            outs = adapter.predict([img for img, _ in decoded])
            for (img, (w, h)), out in zip(decoded, outs, strict=True):
                out.scaled(w / img.width, h / img.height)
        return len(paths) / (time.perf_counter() - t0)

    adapter.predict([Image.open(paths[0]).convert("RGB")] * batch)  # warm
    whole, reduced = from_files(None), from_files(side)
    raw = [Image.open(io.BytesIO(p.read_bytes())).convert("RGB") for p in paths]
    t0 = time.perf_counter()
    for start in range(0, len(raw), batch):
        adapter.predict(raw[start : start + batch])
    predecoded = len(raw) / (time.perf_counter() - t0)
    return (f"raw engine on {len(paths)} of the same images: files with whole decode {whole:.2f} images/s "
            f"(job/raw = {job_rate / whole:.3f}, target >= 0.9); files with the job's decode (side {side}) "
            f"{reduced:.2f} images/s (job/raw = {job_rate / reduced:.3f}); pre-decoded {predecoded:.2f} images/s "
            f"(job/raw = {job_rate / predecoded:.3f})")


def weights(home: Path) -> Path:
    from backend.models.starter import train_starter_model

    cache = ROOT / ".test-cache" / "home"
    found = cache / "models" / "starter" / "shapes-yolov8n-detect.pt"
    return found if found.is_file() else train_starter_model(cache, "detect")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--resume-tasks", type=int, default=1000)
    parser.add_argument("--raw", type=int, default=500, help="images for the raw engine's rate")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--retrieve", type=int, default=1000)
    parser.add_argument("--media", choices=("local", "upload"), default="local",
                        help="local: tasks name the JPEGs as Label Studio local files, read from disk by Tandem "
                             "(LOCAL_FILES_DOCUMENT_ROOT); upload: uploaded into Label Studio, fetched from it")
    parser.add_argument("--imgsz", type=int, default=None, help="inference size (default: the model's own, 160)")
    parser.add_argument("--ls-fast-import", action="store_true",
                        help="start Label Studio with its batched prediction import flag on "
                             "(MEMORY_EFFICIENT_IMPORT_FLAG; off by default in Label Studio 1.23)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tandem-predict-bench")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "predict_job.md")
    args = parser.parse_args()

    import httpx
    from label_studio_sdk import LabelStudio

    from backend.batch.predict_job import JobOptions
    from backend.batch.records import PredictJobs
    from backend.batch.runner import run_project
    from backend.dev.local_label_studio import MEMORY_EFFICIENT_IMPORT_FLAG, start_label_studio, upload_images
    from backend.dev.server_thread import ServerThread
    from backend.server.app import create_app
    from backend.serving import ModelHolder
    from backend.settings import Settings
    from backend.storage.predictions import PredictionRepo

    work = args.work
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    images = make_images(work / "images", args.tasks)
    home = Path(tempfile.mkdtemp(prefix="home-", dir=work))
    w = weights(home)
    ls = start_label_studio(Path(tempfile.mkdtemp(prefix="ls-", dir=work)),
                            extra_env={MEMORY_EFFICIENT_IMPORT_FLAG: "true"} if args.ls_fast_import else None)
    try:
        client = LabelStudio(base_url=ls.url, api_key=ls.token)
        settings = Settings(home=home, label_studio_url=ls.url, label_studio_api_key=ls.token, engine="openvino",
                            imgsz=args.imgsz, local_files_root=(work / "images") if args.media == "local" else None)
        adapter = settings.load_cnn(w)  # exported to OpenVINO once, parity-checked (cached under the home)
        say(f"model {adapter.version}, engine {getattr(adapter, 'engine', '?')}, imgsz {adapter.imgsz}, media "
            f"{args.media}; {os.cpu_count()} CPUs "
            f"({platform.processor() or platform.machine()}), load average {os.getloadavg()[0]:.1f} before the run")

        # 1. Label Studio's own import
        project = client.projects.create(title=f"bench {args.tasks}", label_config=RECT).id
        t0 = time.perf_counter()
        if args.media == "upload":
            upload_images(ls.url, ls.token, project, {p.name: p.read_bytes() for p in images})
        else:
            for start in range(0, len(images), 1000):
                client.projects.import_tasks(project, request=[{"image": f"/data/local-files/?d={p.name}"}
                                                               for p in images[start : start + 1000]],
                                             request_options={"timeout_in_seconds": 600})
        import_s = time.perf_counter() - t0
        what = "JPEG uploads" if args.media == "upload" else "tasks naming local files (JSON import)"
        say(f"Label Studio import: {args.tasks} {what} in {import_s:.1f} s ({args.tasks / import_s:.1f} tasks/s)")

        # 2. the job
        rss_before = peak_rss_mb()
        cpu_t0, cpu_before = time.perf_counter(), (cpu_seconds(ls.process.pid), time.process_time(),
                                                    machine_busy_seconds())
        marks: list[float] = []
        last_predicted = {"count": -1, "at": 0.0}  # when the job's last prediction was stored

        def on_progress(p) -> None:
            now = time.perf_counter()
            marks or marks.append(now)
            if p.predicted != last_predicted["count"]:
                last_predicted.update(count=p.predicted, at=now)

        record, result = run_project(settings, project, model=str(w),
                                     options=JobOptions(concurrency=args.concurrency, batch=args.batch),
                                     on_progress=on_progress)
        job_s = time.perf_counter() - marks[0]
        tail_s = marks[0] + job_s - last_predicted["at"]
        job_rate = result.predicted / job_s
        job_peak = peak_rss_mb()
        call_s = time.perf_counter() - cpu_t0
        ls_cpu, own_cpu, busy = (cpu_seconds(ls.process.pid) - cpu_before[0], time.process_time() - cpu_before[1],
                                 machine_busy_seconds() - cpu_before[2])
        say(f"job {record.id}: {record.status}, {result.done}/{result.total} done, {result.failed} failed, "
            f"{result.predicted} predicted, {result.written} written in {job_s:.1f} s = {job_rate:.2f} tasks/s; "
            f"peak RSS {job_peak:.0f} MB (before the job {rss_before:.0f} MB); after the last prediction was "
            f"stored the job waited {tail_s:.1f} s for Label Studio's last import")
        say(f"CPU seconds over the job's whole call ({call_s:.1f} s wall, loading the model included): Tandem's "
            f"process {own_cpu:.1f}, Label Studio's {ls_cpu:.1f}, the whole machine {busy:.1f} of "
            f"{call_s * (os.cpu_count() or 1):.1f} available")
        assert result.done == args.tasks and result.failed == 0

        # the raw engine on the same images, same batch size, same process, after the job: three baselines
        say(raw_baselines(adapter, images[: args.raw], args.batch, job_rate, settings.max_image_pixels))

        # 3. Retrieve predictions on 1,000 stored tasks
        headers = {"Authorization": f"Token {ls.token}"}
        listed = httpx.get(f"{ls.url}/api/tasks", params={"project": project, "page_size": args.retrieve,
                                                          "page": 1, "fields": "all"}, headers=headers,
                           timeout=300).json()
        tasks = listed["tasks"] if isinstance(listed, dict) else listed
        label_config = client.projects.get(project).label_config
        app = create_app(settings, ModelHolder(adapter), training=False)
        with ServerThread(app) as srv:
            body = {"tasks": tasks, "label_config": label_config, "project": f"{project}.1700000000",
                    "params": {"login": None, "password": None, "context": None}}
            t0 = time.perf_counter()
            answer = httpx.post(f"{srv.url}/predict", json=body, timeout=300).json()
            predict_s = time.perf_counter() - t0
            ok = sum(1 for item in answer["results"] if "result" in item)
            say(f"/predict on {len(tasks)} stored tasks (one call, as Label Studio sends them): {predict_s:.2f} s, "
                f"{ok} answered from the store (target < 5 s)")
            client.ml.create(project=project, url=srv.url, title="Tandem", is_interactive=False)
            ids = [t["id"] for t in tasks]
            t0 = time.perf_counter()
            client.actions.create(id="retrieve_tasks_predictions", project=project,
                                  selected_items={"all": False, "included": ids},
                                  request_options={"timeout_in_seconds": 600})
            action_s = time.perf_counter() - t0
            say(f"Label Studio's Retrieve predictions action on the same {len(ids)} tasks: {action_s:.2f} s wall "
                f"(Tandem's /predict plus Label Studio storing what it got)")

        # 4. resume after kill -9
        m = min(args.resume_tasks, args.tasks)
        second = client.projects.create(title=f"bench resume {m}", label_config=RECT).id
        client.projects.import_tasks(second, request=[{"image": t["data"]["image"]} for t in
                                                       httpx.get(f"{ls.url}/api/tasks", params={
                                                           "project": project, "page_size": m, "page": 1},
                                                                 headers=headers, timeout=300).json()["tasks"]])
        env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "backend.cli", "predict", "--project", str(second), "--model", str(w),
               "--batch", str(args.batch), "--quiet"]
        store = PredictionRepo(settings.database_url)
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while store.count(second) < m // 2 and proc.poll() is None:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        at_kill = store.count(second)
        t0 = time.perf_counter()
        again = subprocess.run(cmd, check=False, env=env, cwd=ROOT, capture_output=True, text=True)
        resume_s = time.perf_counter() - t0
        assert again.returncode == 0, again.stderr[-2000:]
        job = PredictJobs(settings.database_url).list(second)[0]
        ls_total = client.projects.get(second).total_predictions_number
        per_task = [t.total_predictions for t in client.tasks.list(project=second, page_size=500, fields="all")]
        say(f"resume: {m} tasks, kill -9 at {at_kill} stored; the restart took over job {job.id} and predicted "
            f"{job.progress['predicted']} (= {m} - {at_kill}: {job.progress['predicted'] == m - at_kill}) in "
            f"{resume_s:.1f} s; stored {store.count(second)}, Label Studio predictions {ls_total}, tasks with "
            f"exactly one: {sum(1 for n in per_task if n == 1)}/{len(per_task)}")
        assert store.count(second) == m and ls_total == m and all(n == 1 for n in per_task)
    finally:
        ls.stop()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# Whole-project pre-annotation job (`benchmarks/predict_job.py`)\n\n"
                        f"`uv run python benchmarks/predict_job.py {' '.join(sys.argv[1:])}` (batch {args.batch}, "
                        f"concurrency {args.concurrency}), "
                        f"{time.strftime('%Y-%m-%d')}.\n\n" + "\n".join(f"- {line}" for line in lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
