"""What checking an API key costs a request, HTTP and gRPC, beside the same call with auth off.

Run by hand, not in CI. Makes a schema of its own on a PostgreSQL server
(``--postgres``) with one account, an account key and a service key, starts
a Tansu broker, then one server process holding four servers on one event
loop, one chDB warehouse and one key ring:

* HTTP: the API twice under uvicorn, ``auth=KeyRing`` and ``auth=OpenDoor()``;
  the call is ``GET /v1/accounts/{account_id}/usage`` of an account with a
  few events, with that account's key (key check + the path's guard) on the
  first, no header on the second;
* gRPC: two ingest servers on the same producer and topic, the first taking
  a service key (``key_channel``), the second ``OpenDoor()``; the call is
  ``ReportUsage`` with one event.

The servers run in a process of their own so that the client's timing loop
does not share their interpreter lock (the machine has two cores), and all
four in the same one so that only the authenticator differs between a pair.
Requests alternate between the two servers of a pair over kept-alive
connections, so drift hits both alike. Each repeat sends ``--warmup`` then
``--requests`` calls to each; the figures are the medians over
``--repeats``.

What the difference is made of: each server's authenticator is wrapped in a
timer (the same wrapper on both sides of a pair), so the server process
reports how long ``authenticate`` took inside a real request; and last,
``KeyRing.authenticate`` alone in a hot ``timeit`` loop, which is the lower
bound (caches warm, nothing else between calls).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import httpx
import psycopg
import uvicorn
from google.protobuf.timestamp_pb2 import Timestamp
from psycopg import sql

from meterline.accounts import Authenticator, KeyKind, KeyRing, OpenDoor
from meterline.accounts.grpc import key_channel
from meterline.accounts.keys import KeyHasher
from meterline.accounts.manage import Accounts
from meterline.accounts.model import Principal
from meterline.accounts.postgres import PostgresAccountStore
from meterline.catalog import PriceBook
from meterline.lib.kafka import EmbeddedBroker, ensure_topics, free_port, start_producer
from meterline.lib.postgres import open_database
from meterline.lib.settings import EventRules, IngestSettings, KafkaSettings, PostgresSettings
from meterline.lib.warehouse.chdb import ChdbWarehouse
from meterline.lib.warehouse.schema import migrate
from meterline.tokens import TokenUsage
from meterline.usage.clickhouse import ClickHouseUsageStore
from meterline.usage.model import PricedEvent, price_event
from meterline.v1 import ingest_pb2, ingest_pb2_grpc, usage_pb2
from services.api.app import create_app
from services.ingest.server import IngestServer

ACCOUNT = "acct-bench-auth"
#: events the account has in the warehouse, so that its usage report is not empty
STORED_EVENTS = 20


class Setup(NamedTuple):
    """What the server process needs: where the keys are, and the broker."""

    postgres: str
    schema: str
    secret: str
    bootstrap_servers: str
    topic: str


class Ports(NamedTuple):
    """Where the server process listens."""

    http_on: int
    http_off: int
    grpc_on: int
    grpc_off: int


class Checks(NamedTuple):
    """Median µs of one ``authenticate`` call inside each server, over all its requests."""

    http_on: float
    http_off: float
    grpc_on: float
    grpc_off: float


# --- the server process --------------------------------------------------------------


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: the process stops when its stdin closes."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class TimedAuthenticator:
    """An authenticator that notes how long each of its calls takes."""

    def __init__(self, inner: Authenticator) -> None:
        self.inner = inner
        self.ns: list[int] = []

    def authenticate(self, key: str | None) -> Principal:
        started = time.perf_counter_ns()
        try:
            return self.inner.authenticate(key)
        finally:
            self.ns.append(time.perf_counter_ns() - started)

    def median_us(self) -> float:
        return statistics.median(self.ns) / 1000 if self.ns else float("nan")


async def _listening(server: _Uvicorn) -> asyncio.Task[None]:
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task
            raise OSError("uvicorn did not start")
        await asyncio.sleep(0.02)
    return task


def stored_events(warehouse: ChdbWarehouse) -> None:
    """A few priced events of the account, this last minute."""
    catalog = PriceBook(warehouse).load()
    now = datetime.now(UTC)
    events = [
        price_event(
            PricedEvent(
                account_id=ACCOUNT,
                event_id=f"ev-{i}",
                api_key_id="key-1",
                model="openai/gpt-4.1-mini",
                provider="openai",
                occurred_at=now - timedelta(seconds=3 * i),
                received_at=now,
                status="ok",
                usage=TokenUsage(input_tokens=1000 + i, output_tokens=200),
                latency_ms=900,
                ttft_ms=300,
                price_id="",
                price_tier="",
                cost_picos=0,
                provider_usage_json="",
                kafka_partition=0,
                kafka_offset=i,
            ),
            catalog,
        )
        for i in range(STORED_EVENTS)
    ]
    ClickHouseUsageStore(warehouse).insert_priced(events)


async def serve(setup: Setup) -> None:
    """The four servers, until stdin closes.

    Prints their ports as one JSON line when they listen, and the medians of
    their ``authenticate`` calls as another when they have stopped.
    """
    with (
        tempfile.TemporaryDirectory() as data_dir,
        open_database(
            setup.postgres, PostgresSettings(url=setup.postgres, schema_name=setup.schema)
        ) as database,
    ):
        warehouse = ChdbWarehouse(Path(data_dir) / "chdb")
        migrate(warehouse)
        PriceBook(warehouse).seed_if_empty()
        stored_events(warehouse)
        store = PostgresAccountStore(database)
        ring = KeyRing(store, KeyHasher(setup.secret.encode()))
        await asyncio.to_thread(ring.load)
        stop = asyncio.Event()
        refreshing = asyncio.create_task(ring.run(stop))  # as a running service does
        accounts = Accounts(store, ring.hasher, ring)
        # http on, http off, grpc on, grpc off
        timed = [TimedAuthenticator(auth) for auth in (ring, OpenDoor(), ring, OpenDoor())]
        https = [
            _Uvicorn(
                uvicorn.Config(
                    create_app(warehouse, auth=timed[i], accounts=accounts),
                    host="127.0.0.1",
                    port=free_port(),
                    log_level="warning",
                    lifespan="on",
                )
            )
            for i in (0, 1)
        ]
        http_tasks = [await _listening(server) for server in https]
        producer = await start_producer(setup.bootstrap_servers, KafkaSettings())
        grpcs = [
            IngestServer(
                producer,
                topic=setup.topic,
                rules=EventRules(),
                settings=IngestSettings(port=0),
                auth=timed[i],
            )
            for i in (2, 3)
        ]
        for ingest in grpcs:
            await ingest.start()
        ports = Ports(https[0].config.port, https[1].config.port, grpcs[0].port, grpcs[1].port)
        print(json.dumps(ports._asdict()), flush=True)
        try:
            await asyncio.to_thread(sys.stdin.read)  # until the benchmark closes our stdin
        finally:
            for ingest in grpcs:
                await ingest.stop()
            await producer.stop()
            for server in https:
                server.should_exit = True
            await asyncio.gather(*http_tasks)
            stop.set()
            await refreshing
            warehouse.close()
        print(json.dumps(Checks(*(t.median_us() for t in timed))._asdict()), flush=True)


@dataclass
class Running:
    """The server process's ports; its checks' timings once it has stopped."""

    ports: Ports
    checks: Checks | None = None


@contextlib.contextmanager
def server_process(setup: Setup) -> Iterator[Running]:
    """This script with ``--serve``: the setup in on its stdin, the ports out on its stdout."""
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write(json.dumps(setup._asdict()) + "\n")
        process.stdin.flush()
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the server process ended (exit code {process.wait()})")
        running = Running(Ports(**json.loads(line)))
        yield running
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    last = process.stdout.readline()
    if last:
        running.checks = Checks(**json.loads(last))


# --- the client: this process --------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    """Latencies of one side, in milliseconds."""

    p50: float
    p99: float
    mean: float

    @staticmethod
    def of(seconds: list[float]) -> Figures:
        ms = [s * 1000 for s in seconds]
        return Figures(
            statistics.median(ms), statistics.quantiles(ms, n=100)[98], sum(ms) / len(ms)
        )


class Pair(NamedTuple):
    """One repeat of an alternation: auth on, auth off."""

    on: Figures
    off: Figures


def alternate(on: Callable[[], None], off: Callable[[], None], n: int) -> Pair:
    """``on``, ``off``, ``on``, ``off``... ``n`` times each, each call timed."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(n):
        for call, spent in ((on, times[0]), (off, times[1])):
            started = time.perf_counter()
            call()
            spent.append(time.perf_counter() - started)
    return Pair(Figures.of(times[0]), Figures.of(times[1]))


