"""The pre-annotation engine: page through a project's tasks, predict what the store lacks, store, write.

Resumable by construction: the prediction store is the ledger. A chunk's predictions are written to the
store (synchronously) before they are written into Label Studio and counted done, so a job killed at any
point and run again predicts only tasks with no stored prediction for this version and key, and writes into
Label Studio the stored ones Label Studio does not show yet (a kill between the two writes) — no task is
predicted twice. The keys are /predict's (`task_key` under the same `ServingPlan`), so "Retrieve
predictions" afterwards answers from the store.

Memory is bounded: one page of task references, and at most two chunks of images (decoded, or their bytes for
the GPU engine): the one being predicted and the next, fetched meanwhile by `concurrency` threads. Label
Studio's bulk import of a chunk runs on a writer thread beside the next chunks' inference (at most two
requests queued). Its requests grow with what this run has handed to the writer (`write_threshold`): Label
Studio 1.23's default prediction import recounts every task of the project that has a prediction on every
request, so a fixed request size makes its work grow with the square of the project's size. Held for the
writer: task ids and store keys only (at most three writes of up to `max_write_batch`: two queued, one
filling); the writer reads each write's predictions back from the store when it sends it, a slice of about
`max_request_bytes` of JSON at a time, and a write whose JSON would pass `max_request_bytes` goes in several
requests: what the writer holds is about one slice's text and one request's predictions.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Protocol

from backend.batch.records import Progress
from backend.batch.tasks import TaskRef
from backend.errors import MediaError
from backend.media.fetch import LoadedImage
from backend.predict import Predictor, ServingPlan, image_url, task_key
from backend.storage.predictions import Key, PredictionRepo, PredictionRow

log = logging.getLogger("tandem.batch")
READ_BACK = (64, 1024)  # predictions the writer reads back at a time: first, and at most (sized to the bytes)

MAX_FAILURES_KEPT = 100


class TaskSource(Protocol):
    def count(self) -> int: ...
    def pages(self) -> Iterator[list[TaskRef]]: ...


class Writer(Protocol):
    def write(self, items: Sequence[tuple[int, Mapping[str, Any]]]) -> int: ...
    def drop(self, task_ids: Sequence[int], model_version: str) -> int: ...


class ImageLoader(Protocol):
    def load(self, url: str, task_id: int | None = None, deadline: float | None = None,
             min_side: int | None = None) -> LoadedImage: ...


class BytesLoader(Protocol):
    """What a job whose chunks decode their own images (the GPU engine) fetches with: encoded bytes."""

    def load_bytes(self, url: str, task_id: int | None = None, deadline: float | None = None) -> bytes: ...


@dataclass(frozen=True)
class JobOptions:
    concurrency: int = 4  # parallel image fetches
    batch: int = 16  # tasks per chunk: one inference call, one store write
    write_batch: int = 256  # predictions per Label Studio bulk import at first; grows with what is written
    max_write_batch: int = 16384  # ... up to this many a write (read back from the store when sent)
    max_request_bytes: int = 32 * 2**20  # a write's JSON past this goes in several requests (masks, many regions)
    role: str = "pre-annotation"
    redo_unstamped: bool = False  # predict again what an older Tandem stored without its thresholds (before 0004)


class Cancelled(Exception):
    pass


class _Prefetched:
    """The fetcher the Predictor sees for one chunk: images (or their bytes) fetched ahead by the job's threads."""

    def __init__(self) -> None:
        self.ready: dict[tuple[int | None, str], Future] = {}

    def load(self, url: str, task_id: int | None = None, deadline: float | None = None,
             min_side: int | None = None) -> LoadedImage:  # fetched (and sized) by the job's threads already
        future = self.ready.get((task_id, url))
        if future is None:
            raise MediaError(f"{url}: not fetched")
        result = future.result()
        if isinstance(result, MediaError):
            raise result
        return result

    load_bytes = load  # the futures hold bytes when the job fetches encoded images

    def close(self) -> None:
        self.ready.clear()


