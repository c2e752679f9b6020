"""`tandem jobs`: list, show, logs and cancel training jobs."""

from __future__ import annotations

from typing import Annotated

import typer

from backend.cli.common import Home, app, console, stdout_console, stores
from backend.storage.db import display_url

jobs_app = typer.Typer(help="Training and predict jobs: list, show, logs, cancel.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("list")
def jobs_list(project: Annotated[int | None, typer.Option("--project", "-p", help="Only this project's jobs.")] = None,
              home: Home = None) -> None:
    """Every training and predict job (or one project's): status, the version it made, whether it was promoted,
    why it failed."""
    from rich.table import Table

    _, _, store = stores(home)
    table = Table(title="Tandem jobs")
    for col in ("id", "project", "status", "runner", "reason", "version", "promoted", "error"):
        table.add_column(col)
    for j in store.list(project):
        version = j.version or (j.progress or {}).get("model_version") or ""  # a predict job: the version it ran
        table.add_row(str(j.id), str(j.project_id), j.status.value, j.runner, j.reason, version,
                      "" if j.promoted is None else str(j.promoted), (j.error or "").splitlines()[0] if j.error else "")
    stdout_console().print(table)


@jobs_app.command("show")
def jobs_show(job_id: int, home: Home = None) -> None:
    """One job in full: parameters, timings, metrics of candidate and serving model."""
    import json
    import time

    _, _, store = stores(home)
    job = store.get(job_id)
    if job is None:
        console.print(f"[red]error:[/] no job {job_id}")
        raise typer.Exit(2)
    shown = job.public()
    for key in ("created_at", "started_at", "finished_at"):  # epoch floats say nothing to a person
        if shown.get(key):
            shown[key] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(shown[key]))
    typer.echo(json.dumps(shown, indent=2, default=str))


@jobs_app.command("logs")
def jobs_logs(
    job_id: int,
    lines: Annotated[int, typer.Option(help="Lines from the end of the log (0: the whole log). Tandem's own lines "
                                            "(export, split, replay, verdict) are always shown.")] = 200,
    home: Home = None,
) -> None:
    """The end of a job's log (ultralytics' epochs, the export, the promotion verdict), with Tandem's own lines
    from before it."""
    from backend.storage.artifacts import ArtifactStore
    from backend.training.runner import job_log, log_path

    settings, _, store = stores(home)
    if store.get(job_id) is None:
        console.print(f"[red]error:[/] no job {job_id} in {settings.home} (database {display_url(settings.database_url)}; set "
                      "TANDEM_HOME or --home to the server's state folder; tandem jobs list shows its jobs)")
        raise typer.Exit(2)
    text = job_log(settings, job_id, 10**9)
    if not text.strip():  # a job that never started a worker here, or ran elsewhere before logs were stored
        console.print(f"job {job_id} has no log here ({log_path(settings.home, job_id)}) nor in the artifact store "
                      f"({ArtifactStore.from_settings(settings).uri('jobs', job_id, 'log.txt')}): its worker never "
                      "started, or ran on a host whose log was not copied there; `tandem jobs show "
                      f"{job_id}` has its status and error")
        return
    typer.echo(with_own_lines(text, lines))


def with_own_lines(log: str, lines: int) -> str:
    """The last `lines` lines of a log, after Tandem's own lines ("[tandem …]") from before them: the export,
    split and replay lines say what the job trained on, and ultralytics' progress would push them out."""
    every = log.splitlines()
    if lines <= 0 or len(every) <= lines:
        return "\n".join(every)
    before, end = every[:-lines], every[-lines:]
    own = [line for line in before if line.startswith("[tandem ")]
    skipped = len(before) - len(own)
    return "\n".join([*own, f"… {skipped} lines of training output left out (--lines 0 shows the whole log)", *end])


@jobs_app.command("cancel")
def jobs_cancel(job_id: int, home: Home = None) -> None:
    """Stop a queued or running job (and its Modal call); the served model stays as it is."""
    from backend.training.runner import cancel_job

    settings, _, store = stores(home)
    before = store.get(job_id)
    if not cancel_job(store, job_id, home=settings.home):
        console.print(f"[red]error:[/] job {job_id} is not queued or running (tandem jobs list shows them)")
        raise typer.Exit(2)
    job = store.get(job_id)
    console.print(f"job {job_id} cancelled" + (f" — {job.error}" if job.error and job.error != "cancelled" else ""))
    if before is not None and before.follow_up:
        console.print(f"its queued follow-up ({before.follow_up}) is dropped too: run `tandem train --project "
                      f"{before.project_id}` again for it")
