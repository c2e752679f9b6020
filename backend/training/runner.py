"""Runs training jobs as separate local processes and reaps them.

The worker writes its own terminal state; the runner only steps in when the process dies without one
(a crash, `kill -9`, the OOM killer), so the job never stays "running" forever:

- the reaper thread survives any error (a full disk, a locked database): it logs, waits and tries again, and
  a dead worker's failure is recorded once the store takes it — the exit status is kept until then;
- it polls its own workers (so none stays a zombie) and, every few seconds, checks the workers it did not start
  (a previous server's, the CLI's): a pid counts as alive only while the process with that pid is the one
  recorded when the worker started (boot id and start time), never a later process that reuses the pid;
- with `max_concurrent`, at most that many workers run at once; further jobs wait, queued, in start order.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from backend.settings import Settings
from backend.training.jobs import Job, JobStatus, JobStore

log = logging.getLogger("tandem.training")

ADOPT_EVERY_S = 2.0
WORKER_MODULE = b"backend.training.worker"


# -- process identity --------------------------------------------------------------------------------
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) from /proc, or None when the process does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return ("?", "")
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], fields[19]


def process_identity(pid: int) -> str | None:
    """Boot id and start time of `pid`: equal only for the very same process. None where /proc is missing."""
    if not Path("/proc/self/stat").exists():
        return None
    found = _stat(pid)
    return f"{_boot_id()}:{found[1]}" if found and found[1] else None


def process_alive(pid: int, identity: str | None = None) -> bool:
    """Whether the worker recorded as (`pid`, `identity`) still runs: not gone, not a zombie, not another process
    that got the same pid. Without an identity (jobs from before it was recorded) the command line must still be
    a training worker's."""
    if not pid or pid <= 0:
        return False
    if Path("/proc/self/stat").exists():
        found = _stat(pid)
        if found is None or found[0] in ("Z", "X", "x"):
            return False
        if identity is not None:
            return process_identity(pid) == identity
        try:
            return WORKER_MODULE in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return True  # cannot look: assume it is the worker rather than fail a live job
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


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
    def __init__(self, settings: Settings, store: JobStore, on_done: Callable[[Job], None] | None = None,
                 max_concurrent: int | None = None, worker_argv: list[str] | None = None) -> None:
        """`worker_argv`: the worker's command, to which the job id is appended (the training worker by default)."""
        self.settings = settings
        self.worker_argv = list(worker_argv or [sys.executable, "-m", "backend.training.worker"])
        self.home = settings.home
        self.store = store
        self.on_done = on_done
        self.max_concurrent = max_concurrent
        self._procs: dict[int, subprocess.Popen] = {}
        self._exited: dict[int, subprocess.Popen] = {}  # dead workers whose end is not recorded yet
        self._queue: deque[int] = deque()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._identity = process_identity(os.getpid()) or f"pid:{os.getpid()}"
        self._last_adopt = 0.0
        self.errors = 0  # reaper rounds that failed (and were retried)
        if max_concurrent:
            self._take_over_queue()
        self._reaper = threading.Thread(target=self._reap_loop, name="tandem-job-reaper", daemon=True)
        self._reaper.start()

    def start(self, job: Job) -> subprocess.Popen | None:
        """Start the job's worker now, or, with `max_concurrent` workers already running, queue it (None)."""
        with self._lock:
            if self.max_concurrent and (self._queue or self._busy() >= self.max_concurrent):
                self._queue.append(job.id)
                self.store.hold(job.id, self._identity)
                log.info("job %s queued: %s training worker(s) already running (TANDEM_MAX_TRAINING_JOBS=%s)",
                         job.id, self._busy(), self.max_concurrent)
                return None
            return self._spawn(job)

    def _spawn(self, job: Job) -> subprocess.Popen:
        path = log_path(self.home, job.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.settings.to_env(), "PYTHONUNBUFFERED": "1"}
        with open(path, "ab") as out:
            proc = subprocess.Popen([*self.worker_argv, str(job.id)], env=env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        with self._lock:
            self._procs[job.id] = proc
        self.store.record_process(job.id, proc.pid, process_identity(proc.pid))  # before the pid is visible
        self.store.update(job.id, pid=proc.pid)
        return proc

    def _busy(self) -> int:
        """Workers running now: this runner's, and live ones other processes started (same TANDEM_HOME)."""
        others = sum(1 for job, ident in self.store.with_process()
                     if job.id not in self._procs and process_alive(job.pid, ident))
        return len(self._procs) + others

    def _take_over_queue(self) -> None:
        """Queued jobs a stopped server was holding (its process is gone) wait in this one's queue instead."""
        for job, holder in self.store.held():
            if holder and holder != self._identity and not _holder_alive(holder):
                self._queue.append(job.id)
                self.store.hold(job.id, self._identity)

    def _start_queued(self) -> None:
        with self._lock:
            while self._queue and self._busy() < (self.max_concurrent or 1 << 30):
                job = self.store.get(self._queue[0])
                self._queue.popleft()
                if job is None or job.status is not JobStatus.QUEUED or job.pid:
                    continue  # cancelled while it waited
                self._spawn(job)

    def cancel(self, job_id: int) -> bool:
        with self._lock:
            proc = self._procs.get(job_id)
            if job_id in self._queue:
                self._queue.remove(job_id)
        return cancel_job(self.store, job_id, pid=proc.pid if proc else None)

    def queued(self) -> list[int]:
        with self._lock:
            return list(self._queue)

    def _reap_loop(self) -> None:
        pause = 0.5
        while not self._stop.wait(pause):
            try:
                self.reap()
                if time.monotonic() - self._last_adopt >= ADOPT_EVERY_S:
                    self._last_adopt = time.monotonic()
                    mark_orphans(self.store, skip=set(self.running()))
                self._start_queued()
                pause = 0.5
            except Exception:  # noqa: BLE001 - the reaper outlives any error: a full disk, a locked database
                self.errors += 1
                log.exception("job reaper: will retry")
                pause = min(10.0, pause * 2)

    def reap(self) -> None:
        with self._lock:
            for jid, proc in list(self._procs.items()):
                if proc.poll() is not None:  # poll() also collects the exit status: no zombie is left
                    self._exited[jid] = self._procs.pop(jid)
            pending = list(self._exited.items())
        for jid, proc in pending:
            rc = proc.returncode
            if rc != 0:
                why = f"killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
                self.store.finish(jid, JobStatus.FAILED, error=f"worker {why}\n{tail(log_path(self.home, jid))}")
            job = self.store.get(jid)
            with self._lock:
                self._exited.pop(jid, None)  # recorded: an error above keeps it for the next round
            if self.on_done and job is not None:
                try:
                    self.on_done(job)
                except Exception:  # noqa: BLE001 - a follow-up that cannot start must not stop the reaper
                    log.exception("job %s: after it ended", jid)

    def running(self) -> list[int]:
        with self._lock:
            return list(self._procs) + list(self._exited)

    def close(self) -> None:
        self._stop.set()


def _holder_alive(holder: str) -> bool:
    if holder.startswith("pid:"):
        try:
            return process_alive(int(holder[4:]))
        except ValueError:
            return False
    boot, _, start = holder.partition(":")
    if boot != _boot_id():
        return False
    # the holder's identity has no pid: look for a live process with that start time is costly; a server that
    # still runs holds its own queue, and one that stopped left it here — any process started then is it
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            found = _stat(int(entry.name))
            if found and found[1] == start and found[0] not in ("Z", "X", "x"):
                return True
    return False


def mark_orphans(store: JobStore, skip: set[int] | None = None) -> int:
    """Jobs left 'running' (or 'queued' with a worker) by a dead worker are failed, not left hanging (and blocking
    their project): at server start, every few seconds in the server's reaper, and before the CLI lists jobs or
    starts one. A worker counts as dead when its pid is gone, a zombie, or now another process. `skip`: job ids
    the caller's own reaper watches."""
    n = 0
    for job, identity in store.with_process():
        if skip and job.id in skip:
            continue
        if not process_alive(job.pid, identity):
            store.finish(job.id, JobStatus.FAILED,
                         error="the worker process disappeared (killed, or its machine restarted)")
            n += 1
    return n


def _alive(pid: int) -> bool:
    return process_alive(pid)


def wait(store: JobStore, job_id: int, timeout: float = 3600, poll: float = 0.5) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = store.get(job_id)
        if job is not None and not job.status.active:
            return job
        time.sleep(poll)
    raise TimeoutError(f"job {job_id} still running after {timeout:.0f} s")
