"""The predict job on its GPU engine (`--engine pipeline`), run here on the pipeline's CPU path: fed the encoded
bytes the real fetcher reads (local files), it stores the same predictions as the adapter engine, EXIF-rotated
JPEGs and PNGs included (both decode every pixel: the pipeline always does, so the adapter engine's reduced JPEG
decode is switched off here; its own parity is tests/test_reduced_decode.py); a corrupt image fails its own task with the reason; a rerun predicts nothing again.
Label Studio's two boundaries (the task pager and the bulk writer) are small in-memory implementations of the
job's protocols; the model, the store (SQLite) and the fetcher are the real ones."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from backend.batch.gpu_engine import choose_engine, pipeline_chunk_predictor, pipeline_for
from backend.batch.predict_job import JobOptions, PredictJob
from backend.batch.records import Progress
from backend.batch.tasks import TaskRef
from backend.datasets.shapes import generate_samples
from backend.errors import ConfigError
from backend.media.fetch import MediaFetcher, MediaSettings
from backend.predict import plan_for, task_key
from backend.storage.predictions import PredictionRepo, PredictionRow
from tests.test_server import RECT
from tests.test_yolo_gpu_pipeline import BOX_TOL, SCORE_TOL, encode

pytestmark = pytest.mark.timeout(300)


class MemoryTasks:
    def __init__(self, refs: list[TaskRef], page: int = 4) -> None:
        self.refs, self.page = refs, page

    def count(self) -> int:
        return len(self.refs)

    def pages(self) -> Iterator[list[TaskRef]]:
        for start in range(0, len(self.refs), self.page):
            yield self.refs[start:start + self.page]


class MemoryWriter:
    def __init__(self) -> None:
        self.items: dict[int, Mapping[str, Any]] = {}

    def write(self, items: Sequence[tuple[int, Mapping[str, Any]]]) -> int:
        for tid, item in items:
            assert tid not in self.items, f"task {tid} written twice"
            self.items[tid] = item
        return len(items)

    def drop(self, task_ids: Sequence[int], model_version: str) -> int:
        gone = [tid for tid in task_ids if tid in self.items and self.items[tid]["model_version"] == model_version]
        for tid in gone:
            del self.items[tid]
        return len(gone)


class CountingFetcher(MediaFetcher):
    """The real fetcher, counting which kind of load the job asked for."""

    def __init__(self, settings: MediaSettings) -> None:
        super().__init__(settings)
        self.decoded = self.encoded = 0

    def load(self, url, task_id=None, deadline=None, min_side=None):
        self.decoded += 1
        return super().load(url, task_id, deadline, min_side)

    def load_bytes(self, url, task_id=None, deadline=None):
        self.encoded += 1
        return super().load_bytes(url, task_id, deadline)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[MediaSettings, list[TaskRef]]:
    """12 tasks: JPEGs with EXIF rotations and sizes, PNGs, a grey JPEG, one corrupt file (task 112)."""
    root = tmp_path_factory.mktemp("images")
    files: dict[str, bytes] = {}
    for i, (img, _) in enumerate(generate_samples(11, seed=24, size=(320, 240))):
        if i < 6:
            files[f"{i}.jpg"] = encode(img if i % 2 else img.resize((300, 260)), "JPEG", orientation=(1, 6, 8, 3, 5, 2)[i])
        elif i < 10:
            files[f"{i}.png"] = encode(img if i % 2 else img.resize((400, 230)), "PNG")
        else:
            files[f"{i}.jpg"] = encode(img.convert("L"), "JPEG", orientation=6)
    files["corrupt.jpg"] = b"\xff\xd8\xff\xe0 not really a JPEG"
    for name, data in files.items():
        (root / name).write_bytes(data)
    refs = [TaskRef(101 + i, {"image": f"/data/local-files/?d={name}"}, frozenset())
            for i, name in enumerate(files)]
    return MediaSettings(local_files_root=root), refs


def run_job(plan, media, refs, db, engine: str, adapter=None) -> tuple[PredictJob, MemoryWriter, PredictionRepo,
                                                                        CountingFetcher]:
    media = dataclasses.replace(media, reduced_decode=False)  # the same pixels in both engines
    store, writer, fetcher = PredictionRepo(f"sqlite:///{db}"), MemoryWriter(), CountingFetcher(media)
    options = JobOptions(concurrency=2, batch=5)
    if engine == "pipeline":
        pipeline = pipeline_for(adapter, media.max_pixels)
        job = PredictJob(plan, MemoryTasks(refs), fetcher, store, writer, 7, options,
                         predict_chunk=pipeline_chunk_predictor(plan, pipeline), encoded=True)
    else:
        pipeline = None
        job = PredictJob(plan, MemoryTasks(refs), fetcher, store, writer, 7, options)
    try:
        job.run()
    finally:
        fetcher.close()
        if pipeline is not None:
            pipeline.close()
    return job, writer, store, fetcher


def test_pipeline_engine_stores_what_the_adapter_engine_stores(detect_adapter, project, tmp_path):
    media, refs = project
    plan = plan_for(detect_adapter, RECT)
    a_job, a_writer, a_store, a_fetch = run_job(plan, media, refs, tmp_path / "a.sqlite3", "adapter")
    p_job, p_writer, p_store, p_fetch = run_job(plan, media, refs, tmp_path / "p.sqlite3", "pipeline", detect_adapter)
    assert (a_fetch.decoded, a_fetch.encoded) == (12, 0)
    assert (p_fetch.decoded, p_fetch.encoded) == (0, 12)  # bytes in: decoding is the pipeline's

    for job in (a_job, p_job):
        p = job.progress
        assert (p.total, p.done, p.predicted, p.written, p.failed, p.remaining) == (12, 11, 11, 11, 1, 0)
        assert list(p.failures) == ["112"]
        assert "corrupt or not an image" in p.failures["112"] and "corrupt.jpg" in p.failures["112"]

    tasks = [r.as_task() for r in refs[:11]]
    keys = [task_key(t, plan) for t in tasks]
    a_items, p_items = a_store.get_items(keys), p_store.get_items(keys)
    a_typed, p_typed = a_store.get_controls(keys), p_store.get_controls(keys)
    assert len(a_items) == len(p_items) == 11
    boxes = 0
    for task, key in zip(tasks, keys, strict=True):
        ai, pi = a_items[key], p_items[key]
        assert p_writer.items[task["id"]] == pi and a_writer.items[task["id"]] == ai  # stored = written
        assert pi["model_version"] == ai["model_version"] == plan.version
        assert pi["score"] == pytest.approx(ai["score"], abs=SCORE_TOL)
        assert len(pi["result"]) == len(ai["result"])
        for ra, rp in zip(ai["result"], pi["result"], strict=True):
            assert (rp["original_width"], rp["original_height"]) == (ra["original_width"], ra["original_height"])
            assert rp["value"]["rectanglelabels"] == ra["value"]["rectanglelabels"]
            tol = 100 * BOX_TOL / min(ra["original_width"], ra["original_height"])  # half a pixel, in percent
            for field in ("x", "y", "width", "height"):
                assert rp["value"][field] == pytest.approx(ra["value"][field], abs=tol)
            assert rp["score"] == pytest.approx(ra["score"], abs=SCORE_TOL)
        da, dp = a_typed[key]["label"].detections, p_typed[key]["label"].detections
        boxes += len(da)
        assert dp.class_id.tolist() == da.class_id.tolist()
        np.testing.assert_allclose(dp.xyxy, da.xyxy, atol=BOX_TOL)
        np.testing.assert_allclose(dp.confidence, da.confidence, atol=SCORE_TOL)
        np.testing.assert_allclose(dp.data["class_scores"], da.data["class_scores"], atol=SCORE_TOL)
    assert boxes >= 8, "the starter model should find shapes here"
    rotated = p_items[keys[1]]["result"]  # EXIF 6 on a 320x240 JPEG: shown 240 wide, 320 high
    assert rotated and (rotated[0]["original_width"], rotated[0]["original_height"]) == (240, 320)

    # resumed on the same store: nothing predicted twice, the corrupt image fails again with its reason
    again, writer, _, _ = run_job(plan, media, [TaskRef(r.id, r.data, frozenset({plan.version}))
                                                for r in refs], tmp_path / "p.sqlite3", "pipeline", detect_adapter)
    assert (again.progress.predicted, again.progress.done, again.progress.failed) == (0, 11, 1)
    assert writer.items == {}


def test_auto_picks_the_pipeline_only_on_cuda_for_yolo_detect_segment(detect_adapter, classify_adapter):
    assert choose_engine("auto", detect_adapter) == "adapter"  # on the CPU the adapter (OpenVINO) pays better
    assert choose_engine("adapter", detect_adapter) == "adapter"
    assert choose_engine("pipeline", detect_adapter) == "pipeline"
    on_gpu = copy.copy(detect_adapter)
    on_gpu.device = "cuda:0"  # the rule reads the served device only
    assert choose_engine("auto", on_gpu) == "pipeline"
    classify_on_gpu = copy.copy(classify_adapter)
    classify_on_gpu.device = "cuda:0"
    assert choose_engine("auto", classify_on_gpu) == "adapter"
    with pytest.raises(ConfigError, match="classify model"):
        choose_engine("pipeline", classify_adapter)
    with pytest.raises(ConfigError, match="unknown predict engine"):
        choose_engine("fast", detect_adapter)


def test_read_ahead_keeps_order_raises_where_it_failed_and_stops_with_its_consumer():
    import threading
    import time

    from backend.core.read_ahead import read_ahead

    assert list(read_ahead(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise ConnectionError("Label Studio went away")

    got = read_ahead(failing())
    assert next(got) == 1
    with pytest.raises(ConnectionError, match="went away"):
        next(got)

    produced = []

    def endless():
        for i in range(10**6):
            produced.append(i)
            yield i

    reader = read_ahead(endless(), depth=1)
    assert [next(reader) for _ in range(3)] == [0, 1, 2]
    reader.close()  # a cancelled job
    time.sleep(0.5)
    stopped_at = len(produced)
    time.sleep(0.3)
    assert len(produced) == stopped_at <= 6  # at most an item or two ahead, then it stopped
    assert not [t for t in threading.enumerate() if t.name == "tandem-read-ahead"]  # every producer has ended


class RecordingWriter(MemoryWriter):
    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []
        self.requests: list[list[int]] = []  # the task ids of each request, in order

    def write(self, items: Sequence[tuple[int, Mapping[str, Any]]]) -> int:
        self.sizes.append(len(items))
        self.requests.append([tid for tid, _ in items])
        return super().write(items)


def test_label_studio_writes_grow_with_what_was_written_and_never_pass_the_cap(detect_adapter, tmp_path):
    """30 tasks in chunks of 3, writes from 2 up to 8: each write as large as twice what went before (Label
    Studio 1.23 recounts the whole project per request), a write handed over early rather than passing the cap."""
    for i, (img, _) in enumerate(generate_samples(30, seed=31, size=(200, 150))):
        (tmp_path / f"{i}.jpg").write_bytes(encode(img, "JPEG"))
    refs = [TaskRef(500 + i, {"image": f"/data/local-files/?d={i}.jpg"}, frozenset()) for i in range(30)]
    plan = plan_for(detect_adapter, RECT)
    writer, fetcher = RecordingWriter(), MediaFetcher(MediaSettings(local_files_root=tmp_path))
    store = PredictionRepo(f"sqlite:///{tmp_path / 'w.sqlite3'}")
    options = JobOptions(concurrency=2, batch=3, write_batch=2, max_write_batch=8)
    try:
        progress = PredictJob(plan, MemoryTasks(refs, page=7), fetcher, store, writer, 9, options).run()
    finally:
        fetcher.close()
    assert (progress.done, progress.written, progress.failed) == (30, 30, 0)
    assert sorted(writer.items) == [r.id for r in refs]
    # by hand: 3 (threshold 2), 6 (6), 6 (8: a third chunk would make 9 > 8, so handed over at 6), 6 and 6
    # (likewise), and the last 3 when the job ends
    assert writer.sizes == [3, 6, 6, 6, 6, 3]


def _thirty_tasks(tmp_path) -> list[TaskRef]:
    for i, (img, _) in enumerate(generate_samples(30, seed=31, size=(200, 150))):
        (tmp_path / f"{i}.jpg").write_bytes(encode(img, "JPEG"))
    return [TaskRef(500 + i, {"image": f"/data/local-files/?d={i}.jpg"}, frozenset()) for i in range(30)]


def _run(plan, refs, tmp_path, writer, options, page=7, db="w.sqlite3") -> Progress:
    fetcher = MediaFetcher(MediaSettings(local_files_root=tmp_path))
    store = PredictionRepo(f"sqlite:///{tmp_path / db}")
    try:
        return PredictJob(plan, MemoryTasks(refs, page=page), fetcher, store, writer, 9, options).run()
    finally:
        fetcher.close()
        store.close()


def test_predictions_stored_but_missing_from_label_studio_are_written_in_growing_requests(detect_adapter, tmp_path):
    """A run killed between the store and Label Studio leaves stored predictions Label Studio lacks; the next
    run writes them as it writes fresh ones (each request a whole-project recount in Label Studio 1.23), not one
    request per page of tasks, and predicts none of them again."""
    refs, plan = _thirty_tasks(tmp_path), plan_for(detect_adapter, RECT)
    first = MemoryWriter()
    _run(plan, refs, tmp_path, first, JobOptions(concurrency=2, batch=3))
    again = RecordingWriter()
    options = JobOptions(concurrency=2, batch=3, write_batch=2, max_write_batch=16)
    progress = _run(plan, refs, tmp_path, again, options)  # Label Studio shows none of them (versions empty)
    assert (progress.done, progress.predicted, progress.written, progress.failed) == (30, 0, 30, 0)
    assert again.items == first.items  # what was stored, read back and written, not predicted again
    # by hand, pages of 7: 7 (threshold 2), 7 + 7 = 14 (threshold 14), 7 + 2 = 9 when the job ends (threshold
    # 16); one request per page would have been 7, 7, 7, 7, 2
    assert again.sizes == [7, 14, 9]


def test_a_write_past_max_request_bytes_goes_in_several_requests_each_within_it(detect_adapter, tmp_path):
    """Large predictions (brush masks, hundreds of regions) must not make one request Label Studio or a proxy
    refuses: a write is cut where its JSON would pass `max_request_bytes`; an item larger alone goes alone."""
    refs, plan = _thirty_tasks(tmp_path), plan_for(detect_adapter, RECT)
    whole = RecordingWriter()
    _run(plan, refs, tmp_path, whole, JobOptions(concurrency=2, batch=3))
    sizes = {tid: len(json.dumps(item)) for tid, item in whole.items.items()}  # as the store holds them
    assert whole.sizes == [30]  # 256 a request at first: the whole project at once
    budget = 3 * int(np.median(list(sizes.values())))
    cut = RecordingWriter()  # predicted again, into another store
    progress = _run(plan, refs, tmp_path, cut, JobOptions(concurrency=2, batch=3, max_request_bytes=budget),
                    db="cut.sqlite3")
    assert (progress.done, progress.predicted, progress.written) == (30, 30, 30)
    unnamed = lambda items: {t: [{**r, "id": None} for r in i["result"]] for t, i in items.items()}  # noqa: E731
    assert unnamed(cut.items) == unnamed(whole.items)  # the same predictions (region ids are drawn afresh)
    assert len(cut.requests) >= -(-sum(sizes.values()) // budget)
    for request in cut.requests:
        assert len(request) == 1 or sum(sizes[t] for t in request) <= budget
    # greedy: a request ends only where the next prediction would not fit
    for request, following in zip(cut.requests, cut.requests[1:]):
        assert sum(sizes[t] for t in request) + sizes[following[0]] > budget


def test_the_writer_reads_large_predictions_back_about_a_request_at_a_time(detect_adapter, tmp_path):
    """300 stored predictions of ~47 KB (a brush mask's RLE) and a 400 KB request budget: requests of 8, each
    within the budget, read back from the store 64 first, then slices sized by what the first weighed, never
    all 300 (14 MB) at once."""
    plan = plan_for(detect_adapter, RECT)
    store = PredictionRepo(f"sqlite:///{tmp_path / 'masks.sqlite3'}")
    rle = list(range(256)) * 40
    keys = [(1000 + i, plan.version, "fp") for i in range(300)]
    store.put_many(PredictionRow(*key, 9, plan.name, "pre-annotation",
                                 {"result": [{"type": "brushlabels", "value": {"format": "rle", "rle": rle}}],
                                  "model_version": plan.version}, {}) for key in keys)
    text = len(store.get_item_texts(keys[:1])[keys[0]])
    slices: list[int] = []
    read = store.get_item_texts
    store.get_item_texts = lambda ks: (slices.append(len(ks)), read(ks))[1]  # the real read, its sizes recorded
    fetcher = MediaFetcher(MediaSettings(local_files_root=tmp_path))
    try:
        job = PredictJob(plan, MemoryTasks([]), fetcher, store, MemoryWriter(), 9, JobOptions(max_request_bytes=400_000))
        parts = list(job._request_parts([(key[0], key) for key in keys]))
    finally:
        fetcher.close()
        store.close()
    per_request = 400_000 // text
    assert per_request == 8  # 40 x (10 + 180 + 468 digits + 256 ", "): ~47 KB a prediction
    assert [len(p) for p in parts] == [8] * 37 + [4]
    assert [tid for p in parts for tid, _ in p] == [k[0] for k in keys]
    assert parts[0][0][1]["result"][0]["value"]["rle"] == rle
    assert slices[0] == 64 and set(slices[1:-1]) == {per_request} and sum(slices) == 300


def test_a_job_with_nothing_to_predict_still_stops_when_cancelled(detect_adapter, tmp_path):
    """Pages of stored predictions yield no chunk to predict; cancelling must not wait for the whole project to
    be paged: the job stops after the page in hand, with what it handed written, and a rerun writes the rest."""
    from backend.batch.predict_job import Cancelled

    refs, plan = _thirty_tasks(tmp_path), plan_for(detect_adapter, RECT)
    _run(plan, refs, tmp_path, MemoryWriter(), JobOptions(concurrency=2, batch=3))
    stopped = RecordingWriter()
    fetcher = MediaFetcher(MediaSettings(local_files_root=tmp_path))
    store = PredictionRepo(f"sqlite:///{tmp_path / 'w.sqlite3'}")
    job = PredictJob(plan, MemoryTasks(refs, page=7), fetcher, store, stopped, 9, JobOptions(write_batch=2),
                     should_stop=lambda: True)
    try:
        with pytest.raises(Cancelled):
            job.run()
    finally:
        fetcher.close()
        store.close()
    assert sorted(stopped.items) == [r.id for r in refs[:7]]  # the first page, written before it stopped
    assert (job.progress.done, job.progress.written) == (7, 7)
    rest = MemoryWriter()
    shown = [TaskRef(r.id, r.data, frozenset({plan.version}) if r.id in stopped.items else frozenset()) for r in refs]
    progress = _run(plan, shown, tmp_path, rest, JobOptions(concurrency=2, batch=3))
    assert (progress.done, progress.predicted, progress.written) == (30, 0, 23)
    assert sorted(rest.items) == [r.id for r in refs[7:]]
