"""`tandem projects`: the Label Studio projects this database has recorded, and forgetting one.

Label Studio tells an ML backend nothing when a project is deleted, so its record (config, credentials,
binding, label map) stays until someone forgets it here; the next /setup of a live project records it again.
"""

from __future__ import annotations

from typing import Annotated

import typer

from backend.cli.common import Home, app, console, load_settings, stdout_console

projects_app = typer.Typer(help="Connected projects: list them, forget a deleted one.", no_args_is_help=True)
app.add_typer(projects_app, name="projects")


def _tags(label_config: str | None) -> str:
    """The config's controls, e.g. "rectanglelabels 'label' (3 labels)": what the project asks for."""
    if not label_config:
        return "no config yet"
    from backend.errors import TandemError
    from backend.labeling.config import parse_label_config

    try:
        config = parse_label_config(label_config)
    except TandemError as exc:
        return f"unservable config ({str(exc)[:60]})"
    return ", ".join(f"{c.title} ({len(c.labels)} labels)" for c in config.controls)


@projects_app.command("list")
def projects_list(home: Home = None) -> None:
    """Every project that called /setup on a server with this database: what it asks for and what serves it."""
    from rich.table import Table

    from backend.storage.projects import ProjectRepo

    settings = load_settings(home=home)
    states = ProjectRepo(settings.database_url).all()
    if not states:
        console.print(f"no project has connected to a server with this database (TANDEM_HOME {settings.home})")
        return
    table = Table(title=f"Connected projects ({len(states)} of at most {settings.max_projects}, TANDEM_MAX_PROJECTS)")
    for col in ("project", "asks for", "Label Studio", "model", "second opinion", "label map"):
        table.add_column(col)
    for s in states:
        table.add_row(str(s.project_id), _tags(s.label_config), s.hostname or "", s.model or "server default",
                      s.second_opinion or "server default", ", ".join(f"{k}→{v}" for k, v in s.label_map.items()))
    stdout_console().print(table)


@projects_app.command("forget")
def projects_forget(
    project: Annotated[int, typer.Argument(help="Label Studio project id (tandem projects list).")],
    home: Home = None,
) -> None:
    """Forget a project deleted in Label Studio: its config, credentials, binding and label map.

    Its stored predictions, jobs and model versions stay (other projects may be served a version it trained).
    If the project still exists, Label Studio's next /setup records it again, without its binding."""
    from backend.storage.projects import ProjectRepo

    settings = load_settings(home=home)
    projects = ProjectRepo(settings.database_url)
    if projects.get(project) is None:
        console.print(f"[red]error:[/] project {project} is not recorded in this database (TANDEM_HOME "
                      f"{settings.home}): tandem projects list shows those that are")
        raise typer.Exit(2)
    projects.delete(project)
    console.print(f"project {project} forgotten: its config, credentials, binding and label map are removed; its "
                  "stored predictions, jobs and model versions stay")
