"""The ingest gRPC service: gateways report usage, it goes to Kafka.

Each event is validated and answered for on its own; accepted events are
produced keyed by account (one account stays on one partition) and the RPC
returns only once Kafka confirmed every write. If Kafka fails, the whole RPC
fails UNAVAILABLE so the gateway retries it; events that did land are
counted once anyway, because the pipeline dedupes on (account, event id).

A request (or stream message) is read by a deserializer of our own, not the
generated one: protobuf refuses a whole message when one string field is not
UTF-8, and gRPC would fail the call before any handler ran. The fast path
parses the message whole; only a message protobuf refuses is split into its
events by hand, so that the bad event gets its reason and the others go on.

Each message is validated whole, against one instant, before any of it is
produced; the records carry that instant (to the millisecond) as their
timestamp, and the pricing pipeline validates against it again, so both
judge lateness alike. The stream's promise is in ``ingest.proto``.

Every call but health and reflection presents an API key (see
:mod:`meterline.accounts.grpc`): admin and service keys may report, and
each event is taken only for an account its key may act for. With
``METERLINE_ACCOUNTS_UNKNOWN=reject`` an event of an account nobody created
is rejected too; by default it is taken and the pipeline registers the account.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter as Tally
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import NamedTuple, TypeVar

import grpc
from aiokafka import AIOKafkaProducer
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Histogram

from meterline.accounts.auth import Authenticator
from meterline.accounts.directory import AccountDirectory
from meterline.accounts.grpc import AuthInterceptor, current_principal
from meterline.accounts.model import KeyKind, Principal
from meterline.lib.grpc_server import ServiceServer
from meterline.lib.metrics import CollectorRegistry
from meterline.lib.settings import EventRules, IngestSettings
from meterline.tokens import TOKEN_FIELDS
from meterline.usage import InvalidEvent, UsageEvent, UsageRecord, validate
from meterline.usage.validation import RULES, UndecodableEvent, decode_events
from meterline.v1 import ingest_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name
#: Who may report usage: gateways and admins. An account key only reads its own usage.
REPORTERS = frozenset({KeyKind.ADMIN, KeyKind.SERVICE})
#: Why ingest rejects an event beyond the event's own rules (validation's RULES):
#: its stream message is over a limit, its key may not act for its account, or
#: (unknown accounts refused) its account does not exist. With RULES, the values
#: of the events metric's ``reason`` label.
INGEST_RULES = (
    "message_too_large",
    "message_too_many_events",
    "account_not_allowed",
    "unknown_account",
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_GRPC_MESSAGE = 2**31 - 1  # gRPC's lengths are int32
_T = TypeVar("_T")


class ReadMessage(NamedTuple):
    """A ReportUsageRequest or StreamUsageRequest as the deserializer read it."""

    #: its events, each parsed, or in its place the reason it could not be
    events: Sequence[UsageEvent | UndecodableEvent]
    #: its size on the wire, in bytes
    size: int
    #: why the message itself could not be read (not protobuf); None if it could
    error: str | None = None


def read_message(data: bytes, *, parse_above: int | None = None) -> ReadMessage:
    """Deserialize a request: whole if protobuf takes it, else event by event.

    A message larger than ``parse_above`` is not parsed (it will be refused
    whole). Never raises: gRPC would fail the call UNKNOWN.
    """
    if parse_above is not None and len(data) > parse_above:
        return ReadMessage((), len(data))
    try:
        # StreamUsageRequest has the same single field: one parser serves both
        return ReadMessage(ingest_pb2.ReportUsageRequest.FromString(data).events, len(data))
    except DecodeError:
        pass
    try:
        return ReadMessage(decode_events(data), len(data))
    except InvalidEvent as exc:
        return ReadMessage((), len(data), str(exc))


class IngestMetrics:
    """What ingest counts, in the registry it is given (see :mod:`meterline.lib.metrics`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rpcs = Counter(
            "meterline_ingest_rpcs",
            "Ingest RPCs answered, by method and gRPC status code.",
            ("method", "code"),
            registry=registry,
        )
        self.events = Counter(
            "meterline_ingest_events",
            "Events answered for: accepted (Kafka confirmed them), or rejected, by the first "
            "rule they break (meterline.usage.validation.RULES), or one of ingest's own: "
            + ", ".join(INGEST_RULES)
            + ".",
            ("outcome", "reason"),
            registry=registry,
        )
        for rule in (*RULES, *INGEST_RULES):  # every series from the start: rate() sees a 0
            self.events.labels("rejected", rule)
        self.produce_seconds = Histogram(
            "meterline_ingest_produce_seconds",
            "From the first send of a request's (or stream message's) accepted events to "
            "Kafka's confirmation of the last.",
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )

    def answered(self, results: Sequence[ingest_pb2.EventResult], rules: Tally[str]) -> None:
        accepted = sum(1 for r in results if r.accepted)
        if accepted:
            self.events.labels("accepted", "none").inc(accepted)
        for rule, count in rules.items():
            self.events.labels("rejected", rule).inc(count)


class IngestService:
    """Validates reported events and writes the good ones to the usage topic."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        *,
        topic: str,
        rules: EventRules,
        max_events_per_request: int,
        max_message_bytes: int,
        registry: CollectorRegistry,
        directory: AccountDirectory | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        """``directory``: reject events of accounts it does not know; None takes them.
        ``clock_ns`` gives now in nanoseconds since the epoch (tests set it)."""
        self.producer = producer
        self.topic = topic
        self.rules = rules
        self.max_events = max_events_per_request
        self.max_bytes = max_message_bytes
        self.metrics = IngestMetrics(registry)
        self.directory = directory
        self.clock_ns = clock_ns

    def add_to(self, server: grpc.aio.Server) -> None:
        """Register the two RPCs, with this service's own request deserializers."""
        handlers = {
            "ReportUsage": grpc.unary_unary_rpc_method_handler(
                self.ReportUsage,
                # an oversize report is refused whole: no need to parse it
                request_deserializer=functools.partial(read_message, parse_above=self.max_bytes),
                response_serializer=ingest_pb2.ReportUsageResponse.SerializeToString,
            ),
            "StreamUsage": grpc.stream_unary_rpc_method_handler(
                self.StreamUsage,
                # an oversize message gets each event's rejection: parse it
                request_deserializer=read_message,
                response_serializer=ingest_pb2.StreamUsageResponse.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        # as the generated add_IngestServiceServicer_to_server does (grpcio >= 1.62)
        server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]

    async def ReportUsage(  # noqa: N802 - gRPC method name
        self, request: ReadMessage, context: grpc.aio.ServicerContext[ReadMessage, object]
    ) -> ingest_pb2.ReportUsageResponse:
        return await self._counted("ReportUsage", context, self._report(request, context))

    async def StreamUsage(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[ReadMessage],
        context: grpc.aio.ServicerContext[ReadMessage, object],
    ) -> ingest_pb2.StreamUsageResponse:
        return await self._counted("StreamUsage", context, self._stream(request_iterator, context))

    async def _counted(
        self,
        method: str,
        context: grpc.aio.ServicerContext[ReadMessage, object],
        answer: Awaitable[_T],
    ) -> _T:
        code = grpc.StatusCode.UNKNOWN
        try:
            response = await answer
            code = grpc.StatusCode.OK
            return response
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            self.metrics.rpcs.labels(method, code.name).inc()

    async def _report(
        self, request: ReadMessage, context: grpc.aio.ServicerContext[ReadMessage, object]
    ) -> ingest_pb2.ReportUsageResponse:
        if request.size > self.max_bytes:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the report is {request.size} bytes; the limit is {self.max_bytes} "
                "(METERLINE_GRPC_MAX_MESSAGE_BYTES): send its events in smaller reports",
            )
        if request.error is not None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"not a meterline.v1.ReportUsageRequest: {request.error}",
            )
        if len(request.events) > self.max_events:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(request.events)} events in one request; the limit is {self.max_events}",
            )
        results = await self._ingest(request.events, 0, context)
        return ingest_pb2.ReportUsageResponse(results=results, **_tally(results))

    async def _stream(
        self,
        request_iterator: AsyncIterator[ReadMessage],
        context: grpc.aio.ServicerContext[ReadMessage, object],
    ) -> ingest_pb2.StreamUsageResponse:
        results: list[ingest_pb2.EventResult] = []
        messages = 0
        async for message in request_iterator:
            if message.error is not None:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"message {messages} of the stream is not a meterline.v1.StreamUsageRequest "
                    f"({message.error}); the {len(results)} events before it were answered for "
                    "and the accepted ones produced: send the stream again, events are "
                    "deduplicated by event_id",
                )
            messages += 1
            refusal = self._refusal(message)
            if refusal is None:
                results.extend(await self._ingest(message.events, len(results), context))
            else:
                results.extend(self._refuse(message.events, len(results), *refusal))
        return ingest_pb2.StreamUsageResponse(results=results, **_tally(results))

    def _refusal(self, message: ReadMessage) -> tuple[str, str] | None:
        """(rule, reason) when a stream message is over a limit, so none of it is taken."""
        if message.size > self.max_bytes:
            return "message_too_large", (
                f"its StreamUsage message is {message.size} bytes; the limit is "
                f"{self.max_bytes} (METERLINE_GRPC_MAX_MESSAGE_BYTES): nothing of that "
                "message was produced, send its events again in smaller messages"
            )
        if len(message.events) > self.max_events:
            return "message_too_many_events", (
                f"its StreamUsage message has {len(message.events)} events; the limit is "
                f"{self.max_events}: nothing of that message was produced, send its events "
                "again in smaller messages"
            )
        return None

    def _refuse(
        self,
        events: Sequence[UsageEvent | UndecodableEvent],
        first_index: int,
        rule: str,
        reason: str,
    ) -> list[ingest_pb2.EventResult]:
        results = [
            ingest_pb2.EventResult(event_id=event.event_id, index=first_index + i, reason=reason)
            for i, event in enumerate(events)
        ]
        self.metrics.answered(results, Tally({rule: len(results)}))
        return results

    async def _ingest(
        self,
        events: Sequence[UsageEvent | UndecodableEvent],
        first_index: int,
        context: grpc.aio.ServicerContext[ReadMessage, object],
    ) -> list[ingest_pb2.EventResult]:
        """Validate every event, check its account, then produce the accepted ones and
        wait for Kafka."""
        # One instant for the message, in whole milliseconds as the record's
        # timestamp holds it: the pipeline's check against that timestamp then
        # judges exactly as this one, even for an event at a bound.
        now_ms = self.clock_ns() // 1_000_000
        now = _EPOCH + timedelta(milliseconds=now_ms)
        principal = current_principal()
        results: list[ingest_pb2.EventResult] = []
        broken: Tally[str] = Tally()
        valid: list[tuple[ingest_pb2.EventResult, _Record]] = []
        for offset, event in enumerate(events):
            result = ingest_pb2.EventResult(event_id=event.event_id, index=first_index + offset)
            results.append(result)
            checked = _check(event, principal, now, self.rules)
            if isinstance(checked, InvalidEvent):
                result.reason = str(checked)
                broken[checked.rule] += 1
            else:
                valid.append((result, checked))
        if self.directory is not None and valid:
            known = await self._known({record.account_id for _, record in valid}, context)
            for result, record in valid:
                if record.account_id not in known:
                    result.reason = (
                        f"unknown account {record.account_id}: create it first "
                        "(or set METERLINE_ACCOUNTS_UNKNOWN=register)"
                    )
                    broken["unknown_account"] += 1
            valid = [(result, record) for result, record in valid if not result.reason]
        for result, _ in valid:
            result.accepted = True
        if valid:
            records = [(r.account_id.encode(), r.value) for _, r in valid]
            await self._produce(records, now_ms, context)
        self.metrics.answered(results, broken)
        return results

    async def _known(
        self, account_ids: set[str], context: grpc.aio.ServicerContext[ReadMessage, object]
    ) -> set[str]:
        """The accounts of ``account_ids`` that exist; UNAVAILABLE if that cannot be told."""
        assert self.directory is not None
        try:
            return await self.directory.known(account_ids)
        except Exception as exc:  # the store is unreachable: the gateway retries the report
            log.warning("cannot look up %d accounts: %s", len(account_ids), exc)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot tell which accounts exist ({exc!r}); retry the report, events are "
                "deduplicated by event_id",
            )

    async def _produce(
        self,
        records: Sequence[tuple[bytes, bytes]],
        timestamp_ms: int,
        context: grpc.aio.ServicerContext[ReadMessage, object],
    ) -> None:
        started = time.perf_counter()
        sends: list[asyncio.Future[object]] = []
        failures: list[BaseException] = []
        try:
            for key, value in records:
                sends.append(
                    await self.producer.send(
                        self.topic, key=key, value=value, timestamp_ms=timestamp_ms
                    )
                )
        except Exception as exc:  # any Kafka error: the gateway retries the report
            failures.append(exc)
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
        failures.extend(o for o in outcomes if isinstance(o, BaseException))
        self.metrics.produce_seconds.observe(time.perf_counter() - started)
        if failures:
            log.warning(
                "Kafka refused %d of %d writes: %s", len(failures), len(records), failures[0]
            )
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"Kafka did not confirm {len(failures)} of {len(records)} events "
                f"({failures[0]!r}); retry the report, events are deduplicated by event_id",
            )


