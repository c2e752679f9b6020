"""What every command shares: the Typer app, the stderr console, logging and the state stores."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

app = typer.Typer(
    name="tandem",
    help=(
        "Tandem: a Label Studio ML backend with an active-learning loop.\n\n"
        "Serves pre-annotations from YOLOv8 and/or a vision-language model to Label Studio (RectangleLabels, "
        "PolygonLabels, BrushLabels, Choices), queues the tasks most worth a review (`tandem select`) and retrains on the "
        "corrections (`tandem train`, `tandem jobs`, `tandem models`). Run `tandem serve` and add "
        "http://HOST:PORT as the project's model under Settings → Model; `tandem demo` shows the whole loop.\n\n"
        "Environment: LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY (personal access token or legacy token), "
        "TANDEM_HOME (state, default ~/.tandem), BASIC_AUTH_USER/BASIC_AUTH_PASS, TANDEM_ALLOWED_HOSTS, "
        "TANDEM_LABEL_MAP (JSON {model class: label}), TANDEM_CONF (serving threshold), TANDEM_DATABASE_URL "
        "(PostgreSQL for replicas; default SQLite in TANDEM_HOME), LOCAL_FILES_DOCUMENT_ROOT; the README lists "
        "the rest."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,  # a traceback's locals would print API keys and database passwords
)
# a message piped to a file or a log stays one line, and a progress bar's text is not cut at 80 columns there
console = Console(stderr=True, soft_wrap=True,
                  width=None if sys.stderr.isatty() or os.environ.get("COLUMNS") else 220)
# every command reads and writes the same state as the server it means
Home = Annotated[Path | None, typer.Option(help="State folder: SQLite, models, jobs (env TANDEM_HOME, default "
                                                "~/.tandem).", envvar="TANDEM_HOME")]


def stdout_console() -> Console:
    """Tables on stdout; piped output gets a wide console so columns are not cut to 80 characters."""
    import sys

    return Console() if sys.stdout.isatty() else Console(width=220)


def setup_logging(level: str) -> None:
    """Rich on a terminal; one plain line per record when stderr is a file or a pipe (`nohup … > log`), so a
    task's reason is one greppable line, not wrapped at 80 columns."""
    import sys

    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(console=console, show_path=False)
        fmt = "%(message)s"
    else:
        handler, fmt = logging.StreamHandler(sys.stderr), "%(asctime)s %(levelname)-7s %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, handlers=[handler])
    handler.setFormatter(logging.Formatter(fmt))
    if level.lower() != "debug":  # one line per HTTP request (every image download) drowns what matters
        logging.getLogger("httpx").setLevel(logging.WARNING)


def load_settings(**overrides):
    """Settings from the environment and the command's options; a value Tandem cannot run with is one line."""
    from backend.errors import SettingsError
    from backend.settings import Settings

    try:
        return Settings.from_env(**overrides)
    except SettingsError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc


def stores(home: Path | None):
    from backend.registry import Registry
    from backend.training.jobs import JobStore
    from backend.training.runner import reap_abandoned

    settings = load_settings(home=home)
    jobs = JobStore(settings.database_url)
    reap_abandoned(jobs)  # a job whose worker died (or whose lease ran out) would otherwise show 'running' for good
    return settings, Registry(settings.database_url), jobs


@contextmanager
def reading_project(settings, project: int) -> Iterator[None]:
    """A command's reading of a Label Studio project: Tandem's own errors print as they are, the SDK's HTTP
    errors (an unreachable Label Studio, a wrong key, no such project) as one line naming the project; exit 2."""
    from backend.errors import TandemError

    try:
        yield
    except TandemError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    except Exception as exc:  # noqa: BLE001 - anything else from the SDK or httpx, said in one line
        from backend.labelstudio.errors import describe

        console.print(f"[red]error:[/] cannot read project {project}: {describe(exc, settings.label_studio_url)}")
        raise typer.Exit(2) from exc
