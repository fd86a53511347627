"""Batched ingest over gRPC, beside a raw aiokafka producer, in one run.

Run by hand (``make bench``). Starts a Tansu broker and ``meterline ingest``
in its own process (so the benchmark's gRPC client does not share the
server's CPU-bound event loop), then sends the same pre-built events:

* raw: an aiokafka producer (acks=all, meterline's producer settings)
  writing them straight to the usage topic, from this process;
* ingest: ``ReportUsage`` calls of ``--batches`` events each, ``--concurrency``
  calls in flight; a call returns only after Kafka confirmed its events, so
  this is validation + produce + the gRPC round trips.

Prints the median rate over ``--repeats`` of each, and ingest/raw.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time

import grpc

from meterline.lib.kafka import EmbeddedBroker, ensure_topics, free_port, start_producer
from meterline.lib.settings import KafkaSettings
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


async def main(n: int, batches: list[int], concurrency: int, repeats: int) -> None:
    gateway = Gateway(accounts=200, seed=1, run_tag="bench")
    with EmbeddedBroker(free_port()) as broker:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, partitions=6)
        await ensure_topics(broker.bootstrap_servers, kafka)
        port = free_port()
        env = os.environ | {
            "METERLINE_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "METERLINE_GRPC_PORT": str(port),
        }
        server = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "ingest"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await asyncio.wait_for(channel.channel_ready(), timeout=30)
                stub = ingest_pb2_grpc.IngestServiceStub(channel)
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
    print(f"events: {n}, concurrent calls: {concurrency}, repeats: {repeats}")
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
    args = parser.parse_args()
    sizes = [int(b) for b in args.batches.split(",")]
    asyncio.run(main(args.events, sizes, args.concurrency, args.repeats))
