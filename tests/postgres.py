"""A throwaway PostgreSQL cluster for the tests: real server binaries, one cluster per session, a database per test.

PostgreSQL refuses to run as root, so under root (CI containers) initdb and the server run as the `postgres`
user that Debian's package creates, in a folder under /tmp owned by it (pytest's own tmp folders are private
to root). The server listens on 127.0.0.1 only, on a free port, with trust authentication, and writes
nothing durable (fsync off): it is deleted when the session ends.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from backend.dev.local_label_studio import free_port

SERVER_BINARIES = ("initdb", "pg_ctl")
START_TIMEOUT_S = 60


class PostgresUnavailable(RuntimeError):
    """The server binaries are not installed here (CI installs Debian's `postgresql`; see .ci/run)."""


def find_bin_dir() -> Path:
    """The folder holding initdb and pg_ctl: on PATH, else the newest /usr/lib/postgresql/<version>/bin."""
    on_path = [shutil.which(name) for name in SERVER_BINARIES]
    if all(on_path):
        return Path(os.path.realpath(on_path[1])).parent
    candidates = [Path(d) for d in glob.glob("/usr/lib/postgresql/*/bin")
                  if all((Path(d) / name).exists() for name in SERVER_BINARIES)]
    if not candidates:
        raise PostgresUnavailable("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or under "
                                  "/usr/lib/postgresql/*/bin; install Debian's `postgresql` package (.ci/run does)")
    return max(candidates, key=lambda d: [int(x) for x in re.findall(r"\d+", d.parent.name)] or [0])


@dataclass
class PostgresCluster:
    """A running cluster; `url(name)` is a SQLAlchemy URL (psycopg 3) for one of its databases."""

    root: Path
    port: int
    bin_dir: Path
    run_as: str | None  # the unprivileged user the server runs as (None: the current user)
    databases: list[str] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _conninfo(self, database: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database}"

    def create_database(self, name: str) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"database name must be a lower-case identifier, not {name!r}")
        with psycopg.connect(self._conninfo(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Dropped even with connections open (a test's engine pool, a killed replica's sockets)."""
        import psycopg

        with psycopg.connect(self._conninfo(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self.databases:
            self.databases.remove(name)

    def _run(self, *args: str | Path) -> subprocess.CompletedProcess:
        cmd = [str(a) for a in args]
        if self.run_as:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=START_TIMEOUT_S, check=False)

    def _check(self, result: subprocess.CompletedProcess, what: str) -> None:
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""
            raise RuntimeError(f"PostgreSQL {what} failed ({result.returncode}):\n{result.stdout}\n"
                               f"{result.stderr}\n{log}")

    def start(self) -> None:
        sockets = self.root / "sockets"
        sockets.mkdir()
        if self.run_as:
            user = pwd.getpwnam(self.run_as)
            for path in (self.root, sockets):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._check(self._run(self.bin_dir / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust",
                              "-E", "UTF8", "--no-sync", "--locale=C"), "initdb")
        settings = {"listen_addresses": "'127.0.0.1'", "fsync": "off", "synchronous_commit": "off",
                    "full_page_writes": "off", "max_connections": "300", "shared_buffers": "32MB"}
        conf = self.data / "postgresql.conf"
        text = conf.read_text() + "".join(f"\n{k} = {v}" for k, v in settings.items()) + "\n"
        conf.write_text(text)  # as root: the file keeps its owner (postgres)
        self.resume()

    def resume(self) -> None:
        """Start the server on its data (again, after `pause`)."""
        self._check(self._run(self.bin_dir / "pg_ctl", "start", "-w", "-t", str(START_TIMEOUT_S), "-D", self.data,
                              "-l", self.log, "-o", f"-h 127.0.0.1 -p {self.port} -k {self.root / 'sockets'}"),
                    "start")

    def pause(self) -> None:
        """Stop the server and keep its data: an outage a client must live through."""
        self._check(self._run(self.bin_dir / "pg_ctl", "stop", "-m", "fast", "-w", "-D", self.data), "stop")

    def stop(self) -> None:
        if self.data.exists():
            self._run(self.bin_dir / "pg_ctl", "stop", "-m", "immediate", "-w", "-D", self.data)
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster() -> PostgresCluster:
    """Start a cluster (raises PostgresUnavailable when the binaries are missing, RuntimeError when it fails)."""
    bin_dir = find_bin_dir()
    run_as = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("running as root, and PostgreSQL refuses root: create a `postgres` user "
                               "(Debian's postgresql package does)") from None
        run_as = "postgres"
    root = Path(tempfile.mkdtemp(prefix="tandem-pg-", dir="/tmp"))
    cluster = PostgresCluster(root=root, port=free_port(), bin_dir=bin_dir, run_as=run_as)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster
