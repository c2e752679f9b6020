"""`tandem` — the command line, one module per command (group); importing them registers them on `app`."""

# in the order `tandem --help` lists the commands
from backend.cli import serve, select, accept, report, predict, train, demo, jobs, model_versions  # noqa: F401, I001
from backend.cli.common import app

__all__ = ["app"]
