"""From a reported event to its usage and its debit in the HTTP API: how long, idle and
under load.

Run by hand, not in CI::

    .venv/bin/python bench/event_latency.py [--probes 200] [--load 1000]

Starts `meterline up` on a fresh data directory and free ports (embedded Tansu, chDB,
PostgreSQL, Redis), twice: with the pipeline's defaults (a batch is written as soon as
nothing more is waiting, after ``min_batch_wait_ms`` = 100), and as a baseline in the
same run with ``METERLINE_PIPELINE_MIN_BATCH_WAIT_MS`` = ``max_batch_wait_ms`` (every
batch waits the full second, as before). In each, a probe account on a prepaid plan,
with credits, reports one event at a time over gRPC ingest with the service key; from
ingest's acknowledgement, the probe polls ``GET /v1/accounts/{probe}/usage`` and
``/balance`` every 5 ms until the event is counted and its charge debited. Idle:
nothing else is sent. Under load: a background gateway sends ``--load`` events/s of
other accounts meanwhile. Prints p50, p90 and p99 of each and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
from google.protobuf.timestamp_pb2 import Timestamp

from meterline.accounts.grpc import key_channel
from meterline.lib.kafka import free_port
from meterline.v1 import ingest_pb2, ingest_pb2_grpc, usage_pb2
from services.simulate import Gateway

POLL_S = 0.005


class Up:
    """A `meterline up` process of the benchmark's own."""

    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self.ingest_port, self.http_port = free_port(), free_port()
        self.data_dir = data_dir
        self.env = (
            os.environ
            | env
            | {
                "METERLINE_DATA_DIR": str(data_dir),
                "METERLINE_GRPC_PORT": str(self.ingest_port),
                "METERLINE_HTTP_PORT": str(self.http_port),
                "METERLINE_QUOTA_PORT": str(free_port()),
                "METERLINE_KAFKA_EMBEDDED_PORT": str(free_port()),
                "METERLINE_POSTGRES_EMBEDDED_PORT": str(free_port()),
                "METERLINE_REDIS_EMBEDDED_PORT": str(free_port()),
            }
        )

    @contextlib.contextmanager
    def running(self) -> Iterator[Up]:
        log = (self.data_dir.parent / f"{self.data_dir.name}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "up"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 120
            while not (self.data_dir / "keys.json").exists() or not self._answers():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"meterline up did not start; see {log.name}")
                time.sleep(0.2)
            yield self
        finally:
            process.terminate()
            process.wait(timeout=90)
            log.close()

    def _answers(self) -> bool:
        try:
            return httpx.get(f"{self.api}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def key(self, kind: str) -> str:
        return str(json.loads((self.data_dir / "keys.json").read_text())[f"{kind}_key"])


def probe_event(account: str) -> usage_pb2.UsageEvent:
    now = Timestamp()
    now.FromDatetime(datetime.now(UTC))
    return usage_pb2.UsageEvent(
        event_id=str(uuid.uuid4()),
        occurred_at=now,
        account_id=account,
        model="openai/gpt-4.1-mini",
        provider="openai",
        status=usage_pb2.REQUEST_STATUS_OK,
        input_tokens=100,
        output_tokens=10,
    )


@contextlib.asynccontextmanager
async def background(up: Up, rate: float) -> AsyncIterator[None]:
    """``rate`` events a second of 50 other accounts, in calls of 20, until the block ends."""
    stop = asyncio.Event()

    async def send() -> None:
        gateway = Gateway(accounts=50, seed=1, run_tag=uuid.uuid4().hex[:6])
        async with key_channel(f"127.0.0.1:{up.ingest_port}", up.key("service")) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            started, sent = time.monotonic(), 0
            while not stop.is_set():
                events = [gateway.event() for _ in range(20)]
                await stub.ReportUsage(ingest_pb2.ReportUsageRequest(events=events))
                sent += len(events)
                await asyncio.sleep(max(0.0, started + sent / rate - time.monotonic()))

    task = asyncio.create_task(send()) if rate else None
    try:
        await asyncio.sleep(2.0 if rate else 0.0)  # the load settles before probing
        yield
    finally:
        stop.set()
        if task is not None:
            await task


async def prepaid_account(http: httpx.AsyncClient) -> str:
    """A new account on a prepaid plan, with $1,000 of credits."""
    account = f"probe-{uuid.uuid4().hex[:8]}"
    plan = f"prepaid-{uuid.uuid4().hex[:8]}"
    for path, body in (
        ("/v1/accounts", {"account_id": account}),
        ("/v1/plans", {"plan_id": plan, "billing": "prepaid"}),
        (f"/v1/accounts/{account}/plan", {"plan_id": plan}),
        (f"/v1/accounts/{account}/grants", {"amount_usd": "1000", "idempotency_key": plan}),
    ):
        response = await http.post(path, json=body)
        response.raise_for_status()
    await asyncio.sleep(6)  # the pipeline's plan cache (5 s) learns the assignment
    return account


async def probe(up: Up, probes: int) -> dict[str, list[float]]:
    """Seconds from ingest's answer to the usage API counting the event, and to the
    balance having moved by its charge, per probe."""
    seconds: dict[str, list[float]] = {"usage": [], "balance": []}
    headers = {"Authorization": f"Bearer {up.key('admin')}"}
    async with (
        key_channel(f"127.0.0.1:{up.ingest_port}", up.key("service")) as channel,
        httpx.AsyncClient(base_url=up.api, headers=headers) as http,
    ):
        account = await prepaid_account(http)
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        last = Decimal((await http.get(f"/v1/accounts/{account}/balance")).json()["balance_usd"])
        for n in range(1, probes + 1):
            await stub.ReportUsage(ingest_pb2.ReportUsageRequest(events=[probe_event(account)]))
            acknowledged = time.monotonic()
            seen: dict[str, float] = {}
            while len(seen) < 2:
                if "usage" not in seen:
                    usage = (await http.get(f"/v1/accounts/{account}/usage")).json()
                    if usage["totals"]["requests"] >= n:
                        seen["usage"] = time.monotonic()
                if "balance" not in seen:
                    balance = (await http.get(f"/v1/accounts/{account}/balance")).json()
                    if Decimal(balance["balance_usd"]) < last:
                        seen["balance"] = time.monotonic()
                        last = Decimal(balance["balance_usd"])
                await asyncio.sleep(POLL_S)
            for what, at in seen.items():
                seconds[what].append(at - acknowledged)
            await asyncio.sleep(0.05)
    return seconds


def quantiles(values: list[float]) -> tuple[float, float, float]:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49] * 1000, cuts[89] * 1000, cuts[98] * 1000