def http_repeat(ports: Ports, key: str, n: int, warmup: int) -> Pair:
    """``GET /v1/accounts/{account_id}/usage`` with the account's key, and with auth off."""
    path = f"/v1/accounts/{ACCOUNT}/usage"
    with (
        httpx.Client(base_url=f"http://127.0.0.1:{ports.http_on}") as with_key,
        httpx.Client(base_url=f"http://127.0.0.1:{ports.http_off}") as without,
    ):
        header = {"Authorization": f"Bearer {key}"}
        assert with_key.get(path).status_code == 401, "the auth-on server answers without a key"
        first = with_key.get(path, headers=header)
        assert first.json()["totals"]["requests"] == STORED_EVENTS, first.text

        def on() -> None:
            response = with_key.get(path, headers=header)
            if response.status_code != 200:
                raise RuntimeError(f"auth on: {response.status_code} {response.text}")

        def off() -> None:
            response = without.get(path)
            if response.status_code != 200:
                raise RuntimeError(f"auth off: {response.status_code} {response.text}")

        alternate(on, off, warmup)
        return alternate(on, off, n)


def usage_event() -> usage_pb2.UsageEvent:
    """One event as a gateway reports it."""
    ts = Timestamp()
    ts.FromDatetime(datetime.now(UTC))
    return usage_pb2.UsageEvent(
        event_id=str(uuid.uuid4()),
        occurred_at=ts,
        account_id=ACCOUNT,
        api_key_id="key-1",
        model="openai/gpt-4.1-mini",
        provider="openai",
        status=usage_pb2.REQUEST_STATUS_OK,
        latency_ms=900,
        ttft_ms=300,
        input_tokens=1200,
        output_tokens=200,
    )


