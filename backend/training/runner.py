"""Runs jobs as separate local processes under a lease, and reaps them.

Correctness comes from leases (`backend.training.jobs`): the runner claims a job for its holder id before
it starts a worker and heartbeats it while it waits in the queue; the worker heartbeats its own job while
it runs (`backend.training.worker`). Whichever replica or CLI notices a running job whose lease ran out
fails it (`expire_leases`); a queued job whose holder vanished before starting it is claimed by another
server's runner (nothing ran yet, so that is safe). Cancelling is a status change in the database: the
holder's next heartbeat is refused and it stops the worker.

Local optimisations on top (never needed for correctness):
- the reaper polls its own workers, so a worker killed by a signal fails its job at once with the signal,
  not a lease later, and none stays a zombie;
- `mark_orphans` fails a job whose worker pid on *this* host is gone (a job held by another host is left
  to its lease).
With `max_concurrent`, at most that many workers run at once; further jobs wait, queued, in start order.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from backend.settings import Settings
from backend.storage.artifacts import ArtifactStore, read_text
from backend.training.jobs import Job, JobStatus, JobStore, holder_host, new_holder_id
from backend.training.lease import LeaseKeeper

log = logging.getLogger("tandem.training")

ADOPT_EVERY_S = 2.0
LOG_EVERY_S = 5.0  # a running job's log is copied into the artifact store this often (when it grew)
WORKER_MODULE = b"backend.training.worker"
PRE_LEASE_HOLDER = "pid-runner (before leases)"  # what migration 0002 wrote on jobs the old runner held


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


def worker_alive(pid: int | None, job_id: int | None = None) -> bool:
    """Whether `pid` on this host is still a live worker (for `job_id`, when given): not gone, not a zombie, not
    another process that got the same pid."""
    if not pid or pid <= 0:
        return False
    if not Path("/proc/self/stat").exists():
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    found = _stat(pid)
    if found is None or found[0] in ("Z", "X", "x"):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # cannot look: assume it is the worker rather than fail a live job
    return any(WORKER_MODULE in a for a in argv) and (job_id is None or str(job_id).encode() in argv)


def log_path(home: Path, job_id: int) -> Path:
    return home / "jobs" / str(job_id) / "log.txt"


def job_log(settings: Settings, job_id: int, lines: int = 200) -> str:
    """The end of a job's log: this host's file while it runs here, else the copy in the artifact store (a job
    another replica ran)."""
    path = log_path(settings.home, job_id)
    if path.exists():
        return tail(path, lines)
    text = read_text(ArtifactStore.from_settings(settings).uri("jobs", job_id, "log.txt"))
    return "\n".join(text.splitlines()[-lines:]) if lines > 0 else ""


def publish_log(artifacts: ArtifactStore, path: Path, job_id: int, published: dict[int, int] | None = None) -> None:
    """Copy a job's log into the artifact store, where every replica's `GET /jobs/{id}/logs` finds it: while the job
    runs (then only when it grew since the size in `published`) and once more when it ends."""
    try:
        size = path.stat().st_size
    except OSError:
        return
    if published is not None and published.get(job_id) == size:
        return
    try:
        artifacts.put(path, "jobs", job_id, "log.txt")
    except Exception as exc:  # noqa: BLE001 - the log stays on this host; the job itself is unaffected
        if job_id not in _refused:  # one line per job, not a traceback every few seconds
            _refused.add(job_id)
            log.warning("job %s: its log stays on this host, %s (the artifact store did not take it: %s: %s)",
                        job_id, path, type(exc).__name__, exc)
        return
    _refused.discard(job_id)
    if published is not None:
        published[job_id] = size


_refused: set[int] = set()  # jobs whose log the store refused, said once each


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a job's log as plain text: colours dropped, a progress bar's line as it last stood."""
    if not path.exists():
        return ""
    text = ANSI.sub("", path.read_text(errors="replace"))
    plain = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join([line for line in plain if line.strip()][-lines:])


