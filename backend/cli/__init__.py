"""`tandem` — the command line, one module per command (group); importing them registers them on `app`."""

# in the order `tandem --help` lists the commands
from backend.cli import serve, select, accept, report, predict, train, demo, jobs, model_versions, projects  # noqa: F401, I001
from backend.cli.common import app, console


def main() -> None:
    """`tandem`: a database that does not answer is one line (with the password masked), not a traceback."""
    from sqlalchemy.exc import DatabaseError, InterfaceError

    from backend.storage.db import unavailable
    from backend.storage.migrate import SchemaTooNew

    try:
        app()
    except SchemaTooNew as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except (DatabaseError, InterfaceError) as exc:  # down, damaged, read-only, full: one line (OperationalError too)
        from rich.markup import escape

        console.print(f"[red]error:[/] {escape(unavailable(exc, _database_url()))}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None


def _database_url() -> str | None:
    """The database the command used, to name it (the SQLite file under TANDEM_HOME when no URL is set)."""
    import os

    try:
        from backend.settings import Settings

        return Settings.from_env().database_url
    except Exception:  # noqa: BLE001 - settings Tandem cannot read: name what the environment says, if anything
        return os.environ.get("TANDEM_DATABASE_URL")


__all__ = ["app", "main"]
