"""`tandem` — the command line, one module per command (group); importing them registers them on `app`."""

# in the order `tandem --help` lists the commands
from backend.cli import serve, select, accept, report, predict, train, demo, jobs, model_versions, projects  # noqa: F401, I001
from backend.cli.common import app, console


def main() -> None:
    """`tandem`: a database that does not answer is one line (with the password masked), not a traceback."""
    import os

    from sqlalchemy.exc import InterfaceError, OperationalError

    from backend.storage.db import unavailable

    from backend.storage.migrate import SchemaTooNew

    try:
        app()
    except SchemaTooNew as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except (OperationalError, InterfaceError) as exc:
        from rich.markup import escape

        console.print(f"[red]error:[/] {escape(unavailable(exc, os.environ.get('TANDEM_DATABASE_URL')))}",
                      highlight=False, soft_wrap=True)
        raise SystemExit(2) from None


__all__ = ["app", "main"]