async def measure(up: Up, probes: int, load: float) -> dict[str, tuple[float, float, float]]:
    found = {}
    for name, rate in (("idle", 0.0), (f"{load:.0f}/s", load)):
        async with background(up, rate):
            for what, seconds in (await probe(up, probes)).items():
                found[f"{name}, {what}"] = quantiles(seconds)
    return found


def main(args: argparse.Namespace) -> None:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if "model name" in ln), "?")
    print(f"machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}")
    results: dict[str, dict[str, tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="meterline-latency-") as tmp:
        for label, env in (
            ("written when nothing waits (default)", {}),
            (
                "baseline: every batch waits max_batch_wait_ms",
                {
                    "METERLINE_PIPELINE_MIN_BATCH_WAIT_MS": "1000",
                },
            ),
        ):
            up = Up(Path(tmp) / f"up-{len(results)}", env)
            with up.running():
                results[label] = asyncio.run(measure(up, args.probes, args.load))
    print(f"\n{args.probes} probes each; ms from ingest's answer to the usage API counting it")
    print("and to the balance moving by its charge")
    print(f"{'':56} {'p50':>8} {'p90':>8} {'p99':>8}")
    labels = list(results)
    for label in labels:
        for load, (p50, p90, p99) in results[label].items():
            print(f"{label[:30] + ', ' + load:56} {p50:8.1f} {p90:8.1f} {p99:8.1f}")
    base = results[labels[1]]
    for load, (p50, _, p99) in results[labels[0]].items():
        b50, _, b99 = base[load]
        print(f"ratio to the baseline, {load}: p50 {p50 / b50:.2f}, p99 {p99 / b99:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=200, help="events timed, each alone")
    parser.add_argument("--load", type=float, default=1000.0, help="background events/s")
    main(parser.parse_args())
