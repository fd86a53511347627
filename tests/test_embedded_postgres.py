"""The embedded PostgreSQL as real processes: data kept across restarts, a
taken port refused by name, and no server left behind when meterline is killed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from meterline.lib.kafka import free_port
from meterline.lib.postgres.embedded import EmbeddedPostgres, EmbeddedPostgresError

REPO = Path(__file__).resolve().parents[1]


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs; an exited server nobody has reaped yet counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_serves_and_keeps_data_across_restarts(tmp_path: Path) -> None:
    pgdata = tmp_path / "data" / "postgres"
    server = EmbeddedPostgres(pgdata, free_port(), log_path=tmp_path / "postgres.log")
    with server:
        with psycopg.connect(server.url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            version = conn.execute("SHOW server_version_num").fetchone()
            assert version is not None and int(version[0]) >= 180000
            assert conn.execute("SHOW fsync").fetchone() == ("on",)
            conn.execute("CREATE TABLE kept (note text)")
            conn.execute("INSERT INTO kept VALUES ('before restart')")
        first_pid = server.pid
    assert first_pid is not None
    assert server.returncode is not None
    assert not _running(first_pid)

    with server:
        assert server.pid != first_pid
        with psycopg.connect(server.url) as conn:
            assert conn.execute("SELECT note FROM kept").fetchall() == [("before restart",)]
    assert server.returncode is not None


def test_port_in_use_names_the_setting(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = EmbeddedPostgres(tmp_path / "postgres", port)
        with pytest.raises(EmbeddedPostgresError, match="METERLINE_POSTGRES_EMBEDDED_PORT"):
            server.start()
    assert server.pid is None
    assert not (tmp_path / "postgres").exists()


_CHILD = """
import sys, time
from pathlib import Path
from meterline.lib.postgres.embedded import EmbeddedPostgres

server = EmbeddedPostgres(Path(sys.argv[1]), int(sys.argv[2]), log_path=Path(sys.argv[3]))
server.start()
print(server.pid, flush=True)
time.sleep(120)
"""


def test_server_stops_when_its_parent_is_killed(server_dir: Path) -> None:
    log = server_dir / "postgres.log"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(server_dir / "postgres"), str(free_port()), str(log)],
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    pid = None
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line, f"the child exited with {child.wait()}; log:\n{log.read_text()}"
        pid = int(line)
        assert _running(pid)
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert _wait_gone(pid, 10.0), f"PostgreSQL (pid {pid}) outlived its parent"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
        if pid is not None and _running(pid):
            os.kill(pid, signal.SIGKILL)
