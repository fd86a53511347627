"""Real `meterline pipeline` processes, killed (SIGKILL) and frozen (SIGSTOP) at random.

Used by tests/test_kill_and_freeze.py with a few rounds, and by `make soak`
(the same test with many rounds and events, figures printed) by hand.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path


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
