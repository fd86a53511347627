"""`meterline up` as a user runs it: a real process, simulated gateway traffic, SIGTERM."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from meterline.kafka import free_port
from meterline.money import format_usd
from meterline.simulate import simulate


@pytest.fixture
def meterline_up(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    grpc_port, http_port = free_port(), free_port()
    env = os.environ | {
        "METERLINE_DATA_DIR": str(tmp_path / "data"),
        "METERLINE_KAFKA_EMBEDDED_PORT": str(free_port()),
        "METERLINE_GRPC_PORT": str(grpc_port),
        "METERLINE_HTTP_PORT": str(http_port),
        "METERLINE_PIPELINE_MAX_BATCH_WAIT_MS": "200",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "meterline.cli", "up"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        banner = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = process.stdout.readline()  # type: ignore[union-attr]
            assert line, "meterline up exited:\n" + "".join(banner)
            banner.append(line)
            if line.startswith("Press Ctrl-C"):
                break
        text = "".join(banner)
        assert f"127.0.0.1:{grpc_port}" in text and f"http://127.0.0.1:{http_port}" in text, text
        yield process, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_simulated_gateway_traffic_is_billed_exactly_and_sigterm_stops_cleanly(
    meterline_up: tuple[subprocess.Popen[str], str, str],
) -> None:
    process, target, api = meterline_up
    sent = await simulate(
        target,
        rate=400,
        duration_s=2,
        accounts=4,
        batch_size=50,
        seed=11,
        console=Console(file=io.StringIO()),
    )
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
    assert "meterline_pipeline_consumed 800" in metrics

    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "meterline stopped" in output
