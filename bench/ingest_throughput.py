"""Batched ingest over gRPC, beside a raw aiokafka producer, in one run.

Run by hand (``make bench``). Starts a Tansu broker and ``meterline ingest``
as a separate process (so the client does not share its CPU-bound event
loop), then sends the same pre-built events:

* raw: an aiokafka producer (acks=all) writing them straight to the topic;
* ingest: ``ReportUsage`` calls of ``--batch`` events, ``--concurrency`` at a
  time; each call returns only after Kafka confirmed its events.

Medians over ``--repeats`` and their ratio are printed.
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

from meterline.config import KafkaSettings
from meterline.kafka import EmbeddedBroker, ensure_topics, free_port, start_producer
from meterline.simulate import Gateway
from meterline.v1 import ingest_pb2, ingest_pb2_grpc, usage_pb2


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
    target: str, events: list[usage_pb2.UsageEvent], batch: int, concurrency: int
) -> float:
    batches = [events[i : i + batch] for i in range(0, len(events), batch)]
    queue: asyncio.Queue[list[usage_pb2.UsageEvent]] = asyncio.Queue()
    for b in batches:
        queue.put_nowait(b)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)

        async def worker() -> None:
            while not queue.empty():
                response = await stub.ReportUsage(
                    ingest_pb2.ReportUsageRequest(events=queue.get_nowait())
                )
                assert response.rejected == 0, response.results[0].reason

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started


async def main(n: int, batch: int, concurrency: int, repeats: int) -> None:
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
            [sys.executable, "-m", "meterline.cli", "ingest"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            target = f"127.0.0.1:{port}"
            async with grpc.aio.insecure_channel(target) as channel:
                await asyncio.wait_for(channel.channel_ready(), timeout=30)
            raw, ingest = [], []
            for _ in range(repeats):
                events = [gateway.event() for _ in range(n)]  # fresh ids each repeat
                raw.append(await raw_produce(broker.bootstrap_servers, kafka, events))
                ingest.append(await grpc_ingest(target, events, batch, concurrency))
        finally:
            server.terminate()
            server.wait()
    raw_rate, ingest_rate = n / statistics.median(raw), n / statistics.median(ingest)
    print(f"events: {n}, batch: {batch}, concurrent calls: {concurrency}, repeats: {repeats}")
    print(f"raw aiokafka produce (acks=all): {raw_rate:,.0f} events/s (median)")
    print(f"gRPC ReportUsage ingest:         {ingest_rate:,.0f} events/s (median)")
    print(f"ratio ingest/raw:                {ingest_rate / raw_rate:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.batch, args.concurrency, args.repeats))
