"""Batched ingest over gRPC, beside a raw aiokafka producer, in one run.

Run by hand (``make bench``). Starts a Tansu broker and ``meterline ingest``
in its own process (so the benchmark's gRPC client does not share the
server's CPU-bound event loop), then sends the same pre-built events:

* raw: an aiokafka producer (acks=all, meterline's producer settings)
  writing them straight to the usage topic, from this process;
* ingest: ``ReportUsage`` calls of ``--batches`` events each, ``--concurrency``
  calls in flight; a call returns only after Kafka confirmed its events, so
  this is validation + produce + the gRPC round trips.

Every call presents a service key, as a gateway's does: the benchmark issues
one in the ingest's own PostgreSQL (embedded, under a temporary data
directory) and the ingest checks it on its key ring, so the figures include
the key check. ``--auth off`` runs the ingest with METERLINE_AUTH=off and
sends no key: the figures as they were before keys.

Prints the median rate over ``--repeats`` of each, and ingest/raw.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time

import grpc
from pydantic import SecretStr

from meterline.accounts import KeyKind
from meterline.accounts.grpc import key_channel
from meterline.accounts.keys import KeyHasher
from meterline.accounts.manage import Accounts
from meterline.accounts.postgres import PostgresAccountStore
from meterline.lib.kafka import EmbeddedBroker, ensure_topics, free_port, start_producer
from meterline.lib.postgres import open_database
from meterline.lib.settings import KafkaSettings, KeySettings, PostgresSettings, Settings
from meterline.v1 import ingest_pb2, ingest_pb2_grpc, usage_pb2
from services.simulate import Gateway


async def raw_produce(
    bootstrap: str, kafka: KafkaSettings, events: list[usage_pb2.UsageEvent]
) -> float:
    producer = await start_producer(bootstrap, kafka)
    try:
        started = time.perf_counter()
        sends = [
            await producer.send(kafka.topic, e.SerializeToString(), key=e.account_id.encode())
            for e in events
        ]
        await asyncio.gather(*sends)
        return time.perf_counter() - started
    finally:
        await producer.stop()


async def grpc_ingest(
    stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    events: list[usage_pb2.UsageEvent],
    batch: int,
    concurrency: int,
) -> float:
    requests = [
        ingest_pb2.ReportUsageRequest(events=events[i : i + batch])
        for i in range(0, len(events), batch)
    ]
    pending = iter(requests)

    async def caller() -> None:
        for request in pending:  # callers share the iterator: each takes the next request
            response = await stub.ReportUsage(request)
            assert response.rejected == 0, response.results[0].reason

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return time.perf_counter() - started


def service_key(settings: Settings) -> str:
    """A service key, issued in the store the ingest reads its keys from."""
    secret = settings.keys.secret.get_secret_value().encode()
    with open_database(settings.postgres_url, settings.postgres) as database:
        accounts = Accounts(PostgresAccountStore(database), KeyHasher(secret))
        return accounts.issue_key(KeyKind.SERVICE, name="ingest benchmark").secret


async def until_taken(stub: ingest_pb2_grpc.IngestServiceAsyncStub) -> None:
    """Until the ingest takes the key: its key ring picks a new key up within a refresh."""
    while True:
        try:
            await stub.ReportUsage(ingest_pb2.ReportUsageRequest())
            return
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
            await asyncio.sleep(0.1)


async def main(n: int, batches: list[int], concurrency: int, repeats: int, auth: bool) -> None:
    gateway = Gateway(accounts=200, seed=1, run_tag="bench")
    with EmbeddedBroker(free_port()) as broker, tempfile.TemporaryDirectory() as data_dir:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, partitions=6)
        await ensure_topics(broker.bootstrap_servers, kafka)
        port = free_port()
        settings = Settings(
            data_dir=data_dir,
            postgres=PostgresSettings(embedded_port=free_port()),
            keys=KeySettings(secret=SecretStr(secrets.token_hex(32))),
        )
        env = os.environ | {
            "METERLINE_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "METERLINE_GRPC_PORT": str(port),
            "METERLINE_METRICS_PORT": str(free_port()),
            "METERLINE_DATA_DIR": data_dir,
            "METERLINE_POSTGRES_EMBEDDED_PORT": str(settings.postgres.embedded_port),
            "METERLINE_KEYS_SECRET": settings.keys.secret.get_secret_value(),
            "METERLINE_AUTH": "on" if auth else "off",
        }
        server = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "ingest"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            # the ingest listens once its PostgreSQL is up: then the key can be issued
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as probe:
                await asyncio.wait_for(probe.channel_ready(), timeout=120)
            key = await asyncio.to_thread(service_key, settings) if auth else None
            async with key_channel(f"127.0.0.1:{port}", key) as channel:
                stub = ingest_pb2_grpc.IngestServiceStub(channel)
                await asyncio.wait_for(until_taken(stub), timeout=30)
                seconds: dict[str, list[float]] = {name: [] for name in ("raw", *map(str, batches))}
                for _ in range(repeats):
                    events = [gateway.event() for _ in range(n)]  # fresh ids each repeat
                    seconds["raw"].append(
                        await raw_produce(broker.bootstrap_servers, kafka, events)
                    )
                    for b in batches:
                        seconds[f"{b}"].append(await grpc_ingest(stub, events, b, concurrency))
        finally:
            server.terminate()
            server.wait()
    raw_rate = n / statistics.median(seconds["raw"])
    keys = "a service key on every call" if auth else "no key (METERLINE_AUTH=off)"
    print(f"events: {n}, concurrent calls: {concurrency}, repeats: {repeats}, {keys}")
    print(f"raw aiokafka produce (acks=all):  {raw_rate:9,.0f} events/s (median)")
    for b in batches:
        rate = n / statistics.median(seconds[f"{b}"])
        print(
            f"ReportUsage, {b:5} events/call: {rate:9,.0f} events/s (median), "
            f"ratio ingest/raw {rate / raw_rate:.2f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--batches", default="100,1000", help="events per call, comma-separated")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--auth",
        choices=("on", "off"),
        default="on",
        help="on: every call presents a service key; off: METERLINE_AUTH=off, no key",
    )
    args = parser.parse_args()
    sizes = [int(b) for b in args.batches.split(",")]
    asyncio.run(main(args.events, sizes, args.concurrency, args.repeats, args.auth == "on"))
