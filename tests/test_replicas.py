"""Two `tandem serve` replicas on one PostgreSQL and one shared artifact folder, behind one URL, with a real
Label Studio: what a team running Tandem behind a load balancer relies on.

- Label Studio's annotation webhooks reach the replicas alternately (a round-robin proxy stands in for the load
  balancer) and still start exactly one job after TANDEM_TRAIN_AFTER corrections; either replica shows and
  cancels it.
- A version promoted by a job that replica A ran is served by replica B within 10 s, loaded from the shared
  artifact folder (not from A's home).
- `kill -9` of the replica running a job (its worker too, as when its machine dies): the other replica fails it
  after the lease and queues its coalesced successor; never two active jobs.

Each replica runs in its own UTS namespace with its own hostname where `unshare --uts` is allowed (root here and
in CI), so the survivor cannot see the dead replica's processes as its own and must go through the lease, as
on separate machines.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from label_studio_sdk import LabelStudio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from backend.datasets.shapes import generate_samples
from backend.demo import ground_truth_result
from backend.dev.local_label_studio import free_port, upload_images
from backend.training.jobs import JobStatus, JobStore
from backend.training.runner import wait, worker_alive
from tests.harness import ServerThread, png_bytes
from tests.test_e2e_label_studio import _connect, _tasks_by_name
from tests.test_server import RECT

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

LEASE_S = 5.0  # short for the test; long enough that a loaded CI machine heartbeats in time
TRAIN_AFTER = 6
LONG_TRAINING = {"epochs": 500, "imgsz": 160}  # still running whenever the test looks


def _separate_hosts() -> bool:
    if os.environ.get("TANDEM_TEST_REPLICAS_SAME_HOST"):  # to exercise the fallback where unshare is refused
        return False
    try:
        return subprocess.run(["unshare", "--uts", "true"], capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


SEPARATE_HOSTS = _separate_hosts()


def _wait_for(predicate, timeout: float, what: str, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Replica:
    name: str
    port: int
    home: Path
    proc: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def holds(self, holder: str | None) -> bool:
        """Whether a lease holder id (host:pid:random) is this replica's runner (its pid is the server's)."""
        return bool(holder) and holder.split(":")[1] == str(self.proc.pid)

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def start_replica(name: str, env: dict[str, str], weights: Path, root: Path) -> Replica:
    port = free_port()
    home = root / name
    home.mkdir()
    log = root / f"{name}.log"
    cmd = [sys.executable, "-m", "backend.cli", "serve", "--model", str(weights), "--port", str(port),
           "--device", "cpu", "--engine", "torch"]
    if SEPARATE_HOSTS:  # a hostname of its own: its jobs' holders name another machine
        cmd = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', f"tandem-{name}", *cmd]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env={**env, "TANDEM_HOME": str(home)}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=Path(__file__).resolve().parents[1])
    replica = Replica(name, port, home, proc, log)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"replica {name} exited ({proc.returncode}):\n{replica.log_tail()}")
        try:
            return httpx.get(f"{replica.url}/health", timeout=2).json().get("ready", False)
        except httpx.HTTPError:
            return False

    _wait_for(ready, 240, f"replica {name} to serve", every=0.5)
    return replica


@dataclass
class RoundRobin:
    """One URL in front of the replicas, as a load balancer: each path's requests go to them in turn."""

    backends: list[str]
    hits: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._turns: dict[str, itertools.count] = {}
        self.app = Starlette(routes=[Route("/{path:path}", self._forward, methods=["GET", "POST", "PUT", "PATCH",
                                                                                    "DELETE"])])

    async def _forward(self, request: Request) -> Response:
        path = request.url.path
        turn = next(self._turns.setdefault(path, itertools.count())) % len(self.backends)
        self.hits.setdefault(path, [0] * len(self.backends))[turn] += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with httpx.AsyncClient(timeout=300) as client:
            answer = await client.request(request.method, self.backends[turn] + path, params=request.query_params,
                                          headers=headers, content=await request.body())
        drop = ("content-length", "content-encoding", "transfer-encoding", "connection")
        return Response(answer.content, answer.status_code,
                        {k: v for k, v in answer.headers.items() if k.lower() not in drop})


