"""`tandem train`: a fine-tune job on a project's corrected labels, followed until it ends."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from backend.cli.common import app, console, stores


@app.command()
def train(
    project: Annotated[int, typer.Option("--project", "-p", help="Label Studio project id.")],
    runner: Annotated[str, typer.Option(help="local (a separate process here) or modal (an H100 on Modal).")] = "local",
    model: Annotated[str, typer.Option(help="yolo (fine-tune the CNN) or vlm (a LoRA adapter on the generative VLM).")
                     ] = "yolo",
    epochs: Annotated[int | None, typer.Option(help="Epochs (YOLO: env TANDEM_TRAIN_EPOCHS, 30; VLM LoRA: 3).")] = None,
    imgsz: Annotated[int | None, typer.Option(help="Training image size (default: the serving model's).")] = None,
    server: Annotated[
        str | None, typer.Option(help="A running Tandem (http://host:port): queue the job there instead of here.")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Follow the job's log until it ends.")] = True,
    home: Annotated[Path | None, typer.Option(envvar="TANDEM_HOME")] = None,
) -> None:
    """Fine-tune on the project's corrected labels; the new version is promoted only if it is not worse."""
    import time

    from backend.training.runner import LocalRunner, log_path

    if runner not in ("local", "modal"):
        raise typer.BadParameter("--runner must be local or modal")
    if model not in ("yolo", "vlm"):
        raise typer.BadParameter("--model must be yolo or vlm")
    settings, _, store = stores(home)
    defaults = settings.training_params() if model == "yolo" else {}  # YOLO's epochs are not LoRA's
    params = {**defaults, **{k: v for k, v in {"epochs": epochs, "imgsz": imgsz}.items() if v}}
    if server:
        import httpx

        auth = settings.basic_auth
        r = httpx.post(f"{server.rstrip('/')}/train", json={"project": project, "runner": runner, "model": model,
                                                           "params": params, "reason": "tandem train"}, auth=auth, timeout=30)
        if r.status_code >= 400:
            console.print(f"[red]error:[/] {r.status_code} {r.text}")
            raise typer.Exit(2)
        job_id = r.json()["id"]
        console.print(f"queued job {job_id} on {server}")
    else:
        active = store.active(project)
        if active:
            console.print(f"project {project} already has job {active[0].id} ({active[0].status.value})")
            job_id = active[0].id
        else:
            if runner == "modal":
                from infra.modal_runner import ModalUnavailable, require_modal_credentials

                try:
                    require_modal_credentials()
                except ModalUnavailable as exc:
                    console.print(f"[red]error:[/] {exc}")
                    raise typer.Exit(2) from exc
            job = store.create(project, model, runner, "tandem train", params)
            job_id = job.id
            LocalRunner(settings, store).start(job)
            console.print(f"job {job_id} started ({runner})")
    if not wait:
        return
    path, shown = log_path(settings.home, job_id), 0
    while True:
        if path.exists():
            lines = path.read_text(errors="replace").splitlines()
            for line in lines[shown:]:
                console.print(line, markup=False, highlight=False)
            shown = len(lines)
        job = store.get(job_id)
        if job and not job.status.active:
            break
        time.sleep(1)
    color = "green" if job.status.value == "succeeded" else "red"
    console.print(f"[{color}]job {job_id} {job.status.value}[/]" + (f": {job.error.splitlines()[0]}" if job.error else ""))
    if job.version:
        console.print(f"version {job.version}: {'promoted' if job.promoted else 'not promoted'}")
    raise typer.Exit(0 if job.status.value == "succeeded" else 1)