async def refuses_without_key(target: str) -> None:
    """The auth-on ingest answers a call without a key UNAUTHENTICATED."""
    async with key_channel(target, None) as channel:
        try:
            await ingest_pb2_grpc.IngestServiceStub(channel).ReportUsage(
                ingest_pb2.ReportUsageRequest(events=[usage_event()])
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                return
            raise
    raise AssertionError("the auth-on ingest takes a call without a key")


async def grpc_repeat(ports: Ports, key: str, n: int, warmup: int) -> Pair:
    """``ReportUsage`` of one event with a service key, and with auth off."""
    async with (
        key_channel(f"127.0.0.1:{ports.grpc_on}", key) as with_key,
        key_channel(f"127.0.0.1:{ports.grpc_off}", None) as without,
    ):
        await refuses_without_key(f"127.0.0.1:{ports.grpc_on}")
        stubs = (
            ingest_pb2_grpc.IngestServiceStub(with_key),
            ingest_pb2_grpc.IngestServiceStub(without),
        )
        times: tuple[list[float], list[float]] = ([], [])
        for count, timed in ((warmup, False), (n, True)):
            requests = [
                [ingest_pb2.ReportUsageRequest(events=[usage_event()]) for _ in range(count)]
                for _ in stubs
            ]
            for i in range(count):
                for stub, side, spent in zip(stubs, requests, times, strict=True):
                    started = time.perf_counter()
                    response = await stub.ReportUsage(side[i])
                    if timed:
                        spent.append(time.perf_counter() - started)
                    if response.accepted != 1:
                        raise RuntimeError(f"not accepted: {response.results[0].reason}")
        return Pair(Figures.of(times[0]), Figures.of(times[1]))


def authenticate_us(ring: KeyRing, key: str, number: int = 20_000) -> float:
    """``KeyRing.authenticate(key)`` alone: µs a call, the median of 5 repeats."""
    runs = timeit.repeat(lambda: ring.authenticate(key), number=number, repeat=5)
    return statistics.median(runs) / number * 1e6


def open_door_us(number: int = 20_000) -> float:
    """``OpenDoor().authenticate``, what the auth-off servers call instead."""
    door = OpenDoor()
    runs = timeit.repeat(lambda: door.authenticate(None), number=number, repeat=5)
    return statistics.median(runs) / number * 1e6


@contextlib.contextmanager
def bench_schema(url: str) -> Iterator[str]:
    """A fresh schema on ``url``'s database, dropped afterwards."""
    schema = f"bench_auth_{uuid.uuid4().hex[:10]}"
    try:
        yield schema
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
            )