@dataclass
class Pair:
    a: Replica
    b: Replica
    url: str  # the proxy: Label Studio's one ML backend URL
    proxy: RoundRobin
    database_url: str
    artifacts: Path
    store: JobStore

    def replica_holding(self, holder: str | None) -> Replica:
        found = [r for r in (self.a, self.b) if r.holds(holder)]
        assert found, f"{holder} is neither replica's runner"
        return found[0]

    def other(self, replica: Replica) -> Replica:
        return self.b if replica is self.a else self.a


@pytest.fixture(scope="module")
def pair(postgres_cluster, label_studio, detect_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    database_url = postgres_cluster.create_database("replicas")
    artifacts = root / "shared-artifacts"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "TANDEM_DATABASE_URL": database_url, "TANDEM_ARTIFACTS": str(artifacts),
           "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
           "TANDEM_TRAIN_AFTER": str(TRAIN_AFTER), "TANDEM_LEASE_SECONDS": str(LEASE_S),
           "TANDEM_TRAIN_EPOCHS": str(LONG_TRAINING["epochs"]), "TANDEM_TRAIN_IMGSZ": str(LONG_TRAINING["imgsz"])}
    for name in ("TANDEM_HOME", "TANDEM_MODEL", "TANDEM_VLM", "TANDEM_WEBHOOK_SECRET", "BASIC_AUTH_USER"):
        env.pop(name, None)
    replicas = []
    try:
        replicas.append(start_replica("a", env, detect_weights, root))
        replicas.append(start_replica("b", env, detect_weights, root))
        proxy = RoundRobin([r.url for r in replicas])
        with ServerThread(proxy.app) as front:
            yield Pair(replicas[0], replicas[1], front.url, proxy, database_url, artifacts, JobStore(database_url))
    finally:
        for r in replicas:
            r.stop()
        from backend.storage.db import dispose

        dispose(database_url)


def _project(label_studio, title: str, n: int, seed: int, both_splits: bool = False):
    """A project of `n` generated tasks. `both_splits`: `n` tasks with at least one on each side of the frozen
    validation split (a hash of project and task id), uploading more where needed; without it a job on a few
    annotated tasks may find no validation task at all, depending on the ids Label Studio handed out."""
    from backend.training.export import is_validation

    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = client.projects.create(title=title, label_config=RECT)
    items, batch = [], 0
    while True:
        more = generate_samples(n, seed=seed + 1000 * batch)
        upload_images(label_studio.url, label_studio.token, project.id,
                      {f"{s.name}.png": png_bytes(img) for img, s in more})
        items += more
        tasks = _tasks_by_name(client, project.id)
        split = {s.name: is_validation(project.id, tasks[f"{s.name}.png"]["id"]) for _, s in items}
        if not both_splits or len(set(split.values())) == 2:
            break
        batch += 1
    if both_splits:  # n of them: the first validation task and the first n - 1 training ones
        val = [it for it in items if split[it[1].name]][:1]
        items = val + [it for it in items if not split[it[1].name]][: n - 1]
    return client, project, items, tasks


def _annotate(client, tasks, items) -> None:
    for _, sample in items:
        client.annotations.create(id=tasks[f"{sample.name}.png"]["id"], result=ground_truth_result(sample))


def _no_two_active(pair: Pair, project_id: int) -> None:
    assert len(pair.store.active(project_id)) <= 1