def _on_this_host(job: Job) -> bool:
    host = holder_host(job.holder)
    return host is None or host == socket.gethostname()


def _stop_worker(pid: int, job_id: int) -> None:
    if worker_alive(pid, job_id):
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass


def cancel_job(store: JobStore, job_id: int, pid: int | None = None, home: Path | None = None) -> bool:
    """Cancel a queued or running job from any process or replica: the status change is the cancel (the holder's
    next heartbeat is refused and it stops the worker). A worker on this host is stopped at once; for Modal, the
    remote call too. With `home`, the job's log ends with the verdict (a stopped worker cannot write it)."""
    job = store.get(job_id)
    if job is None or not job.status.active:
        return False
    if not store.finish(job_id, JobStatus.CANCELLED, error="cancelled"):
        return False
    pid = pid or job.pid
    if pid and _on_this_host(job):
        _stop_worker(pid, job_id)
    path = log_path(home, job_id) if home is not None else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)  # a job cancelled while queued has no log yet
        dropped = f"; its queued follow-up ({job.follow_up}) is dropped too" if job.follow_up else ""
        with open(path, "a") as out:
            out.write(f"[tandem {time.strftime('%H:%M:%S')}] job {job_id} cancelled: nothing from it is registered or "
                      f"served{dropped}\n")
    if job.runner == "modal" and job.remote_id:
        try:
            from infra.modal_runner import cancel_remote

            cancel_remote(job.remote_id)
        except Exception as exc:  # noqa: BLE001 - the local job is cancelled either way; say what is left
            store.update(job_id, error=f"cancelled here; the Modal call {job.remote_id} may still run: {exc}")
    return True


