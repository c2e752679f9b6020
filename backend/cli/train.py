"""`tandem train`: a fine-tune job on a project's corrected labels, followed until it ends."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from backend.cli.common import Home, app, console, stores

# (the job as Job.public() gives it, or None when it is gone; its whole log so far)
JobReader = Callable[[], tuple[dict | None, str]]


@app.command()
def train(
    project: Annotated[int, typer.Option("--project", "-p", help="Label Studio project id.")],
    runner: Annotated[str, typer.Option(help="local (a separate process here) or modal (an H100 on Modal).")] = "local",
    model: Annotated[str, typer.Option(help="yolo (fine-tune the CNN) or vlm (a LoRA adapter on the generative VLM).")
                     ] = "yolo",
    epochs: Annotated[int | None, typer.Option(help="Epochs (YOLO: env TANDEM_TRAIN_EPOCHS, 30; VLM LoRA: 3).")] = None,
    imgsz: Annotated[int | None, typer.Option(help="Training image size (default: the serving model's).")] = None,
    server: Annotated[
        str | None, typer.Option(help="A running Tandem (http://host:port): queue the job there instead of here, "
                                      "and follow it there.")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Follow the job's log until it ends.")] = True,
    home: Home = None,
) -> None:
    """Fine-tune on the project's corrected labels; the new version is promoted only if it is not worse."""
    if runner not in ("local", "modal"):
        raise typer.BadParameter("--runner must be local or modal")
    if model not in ("yolo", "vlm"):
        raise typer.BadParameter("--model must be yolo or vlm")
    if server:  # the server's database, not this shell's: none is opened here
        from backend.cli.common import load_settings

        settings, store = load_settings(home=home), None
    else:
        settings, _, store = stores(home)
    defaults = settings.training_params() if model == "yolo" else {}  # YOLO's epochs are not LoRA's
    params = {**defaults, **{k: v for k, v in {"epochs": epochs, "imgsz": imgsz}.items() if v}}
    follow_up = None
    if server:
        job_id, read, follow_up = _queue_on_server(server, settings.basic_auth, {
            "project": project, "runner": runner, "model": model, "params": params, "reason": "tandem train"}, wait)
    else:
        job_id, read = _start_here(settings, store, project, runner, model, params)
    if wait:
        following, reading = job_id, read
        try:
            job = _follow(job_id, read)
            if follow_up is not None:
                found = follow_up(job_id)
                if found is None:
                    console.print(f"[red]error:[/] no follow-up job started within 2 minutes after job {job_id} ended "
                                  "(a cancelled job starts none; otherwise the server's log says why): tandem jobs "
                                  "list shows the project's jobs")
                    raise typer.Exit(1)
                console.print(f"your request runs as job {found[0]}")
                following, reading = found
                job = _follow(*found)
        except KeyboardInterrupt:  # the job runs in its own process (or on the server): say so, and how to stop it
            how = (f"`curl -X POST {server.rstrip('/')}/jobs/{following}/cancel` stops it" if server else
                   f"`tandem jobs logs {following}` shows it, `tandem jobs cancel {following}` stops it")
            console.print(f"stopped following job {following}; it keeps running{_where(reading)}: "
                          f"{how}")
            raise typer.Exit(130) from None
        _exit_with(job)


def _start_here(settings, store, project: int, runner: str, model: str, params: dict) -> tuple[int, JobReader]:
    from backend.training.jobs import ActiveJobExists, JobStatus
    from backend.training.runner import LocalRunner, log_path

    active = store.active(project, kind="train")
    if active:
        console.print(f"project {project} already has job {active[0].id} ({active[0].status.value}); following it. "
                      f"This run's options were not applied: run `tandem train` again once it ends")
        job_id = active[0].id
    else:
        if runner == "modal":
            from infra.modal_runner import ModalUnavailable, require_modal_credentials

            try:
                require_modal_credentials()
            except ModalUnavailable as exc:
                console.print(f"[red]error:[/] {exc}")
                raise typer.Exit(2) from exc
        if model == "vlm":
            from backend.errors import ConfigError
            from backend.registry import Registry
            from backend.training.worker import vlm_base

            try:
                vlm_base(settings, Registry(settings.database_url), project)
            except ConfigError as exc:
                console.print(f"[red]error:[/] {exc}")
                raise typer.Exit(2) from exc
        local = LocalRunner(settings, store)
        try:  # born held by this runner: no server's runner takes it over meanwhile
            job = store.create(project, model, runner, "tandem train", params, holder=local.holder,
                               lease_s=local.lease_s)
            job_id = job.id
            local.start(job)
            failed = store.get(job_id)
            if failed is not None and failed.status is JobStatus.FAILED:  # its worker could not start: said below
                console.print(f"job {job_id} could not start ({runner})")
            else:
                console.print(f"job {job_id} started ({runner})")
        except ActiveJobExists as exists:  # another process created one since the look above
            console.print(f"project {project} already has job {exists.active.id} ({exists.active.status.value})")
            job_id = exists.active.id
    path = log_path(settings.home, job_id)

    def read() -> tuple[dict | None, str]:
        job = store.get(job_id)
        return (job.public() if job else None), (path.read_text(errors="replace") if path.exists() else "")

    return job_id, read


