"""`meterline up` as a user runs it: a real process, simulated gateway traffic, signals."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from meterline.accounts.grpc import key_channel
from meterline.lib.kafka import free_port
from meterline.money import format_usd
from meterline.v1 import ingest_pb2, ingest_pb2_grpc, quota_pb2, quota_pb2_grpc, usage_pb2
from services.simulate import SentTotals, simulate


class Up(NamedTuple):
    process: subprocess.Popen[str]
    target: str  # the ingest gRPC address
    quotas: str  # the quota gRPC address
    api: str
    kafka_port: int
    banner: str
    data_dir: Path

    def key(self, kind: str) -> str:
        """The key of ``kind`` that `meterline up` made on its first start."""
        return str(json.loads((self.data_dir / "keys.json").read_text())[f"{kind}_key"])

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key('admin')}"}


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


@contextlib.contextmanager
def start_up(data_dir: Path, *, background: bool = False) -> Iterator[Up]:
    """`meterline up` in a process group of its own, on free ports; ``background``: SIGINT
    ignored, as a shell script's ``meterline up &`` starts it."""
    grpc_port, http_port, kafka_port, quota_port = (free_port() for _ in range(4))
    env = os.environ | {
        "METERLINE_DATA_DIR": str(data_dir),
        "METERLINE_KAFKA_EMBEDDED_PORT": str(kafka_port),
        "METERLINE_POSTGRES_EMBEDDED_PORT": str(free_port()),
        "METERLINE_REDIS_EMBEDDED_PORT": str(free_port()),
        "METERLINE_QUOTA_PORT": str(quota_port),
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
        assert f"quotas (gRPC)     127.0.0.1:{quota_port}" in text, text
        target, api = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
        yield Up(process, target, f"127.0.0.1:{quota_port}", api, kafka_port, text, data_dir)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        stdout.close()


@pytest.fixture
def meterline_up(server_dir: Path, request: pytest.FixtureRequest) -> Iterator[Up]:
    """`meterline up` on a new data directory; param True: started in the background."""
    with start_up(server_dir / "data", background=getattr(request, "param", False)) as up:
        yield up


async def quietly(up: Up) -> SentTotals:
    """800 events of 4 accounts with the service key, the progress bar to nowhere."""
    return await simulate(
        up.target,
        key=up.key("service"),
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
    process, api = meterline_up.process, meterline_up.api
    sent = await quietly(meterline_up)
    assert sent.accepted == 800

    async with httpx.AsyncClient(base_url=api, headers=meterline_up.admin()) as client:
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


async def test_a_gateway_asks_before_each_request_and_its_usage_settles_the_answer(
    meterline_up: Up,
) -> None:
    """`meterline up` alone: a plan of 2 requests in flight, checks over its quota port,
    usage over ingest, and the settle by its pipeline frees the slots."""
    account = "front-door-quotas"
    async with httpx.AsyncClient(base_url=meterline_up.api, headers=meterline_up.admin()) as http:
        for path, body in (
            ("/v1/accounts", {"account_id": account, "timezone": "Asia/Tokyo"}),
            ("/v1/plans", {"plan_id": "two", "limits": {"max_in_flight": 2}}),
            (f"/v1/accounts/{account}/plan", {"plan_id": "two"}),
        ):
            assert (await http.post(path, json=body)).status_code == 201, path
        async with (
            key_channel(meterline_up.quotas, meterline_up.key("service")) as quota_channel,
            key_channel(meterline_up.target, meterline_up.key("service")) as ingest_channel,
        ):
            quotas = quota_pb2_grpc.QuotaServiceStub(quota_channel)
            ingest = ingest_pb2_grpc.IngestServiceStub(ingest_channel)

            async def check(event_id: str) -> quota_pb2.CheckQuotaResponse:
                return await quotas.CheckQuota(
                    quota_pb2.CheckQuotaRequest(
                        account_id=account,
                        model="openai/gpt-4.1-mini",
                        provider="openai",
                        input_tokens=100,
                        max_output_tokens=100,
                        event_id=event_id,
                    )
                )

            ids = [str(uuid.uuid4()) for _ in range(3)]
            first, second, third = [await check(i) for i in ids]
            assert first.allowed and second.allowed
            assert not third.allowed and third.reason == quota_pb2.DENY_REASON_IN_FLIGHT
            events = [usage_event(account, i) for i in ids[:2]]
            reported = await ingest.ReportUsage(ingest_pb2.ReportUsageRequest(events=events))
            assert reported.accepted == 2
            deadline = time.monotonic() + 30
            while not (answer := await check(str(uuid.uuid4()))).allowed:  # a slot freed
                assert time.monotonic() < deadline, answer.message
                await asyncio.sleep(0.2)
        quota = (await http.get(f"/v1/accounts/{account}/quota")).json()
    assert quota["timezone"] == "Asia/Tokyo" and quota["plan_id"] == "two"
    assert [(q["limit"], q["used"], q["cap"]) for q in quota["limits"]] == [("in_flight", "1", "2")]


def usage_event(account: str, event_id: str) -> usage_pb2.UsageEvent:
    """The usage event of a request the check allowed: it carries the check's id."""
    occurred = Timestamp()
    occurred.GetCurrentTime()
    return usage_pb2.UsageEvent(
        event_id=event_id,
        occurred_at=occurred,
        account_id=account,
        model="openai/gpt-4.1-mini",
        provider="openai",
        status=usage_pb2.REQUEST_STATUS_OK,
        input_tokens=100,
        output_tokens=40,
    )


@pytest.fixture
def slow_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Records wait in Kafka (up to 30 s) for their batch: the stop must price them."""
    monkeypatch.setenv("METERLINE_PIPELINE_MAX_BATCH_WAIT_MS", "30000")


async def test_ctrl_c_in_a_terminal_prices_what_kafka_holds_then_stops(
    slow_batches: None, meterline_up: Up
) -> None:
    """Ctrl-C signals the terminal's whole process group, the embedded broker's too."""
    sent = await quietly(meterline_up)
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


async def test_first_keys_are_shown_once_and_the_store_outlives_a_restart(
    server_dir: Path,
) -> None:
    """The embedded PostgreSQL keeps accounts and keys; a second start makes no new keys."""
    data_dir = server_dir / "data"
    with start_up(data_dir) as first:
        admin, service = first.key("admin"), first.key("service")
        assert admin in first.banner and service in first.banner
        assert stat.S_IMODE((data_dir / "keys.json").stat().st_mode) == 0o600
        async with httpx.AsyncClient(base_url=first.api) as client:
            assert (await client.get("/v1/accounts")).status_code == 401
            made = await client.post(
                "/v1/accounts",
                json={"account_id": "acme", "timezone": "Asia/Tokyo"},
                headers=first.admin(),
            )
            assert made.status_code == 201, made.text
            gateway = {"Authorization": f"Bearer {service}"}
            assert (await client.get("/v1/accounts", headers=gateway)).status_code == 403
        first.process.send_signal(signal.SIGTERM)
        output, _ = first.process.communicate(timeout=60)
        assert first.process.returncode == 0, output
    with start_up(data_dir) as second:
        assert "API keys made" not in second.banner and admin not in second.banner
        assert second.key("admin") == admin
        async with httpx.AsyncClient(base_url=second.api, headers=second.admin()) as client:
            account = (await client.get("/v1/accounts/acme")).json()
        assert (account["account_id"], account["timezone"]) == ("acme", "Asia/Tokyo")
