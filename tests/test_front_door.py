"""`meterline up` as a user runs it: a real process, simulated gateway traffic, signals."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from meterline.lib.kafka import free_port
from meterline.money import format_usd
from services.simulate import SentTotals, simulate


class Up(NamedTuple):
    process: subprocess.Popen[str]
    target: str  # the ingest gRPC address
    api: str
    kafka_port: int


def broker_pid(port: int) -> int:
    """The embedded broker's process, found by the port on its command line."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if f"tcp://127.0.0.1:{port}".encode() in cmdline.read_bytes():
                return int(cmdline.parent.name)
    raise AssertionError(f"no broker on port {port}")


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


@pytest.fixture
def meterline_up(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Up]:
    """`meterline up` in a process group of its own; param True: SIGINT ignored,
    as a shell script's ``meterline up &`` starts it."""
    background = getattr(request, "param", False)
    grpc_port, http_port, kafka_port = free_port(), free_port(), free_port()
    env = os.environ | {
        "METERLINE_DATA_DIR": str(tmp_path / "data"),
        "METERLINE_KAFKA_EMBEDDED_PORT": str(kafka_port),
        "METERLINE_GRPC_PORT": str(grpc_port),
        "METERLINE_HTTP_PORT": str(http_port),
        "METERLINE_PIPELINE_MAX_BATCH_WAIT_MS": os.environ.get(
            "METERLINE_PIPELINE_MAX_BATCH_WAIT_MS", "200"
        ),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group of its own, as in a terminal
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if background else None,
    )
    stdout = process.stdout
    assert stdout is not None  # stdout=PIPE
    try:
        banner: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = stdout.readline()
            assert line, "meterline up exited:\n" + "".join(banner)
            banner.append(line)
            if line.startswith("Press Ctrl-C"):
                break
        text = "".join(banner)
        assert f"127.0.0.1:{grpc_port}" in text and f"http://127.0.0.1:{http_port}" in text, text
        yield Up(process, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", kafka_port)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        stdout.close()


async def quietly(target: str) -> SentTotals:
    """800 events of 4 accounts, the progress bar to nowhere."""
    return await simulate(
        target,
        rate=400,
        duration_s=2,
        accounts=4,
        batch_size=50,
        seed=11,
        console=Console(file=io.StringIO()),
    )


async def test_simulated_gateway_traffic_is_billed_exactly_and_sigterm_stops_cleanly(
    meterline_up: Up,
) -> None:
    process, target, api, _ = meterline_up
    sent = await quietly(target)
    assert sent.accepted == 800

    async with httpx.AsyncClient(base_url=api) as client:
        for account, picos in sent.per_account.items():
            deadline = time.monotonic() + 30
            while True:
                body = (await client.get(f"/v1/accounts/{account}/usage")).json()
                if body["totals"]["cost_usd"] == format_usd(picos) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert body["totals"]["cost_usd"] == format_usd(picos), account
        metrics = (await client.get("/metrics")).text
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
    }
    # one registry for every part: the pipeline's, ingest's and the API's own
    assert samples[("meterline_pipeline_events_total", (("outcome", "consumed"),))] == 800
    accepted = (("outcome", "accepted"), ("reason", "none"))
    assert samples[("meterline_ingest_events_total", accepted)] == 800
    assert any(name == "meterline_http_requests_total" for name, _ in samples)

    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "meterline stopped" in output


@pytest.fixture
def slow_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Records wait in Kafka (up to 30 s) for their batch: the stop must price them."""
    monkeypatch.setenv("METERLINE_PIPELINE_MAX_BATCH_WAIT_MS", "30000")


async def test_ctrl_c_in_a_terminal_prices_what_kafka_holds_then_stops(
    slow_batches: None, meterline_up: Up
) -> None:
    """Ctrl-C signals the terminal's whole process group, the embedded broker's too."""
    sent = await quietly(meterline_up.target)
    assert sent.accepted == 800
    os.killpg(meterline_up.process.pid, signal.SIGINT)
    output, _ = meterline_up.process.communicate(timeout=60)
    assert meterline_up.process.returncode == 0, output
    assert "meterline stopped: {'consumed': 800," in output


def test_a_broker_that_dies_stops_meterline_with_the_reason(meterline_up: Up) -> None:
    os.kill(broker_pid(meterline_up.kafka_port), signal.SIGKILL)
    output, _ = meterline_up.process.communicate(timeout=60)
    assert meterline_up.process.returncode == 1, output
    assert "stopped because the embedded Kafka broker exited with code -9" in output


def test_meterline_killed_takes_its_broker_with_it(meterline_up: Up) -> None:
    """Else the broker keeps the port, and the next `meterline up` cannot start."""
    broker = broker_pid(meterline_up.kafka_port)
    meterline_up.process.kill()
    meterline_up.process.wait()
    deadline = time.monotonic() + 10
    while running(broker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(broker)


@pytest.mark.parametrize("meterline_up", [True], indirect=True, ids=["started-with-&"])
def test_sigint_stops_meterline_started_in_the_background(meterline_up: Up) -> None:
    """SIGINT is meterline's stop signal even where the shell set it to be ignored."""
    meterline_up.process.send_signal(signal.SIGINT)
    output, _ = meterline_up.process.communicate(timeout=60)
    assert meterline_up.process.returncode == 0, output
    assert "meterline stopped" in output
