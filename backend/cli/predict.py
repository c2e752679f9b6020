"""`tandem predict`: pre-annotate every task of a project that lacks a prediction for the current model version."""

from __future__ import annotations

from typing import Annotated

import typer

from backend.cli.common import Home, app, console, load_settings, setup_logging


@app.command()
def predict(
    project: Annotated[int, typer.Option("--project", "-p", help="Label Studio project id.")],
    runner: Annotated[str, typer.Option(help="local (this process) or modal (images fanned out to a GPU "
                                             "function over the Modal Volume).")] = "local",
    model: Annotated[str | None, typer.Option("--model", "-m", help="Weights, registry version or VLM; default: "
                                                                    "what serves the project.")] = None,
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="Parallel image fetches.")] = 4,
    batch: Annotated[int, typer.Option(min=1, max=512, help="Tasks per chunk (one inference call, one store "
                                                           "write).")] = 16,
    job: Annotated[int | None, typer.Option(help="Resume this predict job (default: the project's job whose "
                                                 "runner died, else a new one).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda:0 … (default: CUDA when present).")] = None,
    engine: Annotated[str, typer.Option(help="pipeline (YOLO detect/segment: images decoded, letterboxed and "
                                             "predicted on the GPU from their bytes), adapter (the model as "
                                             "/predict serves it), or auto: pipeline on CUDA where it serves "
                                             "the model, else adapter.")] = "auto",
    home: Home = None,
    redo_unstamped: Annotated[bool, typer.Option(
        help="Predict again the predictions an older Tandem stored without the thresholds they were made under "
             "(kept as they are by default; after an upgrade and a new TANDEM_CONF, this redoes them).")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar (the server's worker).")] = False,
    handed_by: Annotated[str | None, typer.Option(hidden=True, envvar="TANDEM_PREDICT_HANDED_BY",
                                                  help="The server's lease this process takes over.")] = None,
) -> None:
    """Pre-annotate a whole project as a resumable job: stored, written into Label Studio in bulk, and served
    from the store by "Retrieve predictions" afterwards. Killed and run again, it continues where it stopped."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    from backend.batch.predict_job import JobOptions
    from backend.batch.runner import run_project
    from backend.errors import TandemError

    setup_logging("warning")
    if runner not in ("local", "modal"):
        raise typer.BadParameter("--runner must be local or modal")
    if engine not in ("auto", "pipeline", "adapter"):
        raise typer.BadParameter("--engine must be auto, pipeline or adapter")
    settings = load_settings(home=home, device=device)
    options = JobOptions(concurrency=concurrency, batch=batch, redo_unstamped=redo_unstamped)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("failed {task.fields[failed]}"), TimeElapsedColumn(), TimeRemainingColumn())
    opened: list[int] = []

    def say(text: str) -> None:
        """To the terminal and, run from a shell, to the job's log (`tandem jobs logs N`): a server-started
        job (--quiet) has its whole output there already."""
        console.print(text)
        if not quiet and opened:
            import time

            from rich.text import Text

            from backend.training.runner import log_path

            path = log_path(settings.home, opened[0])
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as out:
                out.write(f"[tandem {time.strftime('%H:%M:%S')}] {Text.from_markup(text).plain}\n")

    try:
        with Progress(*columns, console=console, disable=quiet) as bar:
            bar_ids: list = []  # the bar appears once a job is open: a wrong project draws none

            def on_job(record) -> None:
                opened.append(record.id)
                bar_ids.append(bar.add_task(f"predict job {record.id} · project {project}", total=None, failed=0))
                if quiet:
                    console.print(f"predict job {record.id} on project {project}")
                else:
                    say(f"predict job {record.id} on project {project} started by `tandem predict` in a shell (its "
                        "progress bar is shown there)")

            def on_progress(p) -> None:
                if bar_ids:
                    bar.update(bar_ids[0], total=p.total or None, completed=p.done + p.failed, failed=p.failed)

            try:
                record, result = run_project(settings, project, model=model, options=options, runner=runner, job_id=job,
                                             on_progress=on_progress, on_job=on_job, handed_by=handed_by,
                                             engine=engine)
            except TandemError as exc:
                say(f"[red]error:[/] {exc}")
                raise typer.Exit(2) from exc
            except Exception as exc:  # Label Studio unreachable, wrong key, no such project
                from backend.labelstudio.errors import describe

                from label_studio_sdk.core.api_error import ApiError

                again = ("" if isinstance(exc, ApiError) and exc.status_code in (401, 403, 404) else
                         "; run it again to continue (what is stored is kept)")
                say(f"[red]error:[/] predict on project {project} stopped: {describe(exc, settings.label_studio_url)}"
                    f"{again}")
                raise typer.Exit(1) from exc
        say(f"predict job {record.id}: {record.status.value}; {result.done} of {result.total} tasks have a "
            f"{result.model_version} prediction ({result.predicted} predicted now, {result.written} written to "
            f"Label Studio), {result.failed} failed")
        if result.unstamped:
            say(f"{result.unstamped} of them were stored by an older Tandem, before it recorded the thresholds a "
                "prediction was made under, and are kept as they are: `--redo-unstamped` predicts them again")
        if result.redone:
            say(f"{result.redone} of them were stored under other thresholds (TANDEM_CONF, --vlm-threshold): made "
                "again, replacing their earlier prediction of this version in Label Studio")
        for tid, why in list(result.failures.items())[:10]:
            say(f"  [yellow]task {tid}:[/] {why}")
        if record.status == "cancelled":
            raise typer.Exit(1)
    finally:
        if not quiet and opened:  # where `tandem jobs logs N` on another replica (another home) reads it
            _publish_log(settings, opened[0])


def _publish_log(settings, job_id: int) -> None:
    """Copy the job's log into the artifact store, as the server's runner does; a store that cannot take it
    (or cannot be opened) costs one line, never the job's own result or error."""
    from backend.storage.artifacts import ArtifactStore
    from backend.training.runner import log_path, publish_log

    try:
        store = ArtifactStore.from_settings(settings)
    except Exception as exc:  # noqa: BLE001 - a root no driver can open: the log stays in this home
        console.print(f"[yellow]warning:[/] predict job {job_id}'s log stays in {settings.home} (the artifact store "
                      f"cannot be opened: {type(exc).__name__}: {exc})")
        return
    publish_log(store, log_path(settings.home, job_id), job_id)
