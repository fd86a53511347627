"""What the embedded servers (PostgreSQL, Redis) share: their output file, waiting
until they answer, and stopping them.

Each server's output goes to a file kept open while it runs, so that an
error message can end with its last lines.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["open_output", "output_tail", "stop_server", "wait_until_answering"]

log = logging.getLogger(__name__)

_TAIL_BYTES = 4000


def open_output(log_path: Path | None) -> IO[bytes]:
    """The server's output file: ``log_path``, else an anonymous one. "a+b": the
    server appends while error messages read the tail back with pread."""
    if log_path is not None:
        return open(log_path, "a+b")
    return tempfile.TemporaryFile(mode="a+b")


def output_tail(output: IO[bytes] | None, log_path: Path | None) -> str:
    """The output's last lines, to end an error message with."""
    if output is None:
        return ""
    fd = output.fileno()
    size = os.fstat(fd).st_size
    tail = os.pread(fd, _TAIL_BYTES, max(0, size - _TAIL_BYTES))
    lines = tail.decode(errors="replace").splitlines()[-15:]
    where = f" ({log_path})" if log_path else ""
    return (f"; last lines of its log{where}:\n" + "\n".join(lines)) if lines else ""


def wait_until_answering(
    process: subprocess.Popen[bytes],
    answers: Callable[[], bool],
    *,
    name: str,
    port: int,
    timeout_s: float,
    poll_s: float,
    error: Callable[[str], Exception],
    tail: Callable[[], str],
) -> None:
    """Poll ``answers()`` until it is true; raise ``error`` if the server exits first or
    does not answer within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise error(f"{name} exited with code {process.returncode}{tail()}")
        if answers():
            return
        if time.monotonic() > deadline:
            raise error(f"{name} did not answer on 127.0.0.1:{port} within {timeout_s} s{tail()}")
        time.sleep(poll_s)


def stop_server(
    process: subprocess.Popen[bytes] | None,
    *,
    name: str,
    sig: signal.Signals = signal.SIGTERM,
    timeout_s: float,
) -> None:
    """Send ``sig``, wait up to ``timeout_s``, then SIGKILL."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop within %s s; killing it", name, timeout_s)
        process.kill()
        process.wait()
