"""Real `meterline pipeline` processes, killed (SIGKILL) and frozen (SIGSTOP) at random.

Used by tests/test_kill_and_freeze.py with a few rounds, and by `make soak`
(the same test with many rounds and events, figures printed) by hand.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from meterline.lib.settings import Settings

#: The pipelines' Kafka session timeout: a frozen one loses its partitions after it.
SESSION_TIMEOUT_S = 3.0


@dataclass
class Tally:
    kills: int = 0
    freezes: int = 0
    rounds: int = 0
    log: list[str] = field(default_factory=list)


class PipelineFleet:
    """``size`` pipeline processes with one environment; each logs to its own file."""

    def __init__(self, env: Mapping[str, str], size: int, log_dir: Path) -> None:
        self.env = dict(os.environ) | dict(env)
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * size
        self.starts = 0

    def start(self, i: int) -> None:
        self.starts += 1
        log = self.log_dir / f"pipeline-{i}-{self.starts}.log"
        with log.open("wb") as output:  # the child keeps its own copy of the descriptor
            self.processes[i] = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "pipeline"],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=output,
            )

    def start_all(self) -> None:
        for i in range(len(self.processes)):
            self.start(i)

    def _process(self, i: int) -> subprocess.Popen[bytes]:
        process = self.processes[i]
        assert process is not None
        if process.poll() is not None:
            raise AssertionError(f"pipeline {i} exited with {process.returncode}:\n{self.logs()}")
        return process

    def kill(self, i: int) -> None:
        process = self._process(i)
        process.send_signal(signal.SIGKILL)
        process.wait()

    def freeze(self, i: int, seconds: float) -> None:
        process = self._process(i)
        process.send_signal(signal.SIGSTOP)
        time.sleep(seconds)
        process.send_signal(signal.SIGCONT)

    def check_alive(self) -> None:
        for i in range(len(self.processes)):
            self._process(i)

    def stop_all(self, timeout_s: float = 60) -> list[int]:
        """SIGTERM every process (each drains and commits); their exit codes."""
        codes = []
        for process in self.processes:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            if process is not None:
                codes.append(process.wait(timeout=timeout_s))
        return codes

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}"
            for path in sorted(self.log_dir.glob("pipeline-*.log"))
        )


def havoc(
    fleet: PipelineFleet,
    *,
    rounds: int,
    session_timeout_s: float,
    rng: random.Random,
    between: Callable[[int], None] = lambda round_: None,
) -> Tally:
    """Kill or freeze a random instance each round, at a random instant.

    A killed instance is started again at once (its records are replayed by
    whoever gets its partitions); a frozen one sleeps past its session
    timeout, so the group moves its partitions while it holds a batch, then
    wakes up and carries on where it stopped.
    """
    tally = Tally()
    for round_ in range(rounds):
        time.sleep(rng.uniform(0.1, 1.0))
        i = rng.randrange(len(fleet.processes))
        if rng.random() < 0.5:
            fleet.kill(i)
            fleet.start(i)
            tally.kills += 1
            tally.log.append(f"round {round_}: killed {i}")
        else:
            seconds = session_timeout_s + rng.uniform(0.5, 2.0)
            fleet.freeze(i, seconds)
            tally.freezes += 1
            tally.log.append(f"round {round_}: froze {i} for {seconds:.1f} s")
        tally.rounds += 1
        between(round_)
    return tally


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    kafka = settings.kafka
    return {
        "METERLINE_KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "METERLINE_KAFKA_TOPIC": kafka.topic,
        "METERLINE_KAFKA_DEAD_LETTER_TOPIC": kafka.dead_letter_topic,
        "METERLINE_KAFKA_CONSUMER_GROUP": kafka.consumer_group,
        "METERLINE_KAFKA_SESSION_TIMEOUT_MS": str(int(SESSION_TIMEOUT_S * 1000)),
        "METERLINE_PIPELINE_MAX_BATCH_EVENTS": "400",
        "METERLINE_PIPELINE_MAX_BATCH_WAIT_MS": "50",
        "METERLINE_METRICS_PORT": "0",
        "METERLINE_POSTGRES_URL": settings.postgres.url,
        # quota settles go to this machine's Redis, under the test's own prefix
        "METERLINE_REDIS_URL": "redis://127.0.0.1:6379/0",
        "METERLINE_REDIS_KEY_PREFIX": f"{kafka.consumer_group}:",
        "METERLINE_KEYS_SECRET": settings.keys.secret.get_secret_value(),
        **extra,
    }


async def uncommitted(settings: Settings) -> int:
    """Records of the topic the group has not committed: 0 once all are stored.

    The partitions' ends are read from a fetch's high watermark: the embedded
    broker's ListOffsets gives the start of the last record batch instead.
    """
    kafka = settings.kafka
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=kafka.consumer_group,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(kafka.topic, p) for p in range(kafka.partitions)]
        consumer.assign(partitions)
        committed = {tp: await consumer.committed(tp) or 0 for tp in partitions}
        for tp in partitions:
            consumer.seek(tp, max(0, committed[tp] - 1))
        for _ in range(20):
            await consumer.getmany(timeout_ms=100)
            if all(consumer.highwater(tp) is not None for tp in partitions):
                break
        return sum(max(0, (consumer.highwater(tp) or 0) - committed[tp]) for tp in partitions)
    finally:
        await consumer.stop()


async def drained(settings: Settings, fleet: PipelineFleet, timeout_s: float) -> None:
    """Wait until the fleet has committed every record of the topic (its instances
    alive), for at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (left := await uncommitted(settings)) > 0:
        fleet.check_alive()
        assert time.monotonic() < deadline, f"{left} records never committed\n{fleet.logs()}"
        await asyncio.sleep(0.2)