def _queue_on_server(server: str, auth, body: dict, wait: bool = True) -> tuple[int, JobReader, Callable | None]:
    """The job runs on that server, in its TANDEM_HOME: it is followed over HTTP, not in this machine's state."""
    import httpx

    base = server.rstrip("/")

    def call(method: str, path: str, **kwargs) -> httpx.Response:
        try:
            r = httpx.request(method, f"{base}{path}", auth=auth, timeout=30, **kwargs)
        except httpx.HTTPError as exc:
            console.print(f"[red]error:[/] cannot reach Tandem at {base}: {exc} — is `tandem serve` running there, "
                          "and is --server its URL?")
            raise typer.Exit(2) from exc
        if r.status_code == 401:
            console.print(f"[red]error:[/] {base} asks for basic auth: set BASIC_AUTH_USER and BASIC_AUTH_PASS as "
                          "the server has them")
            raise typer.Exit(2)
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            console.print(f"[red]error:[/] {base}{path}: {r.status_code} {detail}")
            raise typer.Exit(2)
        return r

    def reader(jid: int) -> JobReader:
        def read() -> tuple[dict | None, str]:
            return call("GET", f"/jobs/{jid}").json(), call("GET", f"/jobs/{jid}/logs",
                                                            params={"lines": 1_000_000}).text
        return read

    answer = call("POST", "/train", json=body).json()
    job_id = answer["id"]
    if answer.get("follow_up") is None:
        console.print(f"queued job {job_id} through {base} (replicas sharing its database: whichever runner "
                      "claims it runs it)")
        return job_id, reader(job_id), None
    # the server folded this request into the follow-up of the project's active job: it runs after that one ends
    options = ", ".join(f"{k}={v}" for k, v in sorted(body["params"].items())) or "the defaults"
    console.print(f"project {body['project']} already has job {job_id} ({answer['status']}) on {base}; your request "
                  f"({options}) runs after it as a follow-up job, on every correction by then."
                  + (f" Following job {job_id} first." if wait else ""))

    def follow_up(after: int, timeout_s: float = 120.0) -> tuple[int, JobReader] | None:
        """The job the server started for the folded-in request (reason "coalesced: ...") once `after` ended."""
        import time

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            later = [j for j in call("GET", "/jobs", params={"project": body["project"]}).json()
                     if j["id"] > after and str(j.get("reason", "")).startswith("coalesced:")]
            if later:
                jid = min(j["id"] for j in later)
                return jid, reader(jid)
            if (call("GET", f"/jobs/{after}").json() or {}).get("status") == "cancelled":
                return None
            time.sleep(1.0)
        return None

    return job_id, reader(job_id), follow_up


def _follow(job_id: int, read: JobReader, interval_s: float = 1.0) -> dict:
    """Print the log as it grows until the job ends; returns the job as it ended."""
    import time

    from backend.training.jobs import JobStatus

    shown = 0
    while True:
        job, log = read()
        lines = log.splitlines()
        for line in lines[shown:]:
            console.print(line, markup=False, highlight=False)
        shown = len(lines)
        if job is None:
            console.print(f"[red]error:[/] job {job_id} is gone")
            raise typer.Exit(1)
        if not JobStatus(job["status"]).active:
            break
        time.sleep(interval_s)
    ok = job["status"] == JobStatus.SUCCEEDED.value
    error = job.get("error")
    console.print(f"[{'green' if ok else 'red'}]job {job_id} {job['status']}[/]" +
                  (f": {error.splitlines()[0]}" if error else ""))
    if job.get("version"):
        console.print(f"version {job['version']}: {'promoted' if job.get('promoted') else 'not promoted'}")
    skipped = (job.get("metrics") or {}).get("skipped")
    if skipped:
        console.print(f"not retrained: {skipped}")
    return job


def _where(read: JobReader) -> str:
    """Which runner holds the job ("host:pid"): with replicas the server asked is not always the one running it."""
    try:
        job, _ = read()
    except (Exception, typer.Exit):  # noqa: BLE001 - only a hint in a goodbye line
        return ""
    holder = (job or {}).get("holder")
    return f" (runner {holder.rsplit(':', 1)[0]})" if holder else ""


def _exit_with(job: dict) -> None:
    from backend.training.jobs import JobStatus

    raise typer.Exit(0 if job["status"] == JobStatus.SUCCEEDED.value else 1)
