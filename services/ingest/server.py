"""The ingest gRPC service: gateways report usage, it goes to Kafka.

Each event is validated and answered for on its own; accepted events are
produced keyed by account (one account stays on one partition) and the RPC
returns only once Kafka confirmed every write. If Kafka fails, the whole RPC
fails UNAVAILABLE so the gateway retries it; events that did land are
counted once anyway, because the pipeline dedupes on (account, event id).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import grpc
from aiokafka import AIOKafkaProducer
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from meterline.lib.settings import EventRules, IngestSettings
from meterline.usage import InvalidEvent, UsageEvent, validate
from meterline.v1 import ingest_pb2, ingest_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name


class IngestService(ingest_pb2_grpc.IngestServiceServicer):
    """Validates reported events and writes the good ones to the usage topic."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        *,
        topic: str,
        rules: EventRules,
        max_events_per_request: int,
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.rules = rules
        self.max_events = max_events_per_request

    async def ReportUsage(  # noqa: N802 - gRPC method name
        self, request: ingest_pb2.ReportUsageRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.ReportUsageResponse:
        await self._check_size(len(request.events), context)
        results = await self._ingest(request.events, 0, context)
        return ingest_pb2.ReportUsageResponse(results=results, **_tally(results))

    async def StreamUsage(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[ingest_pb2.StreamUsageRequest],
        context: grpc.aio.ServicerContext,
    ) -> ingest_pb2.StreamUsageResponse:
        results: list[ingest_pb2.EventResult] = []
        async for request in request_iterator:
            await self._check_size(len(request.events), context)
            results.extend(await self._ingest(request.events, len(results), context))
        return ingest_pb2.StreamUsageResponse(results=results, **_tally(results))

    async def _check_size(self, count: int, context: grpc.aio.ServicerContext) -> None:
        if count > self.max_events:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{count} events in one request; the limit is {self.max_events}",
            )

    async def _ingest(
        self,
        events: Sequence[UsageEvent],
        first_index: int,
        context: grpc.aio.ServicerContext,
    ) -> list[ingest_pb2.EventResult]:
        now = datetime.now(UTC)
        results: list[ingest_pb2.EventResult] = []
        sends: list[asyncio.Future[object]] = []
        for offset, event in enumerate(events):
            result = ingest_pb2.EventResult(event_id=event.event_id, index=first_index + offset)
            try:
                record = validate(event, now=now, rules=self.rules)
            except InvalidEvent as exc:
                result.reason = str(exc)
            else:
                result.accepted = True
                sends.append(
                    await self.producer.send(
                        self.topic,
                        key=record.account_id.encode(),
                        value=event.SerializeToString(),
                    )
                )
            results.append(result)
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures:
            log.warning("Kafka refused %d of %d writes: %s", len(failures), len(sends), failures[0])
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"Kafka did not confirm {len(failures)} of {len(sends)} events "
                f"({failures[0]!r}); retry the report, events are deduplicated by event_id",
            )
        return results


def _tally(results: Sequence[ingest_pb2.EventResult]) -> dict[str, int]:
    accepted = sum(1 for r in results if r.accepted)
    return {"accepted": accepted, "rejected": len(results) - accepted}


class IngestServer:
    """The gRPC server: ingest, health and reflection, with a graceful stop."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        *,
        topic: str,
        rules: EventRules,
        settings: IngestSettings,
    ) -> None:
        self.settings = settings
        self.server = grpc.aio.server(maximum_concurrent_rpcs=settings.max_concurrent_rpcs)
        ingest_pb2_grpc.add_IngestServiceServicer_to_server(
            IngestService(
                producer,
                topic=topic,
                rules=rules,
                max_events_per_request=settings.max_events_per_request,
            ),
            self.server,
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = self.server.add_insecure_port(f"{settings.host}:{settings.port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {settings.host}:{settings.port}")

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def start(self) -> None:
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("ingest gRPC on %s", self.address)

    async def stop(self) -> None:
        """Stop taking RPCs, let those in flight finish, then report NOT_SERVING."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.grace_s)