class PredictJob:
    """One run over a project. `on_progress(progress)` is called after every chunk (records, bars, metrics);
    `should_stop()` is checked between chunks (a cancelled job stops after the chunk in hand).
    `encoded`: fetch encoded bytes (`fetcher.load_bytes`), not decoded images, for a `predict_chunk` that
    decodes them itself (the GPU engine, backend/batch/gpu_engine.py)."""

    def __init__(self, plan: ServingPlan, source: TaskSource, fetcher: ImageLoader, store: PredictionRepo,
                 writer: Writer, project_id: int, options: JobOptions = JobOptions(),
                 on_progress: Callable[[Progress], None] | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 predict_chunk: Callable[[Sequence[Mapping[str, Any]], _Prefetched], list] | None = None,
                 encoded: bool = False) -> None:
        self.plan, self.source, self.fetcher, self.store, self.writer = plan, source, fetcher, store, writer
        self.project_id, self.options, self.encoded = project_id, options, encoded
        if encoded and predict_chunk is None:
            raise ValueError("encoded=True needs a predict_chunk that decodes the bytes")
        self.on_progress = on_progress or (lambda p: None)
        self.should_stop = should_stop or (lambda: False)
        self._prefetched = _Prefetched()
        self._predictor = Predictor(self._prefetched, workers=max(1, options.concurrency), store=None)  # type: ignore[arg-type]
        self._predict_chunk = predict_chunk or self._local_chunk
        self._lock = threading.Lock()
        self._write_pool = ThreadPoolExecutor(1, thread_name_prefix="tandem-job-write")
        self._writes: deque[Future] = deque()
        self._unwritten: list[tuple[int, Key]] = []  # (task id, store key) stored, not yet handed to the writer
        self._handed = 0  # predictions handed to the writer so far
        self._replacing: set[int] = set()  # tasks whose Label Studio prediction of this version is made again
        self.progress = Progress(model_version=plan.version)

    # -- the run ----------------------------------------------------------------------------------------
    def run(self) -> Progress:
        total = self.source.count()
        self._set(total=total, remaining=total)
        pool = ThreadPoolExecutor(max(1, self.options.concurrency), thread_name_prefix="tandem-job-fetch")
        in_flight: deque[tuple[list[dict[str, Any]], dict]] = deque()
        try:
            for chunk in self._chunks_to_predict():
                in_flight.append((chunk, self._fetch(pool, chunk)))  # the next chunk downloads meanwhile
                if len(in_flight) > 1:
                    self._predict(*in_flight.popleft())
                if self.should_stop():
                    self._cancel()
            while in_flight:
                self._predict(*in_flight.popleft())
            self._drain_writes()
        finally:
            self._write_pool.shutdown(wait=True)
            for _, futures in in_flight:
                for f in futures.values():
                    f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            self._predictor.close()
        return self.progress

    def _chunks_to_predict(self) -> Iterator[list[dict[str, Any]]]:
        """Tasks with no stored prediction, in chunks; stored ones Label Studio lacks go to the writer on the way.
        A prediction stored under other thresholds (`made_with`) is made again, as /predict would make it, and
        replaces the one Label Studio holds of this version; so does one made for a task whose config or label
        map changed since Label Studio got this version's prediction."""
        pending: list[dict[str, Any]] = []
        made_with = self.plan.made_with or None
        for page in self.source.pages():
            tasks = [ref.as_task() for ref in page]
            keys = [task_key(t, self.plan) for t in tasks]
            stamps = self.store.stored_stamps([k for k in keys if k is not None])  # one read a page
            unstamped = {k for k, stamp in stamps.items() if stamp is None and made_with is not None}
            stored = {k for k, stamp in stamps.items() if made_with is None or stamp == made_with or
                      (k in unstamped and not self.options.redo_unstamped)}
            stale = stamps.keys() - stored
            if unstamped and not self.options.redo_unstamped:  # kept as they are, and counted so the CLI says so
                with self._lock:
                    self.progress = replace(self.progress, unstamped=self.progress.unstamped + len(unstamped))
            unwritten: list[tuple[int, Key]] = []
            already = 0
            for ref, task, key in zip(page, tasks, keys, strict=True):
                if key is not None and key in stored:
                    if self.plan.version in ref.versions:
                        already += 1
                    else:
                        unwritten.append((ref.id, key))
                    continue
                if key is not None and key in stale:
                    self._redo(ref)
                elif self.plan.version in ref.versions:  # made for another config or label map (a new key): the
                    with self._lock:  # new item replaces this version's old one, or the task shows both
                        self._replacing.add(ref.id)
                pending.append(task)
                if len(pending) >= self.options.batch:
                    yield pending
                    pending = []
            if unwritten:  # a run killed between the store and Label Studio: written like fresh predictions
                self._add(done=len(unwritten))
                self._hand(unwritten)
            if already:
                self._add(done=already)
            if (unwritten or already) and self.should_stop():  # pages with nothing to predict: no chunk checks it
                self._cancel()
        if pending:
            yield pending

    def _redo(self, ref: TaskRef) -> None:
        with self._lock:
            self.progress = replace(self.progress, redone=self.progress.redone + 1)
            if self.plan.version in ref.versions:
                self._replacing.add(ref.id)

    def _fetch(self, pool: ThreadPoolExecutor, chunk: list[dict[str, Any]]) -> dict:
        load = self.fetcher.load_bytes if self.encoded else self.fetcher.load  # type: ignore[attr-defined]

        def one(url: str, tid: int, sized: dict) -> LoadedImage | bytes | MediaError:
            try:
                return load(url, task_id=tid, **sized)
            except MediaError as exc:
                return exc
            except Exception as exc:  # noqa: BLE001 - a task's own failure, never the job's
                return MediaError(f"{url}: {type(exc).__name__}: {exc}")

        futures = {}
        for task in chunk:
            for key in self.plan.image_keys:
                url = image_url(task, key) or ""
                side = None if self.encoded else self.plan.decode_side(key)
                futures[(task["id"], url)] = pool.submit(one, url, task["id"], {"min_side": side} if side else {})
        return futures

    def _local_chunk(self, tasks: Sequence[Mapping[str, Any]], prefetched: _Prefetched) -> list:
        return self._predictor.predict_typed(tasks, self.plan, self.options.role)

    def _predict(self, chunk: list[dict[str, Any]], futures: dict) -> None:
        self._prefetched.ready = futures
        try:
            typed = self._predict_chunk(chunk, self._prefetched)
        finally:
            self._prefetched.close()
        rows, ok, failures = [], [], {}
        for task, (item, controls) in zip(chunk, typed, strict=True):
            if "result" not in item:
                failures[str(task["id"])] = str(item.get("error", "no prediction"))
                continue
            key = task_key(task, self.plan)
            rows.append(PredictionRow(key[0], key[1], key[2], self.project_id, self.plan.name, str(self.options.role),
                                      item, controls, self.plan.made_with or None))
            ok.append((task["id"], key))
        self.store.put_many(rows)  # the ledger first: a task stored is never predicted again
        self._add(done=len(ok), predicted=len(ok), failed=len(failures), failures=failures)
        self._hand(ok)

    def _hand(self, stored: list[tuple[int, Key]]) -> None:
        """Stored predictions toward the next bulk import, handed to the writer at `write_threshold`."""
        cap = self.options.max_write_batch
        for start in range(0, len(stored), cap):
            piece = stored[start : start + cap]
            if self._unwritten and len(self._unwritten) + len(piece) > cap:
                self._flush_writes()  # never a write over the cap (the writer would split it: one more recount)
            self._unwritten.extend(piece)
            if len(self._unwritten) >= write_threshold(self._handed, self.options):
                self._flush_writes()

    def _flush_writes(self) -> None:
        """Label Studio's import runs beside the next chunks' inference; at most two requests queued."""
        if self._unwritten:
            self._writes.append(self._write_pool.submit(self._write, self._unwritten))
            self._handed += len(self._unwritten)
            self._unwritten = []
        while len(self._writes) > 2:
            self._writes.popleft().result()

    def _write(self, ok: list[tuple[int, Key]]) -> None:
        """On the writer thread: the predictions back from the store (the ledger), one bulk import per part."""
        with self._lock:
            replaced = [tid for tid, _ in ok if tid in self._replacing]
            self._replacing.difference_update(replaced)
        if replaced:  # made again under new thresholds: the old item of this version goes, or a task shows two
            self.writer.drop(replaced, self.plan.version)
        for part in self._request_parts(ok):
            self._add(written=self.writer.write(part))

    def _request_parts(self, ok: list[tuple[int, Key]]) -> Iterator[list[tuple[int, Mapping[str, Any]]]]:
        """A write as one request, or as several where its JSON would pass `max_request_bytes` (brush masks or
        hundreds of regions a task: Label Studio refuses a body over 250 MB by default, a proxy often far less).
        Read from the store a slice at a time, each slice sized to hold about `max_request_bytes` of JSON by
        the size of the one before, so a write of large predictions is never all in memory."""
        part: list[tuple[int, Mapping[str, Any]]] = []
        size, start, count = 0, 0, READ_BACK[0]
        while start < len(ok):
            piece = ok[start : start + count]
            start += len(piece)
            texts = self.store.get_item_texts([key for _, key in piece])
            mean = sum(map(len, texts.values())) / max(len(texts), 1)
            count = max(1, min(READ_BACK[1], int(self.options.max_request_bytes // max(mean, 1.0))))
            lost = [tid for tid, key in piece if key not in texts]
            if lost:  # stored synchronously before they were handed over: a broken store, not a task's failure
                raise RuntimeError(f"{len(lost)} stored predictions could not be read back (tasks {lost[:5]}...)")
            for tid, key in piece:
                text = texts[key]
                if part and size + len(text) > self.options.max_request_bytes:
                    yield part
                    part, size = [], 0
                part.append((tid, json.loads(text)))
                size += len(text)
        if part:
            yield part

    def _cancel(self) -> None:
        """What is stored goes to Label Studio before the job stops."""
        self._drain_writes()
        raise Cancelled()

    def _drain_writes(self) -> None:
        self._flush_writes()
        while self._writes:
            self._writes.popleft().result()

    # -- progress ---------------------------------------------------------------------------------------
    def _set(self, **changes: Any) -> None:
        with self._lock:
            self.progress = replace(self.progress, **changes)
        self.on_progress(self.progress)

    def _add(self, done: int = 0, predicted: int = 0, written: int = 0, failed: int = 0,
             failures: dict[str, str] | None = None) -> None:
        with self._lock:
            p = self.progress
            kept = dict(p.failures)
            for tid, why in (failures or {}).items():
                if len(kept) >= MAX_FAILURES_KEPT:
                    break
                kept[tid] = why
            total = max(p.total, p.done + done + p.failed + failed)
            self.progress = replace(p, done=p.done + done, predicted=p.predicted + predicted,
                                    written=p.written + written, failed=p.failed + failed, failures=kept,
                                    total=total, remaining=total - p.done - done - p.failed - failed)
            current = self.progress
        self.on_progress(current)  # a failed task's reason is logged by the predictor, once


def write_threshold(handed: int, options: JobOptions) -> int:
    """Predictions to gather before the next bulk import: twice what was handed to the writer so far, within
    [write_batch, max_write_batch]. Label Studio's default import recounts every predicted task of the project
    per request (`update_tasks_counters` over the whole project in 1.23), so requests that grow geometrically
    keep its work near-linear: 1.7x the project's tasks recounted at 5,000 tasks (1x of it the last request's,
    which the job waits for), 3.8x at 100,000, where a fixed 256 a request recounts 11x and 196x. Half of what
    was handed, capped at 4,096 (before 2026-12-06), recounted 3.2x at 5,000 and 14x at 100,000: Label Studio's
    CPU taken from inference on a small machine, and on a large project the pace of the whole job."""
    return min(options.max_write_batch, max(options.write_batch, 2 * handed))


def elapsed_rate(progress: Progress, started: float) -> float:
    """Tasks predicted per second since `started` (time.perf_counter())."""
    return progress.predicted / max(time.perf_counter() - started, 1e-9)
