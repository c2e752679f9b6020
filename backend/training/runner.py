"""Runs training jobs as separate local processes and reaps them.

The worker writes its own terminal state; the runner only steps in when the process dies without one
(a crash, `kill -9`, the OOM killer), so the job never stays "running" forever.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from backend.settings import Settings
from backend.training.jobs import Job, JobStatus, JobStore


def log_path(home: Path, job_id: int) -> Path:
    return home / "jobs" / str(job_id) / "log.txt"


def tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def cancel_job(store: JobStore, job_id: int, pid: int | None = None) -> bool:
    """Cancel a queued or running job from any process (the server, the CLI): record it first, so the dying
    worker cannot overwrite it, then stop the worker's process group and, for Modal, the remote call."""
    job = store.get(job_id)
    if job is None or not job.status.active:
        return False
    store.finish(job_id, JobStatus.CANCELLED, error="cancelled")
    pid = pid or job.pid
    if pid:
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    if job.runner == "modal" and job.remote_id:
        try:
            from infra.modal_runner import cancel_remote

            cancel_remote(job.remote_id)
        except Exception as exc:  # noqa: BLE001 - the local job is cancelled either way; say what is left
            store.update(job_id, error=f"cancelled here; the Modal call {job.remote_id} may still run: {exc}")
    return True


class LocalRunner:
    def __init__(self, settings: Settings, store: JobStore, on_done: Callable[[Job], None] | None = None) -> None:
        self.settings = settings
        self.home = settings.home
        self.store = store
        self.on_done = on_done
        self._procs: dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="tandem-job-reaper", daemon=True)
        self._reaper.start()

    def start(self, job: Job) -> subprocess.Popen:
        path = log_path(self.home, job.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.settings.to_env(), "PYTHONUNBUFFERED": "1"}
        with open(path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "backend.training.worker", str(job.id)], env=env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.store.update(job.id, pid=proc.pid)
        with self._lock:
            self._procs[job.id] = proc
        return proc

    def cancel(self, job_id: int) -> bool:
        with self._lock:
            proc = self._procs.get(job_id)
        return cancel_job(self.store, job_id, pid=proc.pid if proc else None)

    def _reap_loop(self) -> None:
        while not self._stop.wait(0.5):
            self.reap()

    def reap(self) -> None:
        with self._lock:
            done = [(jid, p) for jid, p in self._procs.items() if p.poll() is not None]
            for jid, _ in done:
                self._procs.pop(jid)
        for jid, proc in done:
            rc = proc.returncode
            if rc != 0:
                why = f"killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
                self.store.finish(jid, JobStatus.FAILED, error=f"worker {why}\n{tail(log_path(self.home, jid))}")
            job = self.store.get(jid)
            if self.on_done and job is not None:
                self.on_done(job)

    def running(self) -> list[int]:
        with self._lock:
            return list(self._procs)

    def close(self) -> None:
        self._stop.set()


def mark_orphans(store: JobStore) -> int:
    """Jobs left 'running' by a dead worker are failed, not left hanging (and blocking their project): at server
    start, and before the CLI lists jobs or starts one."""
    n = 0
    for job in store.list(limit=1000):
        if job.status is JobStatus.RUNNING and job.pid and not _alive(job.pid):
            store.finish(job.id, JobStatus.FAILED, error="the worker process disappeared (killed, or its machine restarted)")
            n += 1
    return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def wait(store: JobStore, job_id: int, timeout: float = 3600, poll: float = 0.5) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = store.get(job_id)
        if job is not None and not job.status.active:
            return job
        time.sleep(poll)
    raise TimeoutError(f"job {job_id} still running after {timeout:.0f} s")