def test_webhooks_alternating_between_replicas_start_exactly_one_job(pair, label_studio):
    client, project, items, tasks = _project(label_studio, "tandem replicas: webhooks", TRAIN_AFTER + 2, 4101)
    _connect(client, project.id, pair.url)
    before = list(pair.proxy.hits.get("/webhook", [0, 0]))

    def webhooks() -> int:
        return sum(pair.proxy.hits.get("/webhook", [0, 0])) - sum(before)

    _annotate(client, tasks, items[: TRAIN_AFTER - 1])
    _wait_for(lambda: webhooks() >= TRAIN_AFTER - 1, 30, "Label Studio's webhooks")
    time.sleep(1)
    assert pair.store.list(project.id) == [], "a job started before TRAIN_AFTER corrections"

    _annotate(client, tasks, items[TRAIN_AFTER - 1 : TRAIN_AFTER])
    jobs = _wait_for(lambda: pair.store.list(project.id), 30, "the job the sixth correction starts")
    hits = [now - then for now, then in zip(pair.proxy.hits["/webhook"], before, strict=True)]
    assert min(hits) >= (TRAIN_AFTER - 1) // 2 and abs(hits[0] - hits[1]) <= 1, hits  # both replicas counted
    time.sleep(2 * LEASE_S)  # neither replica starts a second one, late
    jobs = pair.store.list(project.id)
    assert len(jobs) == 1 and jobs[0].reason == f"{TRAIN_AFTER} new corrections", [j.public() for j in jobs]
    job = jobs[0]

    holder = pair.replica_holding(job.holder)
    other = pair.other(holder)
    for replica in (pair.a, pair.b):  # any replica shows any job
        shown = httpx.get(f"{replica.url}/jobs/{job.id}").json()
        assert shown["id"] == job.id and shown["project_id"] == project.id and shown["holder"] == job.holder
    running = _wait_for(lambda: (j := pair.store.get(job.id)).pid and j, 60, "the job's worker to start")
    assert running.status.active

    # the replica that does not hold the job cancels it; the holder's refused heartbeat stops the worker
    cancelled = httpx.post(f"{other.url}/jobs/{job.id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
    if SEPARATE_HOSTS:  # `other` could not signal it: only the holder's lease keeper can have stopped it
        _wait_for(lambda: not worker_alive(running.pid, job.id), 3 * LEASE_S + 5, "the worker to stop")
    assert pair.store.get(job.id).status is JobStatus.CANCELLED
    _annotate(client, tasks, items[TRAIN_AFTER : TRAIN_AFTER + 1])  # one more: far below the next threshold
    time.sleep(2)
    assert len(pair.store.list(project.id)) == 1


def test_a_promotion_through_one_replica_is_served_by_the_other_within_10_s(pair, label_studio):
    client, project, items, tasks = _project(label_studio, "tandem replicas: promotion", 5, 4202,
                                               both_splits=True)
    _annotate(client, tasks, items)  # before the backend is connected: no webhook counts these
    _connect(client, project.id, pair.url)
    old = httpx.get(f"{pair.b.url}/health", params={"project": project.id}).json()["model_version"]

    # a short fine-tune through replica A, with a gate that promotes any candidate that detects something
    queued = httpx.post(f"{pair.a.url}/train", json={"project": project.id, "reason": "replica test",
                                                     "params": {"epochs": 1, "imgsz": 160, "margin": 1.0}})
    assert queued.status_code == 200, queued.text
    job = queued.json()
    assert pair.a.holds(job["holder"])
    done = wait(pair.store, job["id"], timeout=600, poll=0.1)
    log = httpx.get(f"{pair.a.url}/jobs/{done.id}/logs").text
    assert done.status is JobStatus.SUCCEEDED and done.promoted, f"{done.error}\n{log}"
    assert done.version != old

    from backend.registry import Registry

    made = Registry(pair.database_url).get(done.version)
    assert made is not None and made.path
    stored = Path(made.path.removeprefix("file://"))
    assert stored.is_relative_to(pair.artifacts) and stored.exists(), made.path  # shared, not A's home
    assert not stored.is_relative_to(pair.a.home)

    def served_by_b() -> bool:
        r = httpx.get(f"{pair.b.url}/health", params={"project": project.id}, timeout=5)
        return r.json()["model_version"] == done.version

    _wait_for(served_by_b, max(0.5, done.finished_at + 10 - time.time()), "replica B to serve the promotion",
              every=0.1)
    print(f"\nreplica B served the promotion {time.time() - done.finished_at:.2f} s after the job ended")
    task = tasks[f"{items[0][1].name}.png"]
    answer = httpx.post(f"{pair.b.url}/predict", json={"tasks": [{"id": task["id"], "data": task["data"]}],
                                                       "label_config": RECT, "project": f"{project.id}.0"},
                        timeout=120)
    assert answer.status_code == 200 and answer.json()["results"][0]["model_version"] == done.version, answer.text
    # and B shows the log of the job A ran (kept in the artifact store when it ended)
    _wait_for(lambda: f"job {done.id}: project {project.id}, fine-tuning" in
              httpx.get(f"{pair.b.url}/jobs/{done.id}/logs").text, 15, "the job's log through replica B")


def test_kill_9_of_the_replica_running_a_job(pair, label_studio):
    """Last in this module: replica A stays dead."""
    client, project, items, tasks = _project(label_studio, "tandem replicas: kill -9", 5, 4303,
                                               both_splits=True)
    _annotate(client, tasks, items)
    queued = httpx.post(f"{pair.a.url}/train", json={"project": project.id, "reason": "to be orphaned",
                                                     "params": LONG_TRAINING}).json()
    running = _wait_for(lambda: (j := pair.store.get(queued["id"])).pid and j.status is JobStatus.RUNNING and j,
                        120, "A's worker to run the job")
    assert pair.a.holds(running.holder)

    # A's machine dies: the server and its worker, no goodbye
    pair.a.kill9()
    os.killpg(running.pid, signal.SIGKILL)
    killed_at = time.time()
    # a trigger through B while the dead job still looks active joins it as its follow-up: no second job
    coalesced = httpx.post(f"{pair.b.url}/train", json={"project": project.id, "reason": "after the crash",
                                                        "params": {"epochs": 1, "imgsz": 160}})
    assert coalesced.status_code == 200 and coalesced.json()["id"] == running.id, coalesced.text

    def ended():
        _no_two_active(pair, project.id)
        job = pair.store.get(running.id)
        return job if not job.status.active else None

    failed = _wait_for(ended, LEASE_S + 15, "replica B to fail the dead replica's job")
    assert failed.status is JobStatus.FAILED
    print(f"\nthe dead replica's job failed {failed.finished_at - killed_at:.2f} s after kill -9 (lease {LEASE_S} s)")
    if SEPARATE_HOSTS:  # another machine's job: only its lease could tell
        assert "lease expired" in failed.error and running.holder in failed.error, failed.error
        assert failed.finished_at >= running.lease_until - 0.5 and failed.finished_at - killed_at >= 0
    else:  # same host: B sees the worker's pid gone before the lease runs out
        assert "disappeared" in failed.error or "lease expired" in failed.error, failed.error

    # B takes over what was asked: the coalesced trigger becomes the next job, held and run by B
    successor = _wait_for(lambda: next((j for j in pair.store.list(project.id) if j.id != running.id), None), 30,
                          "the coalesced successor")
    assert successor.reason == "coalesced: after the crash" and pair.b.holds(successor.holder)
    assert successor.created_at >= failed.finished_at
    _no_two_active(pair, project.id)
    # what the trigger through B asked for (migration 0003 keeps it), not the dead job's 500 epochs again
    assert (successor.model_kind, successor.params) == (running.model_kind, {"epochs": 1, "imgsz": 160})
    stopped = httpx.post(f"{pair.b.url}/jobs/{successor.id}/cancel")
    assert stopped.status_code == 200 and stopped.json()["status"] == "cancelled", stopped.text
    assert len(pair.store.list(project.id)) == 2 and pair.store.active(project.id) == []
    assert httpx.get(f"{pair.b.url}/health").json()["ready"]