class LocalRunner:
    def __init__(self, settings: Settings, store: JobStore, on_done: Callable[[Job], None] | None = None,
                 max_concurrent: int | None = None, worker_argv: list[str] | None = None,
                 take_over: bool | None = None) -> None:
        """`worker_argv`: the worker's command, to which the job id is appended (the training worker by default).
        `take_over`: claim queued jobs a vanished runner left (the server's runner does; the CLI's does not)."""
        self.settings = settings
        self.worker_argv = list(worker_argv or [sys.executable, "-m", "backend.training.worker"])
        self.home = settings.home
        self.store = store
        self.on_done = on_done
        self.max_concurrent = max_concurrent
        self.take_over = on_done is not None if take_over is None else take_over
        self.holder = new_holder_id()
        self.lease_s = float(getattr(settings, "lease_seconds", 30.0))
        self._procs: dict[int, subprocess.Popen] = {}
        self._exited: dict[int, subprocess.Popen] = {}  # dead workers whose end is not recorded yet
        self._queue: deque[int] = deque()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._last_adopt = 0.0
        self.log_every_s = LOG_EVERY_S
        self._last_logs = 0.0
        self._published: dict[int, int] = {}  # job id -> log size last copied into the artifact store
        self.errors = 0  # reaper rounds that failed (and were retried)
        self.leases = LeaseKeeper(store, self.holder, self.lease_s, on_lost=self._lost)
        self.artifacts = ArtifactStore.from_settings(settings)
        self._reaper = threading.Thread(target=self._reap_loop, name="tandem-job-reaper", daemon=True)
        self._reaper.start()

    def start(self, job: Job) -> subprocess.Popen | None:
        """Claim the job and start its worker now, or, with `max_concurrent` workers already running, queue it
        (None). None too when another runner holds it."""
        if not self.store.claim(job.id, self.holder, self.lease_s):
            log.info("job %s is held by another runner: not started here", job.id)
            return None
        self.leases.hold(job.id)
        with self._lock:
            if self.max_concurrent and (self._queue or self._busy() >= self.max_concurrent):
                self._queue.append(job.id)
                log.info("job %s queued: %s training worker(s) already running (TANDEM_MAX_TRAINING_JOBS=%s)",
                         job.id, self._busy(), self.max_concurrent)
                return None
            return self._spawn(job)

    def _spawn(self, job: Job) -> subprocess.Popen | None:
        """The job's worker, or None when it cannot start (its folder not writable, a full disk, no processes
        left): then the job fails with the reason, instead of staying queued under a lease renewed for good."""
        path = log_path(self.home, job.id)
        env = {**os.environ, **self.settings.to_env(), "PYTHONUNBUFFERED": "1", "TANDEM_JOB_HOLDER": self.holder,
               "TANDEM_LEASE_SECONDS": str(self.lease_s)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as out:
                proc = subprocess.Popen([*self.worker_argv, str(job.id)], env=env,
                                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            why = f"its worker could not start: {type(exc).__name__}: {exc} (is {path.parent.parent} writable, with room?)"
            log.error("job %s: %s", job.id, why)
            self.leases.drop(job.id)
            self.store.finish(job.id, JobStatus.FAILED, error=why)
            return None
        with self._lock:
            self._procs[job.id] = proc
        self.store.update(job.id, pid=proc.pid)
        return proc

    def _busy(self) -> int:
        """Workers running now: this runner's, and live ones other runners on this host started."""
        others = sum(1 for job in self.store.all_active()
                     if job.id not in self._procs and job.holder != self.holder and job.pid
                     and _on_this_host(job) and worker_alive(job.pid, job.id))
        return len(self._procs) + others

    def _lost(self, job_id: int) -> None:
        """The lease was refused (cancelled elsewhere, or taken over): stop what this runner does for it."""
        with self._lock:
            proc = self._procs.get(job_id)
            if job_id in self._queue:
                self._queue.remove(job_id)
        job = self.store.get(job_id)
        if proc is not None and job is not None and job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
            try:  # the worker recorded its own end and is exiting: not a cancel (a reaper's "failed" is, below)
                proc.wait(timeout=5)
                return
            except subprocess.TimeoutExpired:
                pass
        if proc is not None and proc.poll() is None:
            log.info("job %s: lease refused (cancelled or taken over), stopping its worker", job_id)
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass

    def _take_over_queue(self) -> None:
        """Queued jobs whose holder vanished before starting them wait in this runner's queue instead."""
        for job in self.store.claimable(kind="train"):
            if self.store.claim(job.id, self.holder, self.lease_s):
                log.info("job %s: taken over from %s (its lease ran out before it started)", job.id, job.holder)
                self.leases.hold(job.id)
                with self._lock:
                    self._queue.append(job.id)

    def _start_queued(self) -> None:
        with self._lock:
            while self._queue and self._busy() < (self.max_concurrent or 1 << 30):
                job = self.store.get(self._queue[0])
                self._queue.popleft()
                if job is None or job.status is not JobStatus.QUEUED or job.pid or job.holder != self.holder:
                    if job is not None:
                        self.leases.drop(job.id)
                    continue  # cancelled (or taken) while it waited
                self._spawn(job)

    def cancel(self, job_id: int) -> bool:
        with self._lock:
            proc = self._procs.get(job_id)
            if job_id in self._queue:
                self._queue.remove(job_id)
        return cancel_job(self.store, job_id, pid=proc.pid if proc else None, home=self.home)

    def queued(self) -> list[int]:
        with self._lock:
            return list(self._queue)

    def _reap_loop(self) -> None:
        from backend.storage.outage import OutageLog

        outage = OutageLog(log, "job reaper")
        pause = 0.5
        while not self._stop.wait(pause):
            try:
                self.reap()
                asked = False  # whether this round asked the database anything: only then is it "back"
                if time.monotonic() - self._last_adopt >= ADOPT_EVERY_S:
                    self._last_adopt = time.monotonic()
                    for job in reap_abandoned(self.store, skip=set(self.running())):
                        self._done(job)
                    asked = True
                    if self.take_over:
                        self._take_over_queue()
                self._start_queued()
                if time.monotonic() - self._last_logs >= self.log_every_s:
                    self._last_logs = time.monotonic()
                    self._publish_running_logs()
                pause = 0.5
                if asked:
                    outage.ok()
            except Exception as exc:  # noqa: BLE001 - the reaper outlives any error: a full disk, a locked database
                self.errors += 1
                outage.failed(exc)
                pause = min(10.0, pause * 2)

    def reap(self) -> None:
        with self._lock:
            for jid, proc in list(self._procs.items()):
                if proc.poll() is not None:  # poll() also collects the exit status: no zombie is left
                    self._exited[jid] = self._procs.pop(jid)
            pending = list(self._exited.items())
        for jid, proc in pending:
            rc = proc.returncode
            why = f"killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
            if rc == 0:
                why += " without recording an outcome"
            # conditional: a worker that recorded its own end (or a cancel) is not overwritten
            self.store.finish(jid, JobStatus.FAILED, error=f"worker {why}\n{tail(log_path(self.home, jid))}")
            self._keep_log(jid)
            job = self.store.get(jid)
            self.leases.drop(jid)
            if job is not None and job.holder == self.holder:
                self.store.release(jid, self.holder)
            with self._lock:
                self._exited.pop(jid, None)  # recorded: an error above keeps it for the next round
            if job is not None:
                self._done(job)

    def _publish_running_logs(self) -> None:
        """Running workers' logs into the artifact store (when they grew): another replica shows a job as it runs."""
        with self._lock:
            running = list(self._procs)
        for jid in running:
            publish_log(self.artifacts, log_path(self.home, jid), jid, self._published)

    def _keep_log(self, job_id: int) -> None:
        """The job's whole log into the artifact store once it ended."""
        publish_log(self.artifacts, log_path(self.home, job_id), job_id)
        self._published.pop(job_id, None)

    def _done(self, job: Job) -> None:
        if self.on_done is None:
            return
        try:
            self.on_done(job)
        except Exception:  # noqa: BLE001 - a follow-up that cannot start must not stop the reaper
            log.exception("job %s: after it ended", job.id)

    def running(self) -> list[int]:
        with self._lock:
            return list(self._procs) + list(self._exited)

    def close(self) -> None:
        """The server stops; its workers do not (a fine-tune is not thrown away by a restart). Each heartbeats its
        own job, finishes, and records its verdict and any promotion, which the next server serves."""
        self._stop.set()
        self.leases.close()
        with self._lock:
            running = {jid: proc.pid for jid, proc in self._procs.items() if proc.poll() is None}
        for jid, pid in running.items():
            log.warning("job %s keeps running in its worker (pid %s) after this server stops: it records its "
                        "verdict (and a promotion) itself; `tandem jobs cancel %s` stops it", jid, pid, jid)


def mark_orphans(store: JobStore, skip: set[int] | None = None) -> int:
    """A local shortcut before the lease runs out: active jobs whose worker on this host is gone (killed, or the
    machine restarted) are failed now. Jobs held by another host are left to their lease. `skip`: job ids the
    caller's own reaper watches."""
    n = 0
    for job in store.all_active():
        if (skip and job.id in skip) or not job.pid or not _on_this_host(job):
            continue
        if not worker_alive(job.pid, job.id):
            if store.finish(job.id, JobStatus.FAILED,
                            error="the worker process disappeared (killed, or its machine restarted)"):
                n += 1
    return n


def reap_abandoned(store: JobStore, skip: set[int] | None = None) -> list[Job]:
    """What any replica or CLI does before trusting the job list: fail jobs whose worker vanished here, and
    running jobs whose lease ran out (held anywhere). Returns the jobs it failed."""
    before = {j.id for j in store.all_active()}
    mark_orphans(store, skip)
    store.expire_leases()
    return [j for j in (store.get(i) for i in before) if j is not None and j.status is JobStatus.FAILED]


def wait(store: JobStore, job_id: int, timeout: float = 3600, poll: float = 0.5) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = store.get(job_id)
        if job is not None and not job.status.active:
            return job
        time.sleep(poll)
    raise TimeoutError(f"job {job_id} still running after {timeout:.0f} s")