class _Record(NamedTuple):
    """A checked event as it goes to Kafka: its key (the account) and value."""

    account_id: str
    value: bytes


def _check(
    event: UsageEvent | UndecodableEvent, principal: Principal, now: datetime, rules: EventRules
) -> _Record | InvalidEvent:
    """The event's record, or why it is rejected: its own rules, then its key's scope."""
    if isinstance(event, UndecodableEvent):
        return event
    try:
        record = validate(event, now=now, rules=rules)
    except InvalidEvent as exc:
        return exc
    if not principal.may_act_for(record.account_id):
        return InvalidEvent(
            f"this key may not report usage for account {record.account_id}",
            rule="account_not_allowed",
        )
    return _Record(record.account_id, _value(event, record))


def _value(event: UsageEvent, record: UsageRecord) -> bytes:
    """The record value: the event, with the counts its provider usage object gave."""
    if record.provider_usage_json and not any(getattr(event, n) for n in TOKEN_FIELDS):
        for name in TOKEN_FIELDS:  # so every reader of the topic sees the billed counts
            setattr(event, name, getattr(record.usage, name))
    return event.SerializeToString()


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
        auth: Authenticator,
        directory: AccountDirectory | None = None,
        registry: CollectorRegistry | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        """``auth`` tells who presents each call's key (``OpenDoor`` when
        METERLINE_AUTH=off). ``directory``: with METERLINE_ACCOUNTS_UNKNOWN=reject,
        the accounts that exist; None takes events of any account. ``registry``
        gets ingest's metrics; None: one of its own, served by nobody."""
        self.settings = settings
        self.registry = registry if registry is not None else CollectorRegistry()
        # Messages a little over the limit are still read, so that each of their
        # events is answered for (see StreamUsage); gRPC ends the call beyond.
        receive = min(2 * settings.max_message_bytes, _MAX_GRPC_MESSAGE)
        self.server = grpc.aio.server(
            interceptors=[
                AuthInterceptor(auth, allowed={SERVICE_NAME: REPORTERS}, registry=self.registry)
            ],
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
            options=[("grpc.max_receive_message_length", receive)],
        )
        IngestService(
            producer,
            topic=topic,
            rules=rules,
            max_events_per_request=settings.max_events_per_request,
            max_message_bytes=settings.max_message_bytes,
            registry=self.registry,
            directory=directory,
            clock_ns=clock_ns,
        ).add_to(self.server)
        self.served = ServiceServer(
            self.server,
            SERVICE_NAME,
            host=settings.host,
            port=settings.port,
            grace_s=settings.grace_s,
            label="ingest",
        )

    @property
    def address(self) -> str:
        return self.served.address

    @property
    def port(self) -> int:
        return self.served.port

    async def start(self) -> None:
        await self.served.start()

    async def stop(self) -> None:
        """Stop taking RPCs, let those in flight finish, then report NOT_SERVING."""
        await self.served.stop()