def print_table(title: str, pairs: list[Pair]) -> None:
    """Each repeat's p50, p99 and mean on and off, then their medians over the repeats."""
    print(f"\n{title}")
    print(f"{'':>8} {'':>5} {'on ms':>8} {'off ms':>8} {'on−off ms':>10} {'on/off':>7}")

    def line(label: str, field: str, on: list[float], off: list[float]) -> None:
        differences = [a - b for a, b in zip(on, off, strict=True)]
        ratios = [a / b for a, b in zip(on, off, strict=True)]
        print(
            f"{label:>8} {field:>5} {statistics.median(on):8.3f} {statistics.median(off):8.3f} "
            f"{statistics.median(differences):+10.3f} {statistics.median(ratios):7.3f}"
        )

    for field in ("p50", "p99", "mean"):
        for i, pair in enumerate(pairs, 1):
            line(f"repeat {i}", field, [getattr(pair.on, field)], [getattr(pair.off, field)])
        on = [getattr(p.on, field) for p in pairs]
        off = [getattr(p.off, field) for p in pairs]
        line("median", field, on, off)


def main(postgres: str, n: int, warmup: int, repeats: int) -> None:
    secret = secrets.token_hex(32)
    hasher = KeyHasher(secret.encode())
    kafka = KafkaSettings(topic=f"usage-bench-auth-{uuid.uuid4().hex[:6]}", partitions=1)
    with (
        EmbeddedBroker(free_port()) as broker,
        bench_schema(postgres) as schema,
        open_database(postgres, PostgresSettings(url=postgres, schema_name=schema)) as database,
    ):
        asyncio.run(ensure_topics(broker.bootstrap_servers, kafka))
        store = PostgresAccountStore(database)
        ring = KeyRing(store, hasher)
        accounts = Accounts(store, hasher, ring.load())
        store.create_account(ACCOUNT, name="auth benchmark")
        account_key = accounts.issue_key(KeyKind.ACCOUNT, name="bench", account_id=ACCOUNT)
        service_key = accounts.issue_key(KeyKind.SERVICE, name="bench gateway")
        setup = Setup(postgres, schema, secret, broker.bootstrap_servers, kafka.topic)
        http: list[Pair] = []
        rpc: list[Pair] = []
        with server_process(setup) as running:
            for i in range(repeats):
                http.append(http_repeat(running.ports, account_key.secret, n, warmup))
                rpc.append(asyncio.run(grpc_repeat(running.ports, service_key.secret, n, warmup)))
                print(f"repeat {i + 1} of {repeats} done", file=sys.stderr, flush=True)
        check = authenticate_us(ring, account_key.secret)
        door = open_door_us()
    print(f"requests: {n:,} each side, alternated, after {warmup:,}; repeats: {repeats}")
    print_table("HTTP GET /v1/accounts/{id}/usage (account key vs no auth)", http)
    print_table("gRPC ReportUsage, 1 event (service key vs no auth)", rpc)
    print("\nauthenticate(), µs a call")
    if running.checks is not None:
        c = running.checks
        print(f"  in the servers (median of every request): HTTP on {c.http_on:.1f}, ", end="")
        print(f"off {c.http_off:.1f}; gRPC on {c.grpc_on:.1f}, off {c.grpc_off:.1f}")
    print(f"  KeyRing.authenticate alone (timeit, median of 5 repeats): {check:.2f}")
    print(f"  OpenDoor.authenticate alone (the same): {door:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="a database where this user may create a schema",
    )
    parser.add_argument("--requests", type=int, default=2_000, help="timed calls to each server")
    parser.add_argument("--warmup", type=int, default=200, help="untimed calls first, each")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        config: dict[str, Any] = json.loads(sys.stdin.readline())
        asyncio.run(serve(Setup(**config)))
    else:
        main(args.postgres, args.requests, args.warmup, args.repeats)
