"""Who may call ingest, and for which accounts: every RPC against every kind of key,
over real gRPC, with keys in the real PostgreSQL and usage on the real broker."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from test_ingest import OwnIngest, produced

from conftest import event, unique
from meterline.accounts import KeyKind, KeyRing
from meterline.accounts.directory import AccountDirectory, AccountLookup
from meterline.accounts.grpc import (
    AUTHORIZATION,
    DRAIN_S,
    AuthInterceptor,
    current_principal,
    key_channel,
)
from meterline.accounts.keys import KEY_PREFIX, new_key
from meterline.accounts.manage import Accounts, IssuedKey
from meterline.accounts.postgres import PostgresAccountStore
from meterline.lib.metrics import CollectorRegistry
from meterline.lib.postgres import open_database
from meterline.lib.settings import PostgresSettings, Settings
from meterline.v1 import ingest_pb2, ingest_pb2_grpc, usage_pb2

#: Every RPC of IngestService, from the contract: a new one gets a row of the matrix.
RPCS = [m.name for m in ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].methods]
INGEST = "meterline.v1.IngestService"
OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED

Metadata = tuple[tuple[str, str], ...]
Call = Callable[
    [grpc.aio.Channel, Metadata, Sequence[usage_pb2.UsageEvent]],
    Awaitable[Sequence[ingest_pb2.EventResult]],
]


async def report_usage(
    channel: grpc.aio.Channel, metadata: Metadata, events: Sequence[usage_pb2.UsageEvent]
) -> Sequence[ingest_pb2.EventResult]:
    stub = ingest_pb2_grpc.IngestServiceStub(channel)
    request = ingest_pb2.ReportUsageRequest(events=events)
    return (await stub.ReportUsage(request, metadata=metadata)).results


async def stream_usage(
    channel: grpc.aio.Channel, metadata: Metadata, events: Sequence[usage_pb2.UsageEvent]
) -> Sequence[ingest_pb2.EventResult]:
    """One stream message per event."""

    async def messages() -> AsyncIterator[ingest_pb2.StreamUsageRequest]:
        for e in events:
            yield ingest_pb2.StreamUsageRequest(events=[e])

    stub = ingest_pb2_grpc.IngestServiceStub(channel)
    return (await stub.StreamUsage(messages(), metadata=metadata)).results


#: How the matrix calls each RPC with some events.
CALLS: dict[str, Call] = {"ReportUsage": report_usage, "StreamUsage": stream_usage}


class Clock:
    """The time a key ring judges expiry by; a test moves it."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Keys:
    """Every kind of key a caller can present, made on a ring of the test's own."""

    ring: KeyRing
    clock: Clock
    #: an account that exists, the one the scoped keys are for
    account_a: str
    #: another account
    account_b: str
    #: what each presents as its authorization metadata; None: nothing
    presented: dict[str, str | None]
    issued: dict[str, IssuedKey]

    def metadata(self, name: str) -> Metadata:
        value = self.presented[name]
        return () if value is None else ((AUTHORIZATION, value),)


@pytest.fixture
def keys(key_ring: KeyRing) -> Keys:
    clock = Clock()
    ring = KeyRing(key_ring.store, key_ring.hasher, clock=clock).load()
    accounts = Accounts(ring.store, ring.hasher, ring)
    a, b = unique("acct-a"), unique("acct-b")
    accounts.store.create_account(a)
    issued = {
        "admin": accounts.issue_key(KeyKind.ADMIN),
        "service": accounts.issue_key(KeyKind.SERVICE),
        "service of A": accounts.issue_key(KeyKind.SERVICE, account_ids=[a]),
        "account A": accounts.issue_key(KeyKind.ACCOUNT, account_id=a),
        "revoked": accounts.issue_key(KeyKind.SERVICE),
        "expired": accounts.issue_key(KeyKind.SERVICE, expires_at=clock.now + timedelta(minutes=1)),
    }
    accounts.revoke_key(issued["revoked"].key.key_id)
    clock.now += timedelta(minutes=2)  # past the expiry, for this ring only
    service = issued["service"].secret
    key_id_part = service[: len(KEY_PREFIX) + len(issued["service"].key.key_id) + 1]
    presented: dict[str, str | None] = {
        "none": None,
        "malformed": f"Basic {service}",
        "unknown": f"Bearer {new_key()[1]}",
        "forged": f"Bearer {key_id_part}{secrets.token_urlsafe(32)}",  # a real id, another secret
        **{name: f"Bearer {key.secret}" for name, key in issued.items()},
    }
    return Keys(ring, clock, a, b, presented, issued)


def expected_answers(keys: Keys) -> dict[str, tuple[grpc.StatusCode, str]]:
    """What each presented key gets from an ingest RPC: its status and details."""
    revoked, expired = keys.issued["revoked"].key.key_id, keys.issued["expired"].key.key_id
    no_key = "no API key: send Authorization: Bearer <key>"
    return {
        "none": (UNAUTHENTICATED, no_key),
        "malformed": (UNAUTHENTICATED, no_key),
        "unknown": (UNAUTHENTICATED, "not a valid API key"),
        "forged": (UNAUTHENTICATED, "not a valid API key"),
        "revoked": (UNAUTHENTICATED, f"API key {revoked} is revoked"),
        "expired": (UNAUTHENTICATED, f"API key {expired} is expired"),
        "admin": (OK, "accepted 1"),
        "service": (OK, "accepted 1"),
        "service of A": (OK, "accepted 1"),
        "account A": (PERMISSION_DENIED, f"account keys may not call {INGEST}"),
    }


# --- the matrix: every RPC x every presented key -----------------------------------------


@pytest.mark.parametrize("rpc", RPCS)
async def test_every_rpc_answers_each_presented_key_as_the_policy_says(
    rpc: str, keys: Keys, settings: Settings
) -> None:
    call = CALLS.get(rpc)
    assert call is not None, f"{rpc} has no row in the matrix: add its call to CALLS"
    registry = CollectorRegistry()
    answers: dict[str, tuple[grpc.StatusCode, str]] = {}
    async with OwnIngest(keys.ring, None)(settings, registry=registry) as (channel, _):
        for name in keys.presented:
            try:
                results = await call(channel, keys.metadata(name), [event(keys.account_a)])
            except grpc.aio.AioRpcError as exc:
                answers[name] = (exc.code(), exc.details() or "")
            else:
                answers[name] = (OK, f"accepted {sum(r.accepted for r in results)}")

    expected = expected_answers(keys)
    assert len(answers) == len(expected) == 10
    wrong = {n: (answers[n], expected[n]) for n in expected if answers[n] != expected[n]}
    assert not wrong, f"{rpc}: (answered, expected) per key: {wrong}"
    # what was refused wrote nothing: the topic holds the three accepted events
    records = await produced(settings, 3)
    assert [r.key.decode() for r in records] == [keys.account_a] * 3

    def refused(code: str) -> float | None:
        labels = {"service": INGEST, "code": code}
        return registry.get_sample_value("meterline_grpc_refused_total", labels)

    assert (refused("UNAUTHENTICATED"), refused("PERMISSION_DENIED")) == (6, 1)


async def test_a_scoped_key_reports_its_accounts_only_and_the_others_are_not_taken(
    keys: Keys, settings: Settings
) -> None:
    registry = CollectorRegistry()
    scoped = keys.issued["service of A"].secret
    async with OwnIngest(keys.ring, scoped)(settings, registry=registry) as (channel, _):
        answers = {
            rpc: await call(channel, (), [event(keys.account_a), event(keys.account_b)])
            for rpc, call in CALLS.items()
        }

    for rpc, (a, b) in answers.items():
        assert (a.accepted, b.accepted) == (True, False), rpc
        assert b.reason == f"this key may not report usage for account {keys.account_b}", rpc
    records = await produced(settings, len(CALLS))
    assert [r.key.decode() for r in records] == [keys.account_a] * len(CALLS)
    assert [usage_pb2.UsageEvent.FromString(r.value).account_id for r in records] == [
        keys.account_a
    ] * len(CALLS)
    rejected = {"outcome": "rejected", "reason": "account_not_allowed"}
    assert registry.get_sample_value("meterline_ingest_events_total", rejected) == len(CALLS)


async def test_health_and_reflection_answer_without_a_key(keys: Keys, settings: Settings) -> None:
    async with OwnIngest(keys.ring, None)(settings) as (channel, _):
        status = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=INGEST)
        )
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        names: set[str] = set()
        async for response in reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        ):
            names = {s.name for s in response.list_services_response.service}
            break

    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert {INGEST, "grpc.health.v1.Health"} <= names


# --- the interceptor itself: every kind of handler, every kind of call -------------------

ECHO = "meterline.test.Echo"


async def who_unary(request: bytes, context: object) -> bytes:
    return current_principal().key_id.encode()


async def who_streamed(request: bytes, context: object) -> AsyncIterator[bytes]:
    for _ in range(2):  # an async generator: gRPC's other style of streamed responses
        yield current_principal().key_id.encode()


async def who_of_a_stream(requests: AsyncIterator[bytes], context: object) -> bytes:
    count = sum([1 async for _ in requests])
    return f"{current_principal().key_id}:{count}".encode()


async def who_to_each(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
) -> None:
    async for _ in requests:  # the reader/writer style
        await context.write(current_principal().key_id.encode())


@pytest.fixture
async def echo(keys: Keys) -> AsyncIterator[str]:
    """A server with one service of each kind of RPC, answering who called."""
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(keys.ring, allowed={ECHO: {KeyKind.ADMIN, KeyKind.SERVICE}})]
    )
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(who_unary),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(who_streamed),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(who_of_a_stream),
        "StreamStream": grpc.stream_stream_rpc_method_handler(who_to_each),
    }
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(ECHO, handlers),
            grpc.method_handlers_generic_handler("meterline.test.Unlisted", handlers),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


KINDS = ("Unary", "UnaryStream", "StreamUnary", "StreamStream")


async def ask(channel: grpc.aio.Channel, kind: str, service: str = ECHO) -> list[bytes]:
    """One call of ``kind`` to ``service``, and what it answered."""
    method, raw = f"/{service}/{kind}", {"request_serializer": None, "response_deserializer": None}
    if kind == "Unary":
        return [await channel.unary_unary(method, **raw)(b"")]
    if kind == "StreamUnary":
        return [await channel.stream_unary(method, **raw)(iter([b"", b"", b""]))]
    responses = (
        channel.unary_stream(method, **raw)(b"")
        if kind == "UnaryStream"
        else channel.stream_stream(method, **raw)(iter([b""]))
    )
    return [m async for m in responses]


async def test_every_kind_of_handler_runs_as_the_key_that_called(keys: Keys, echo: str) -> None:
    key = keys.issued["service of A"]
    async with key_channel(echo, key.secret) as channel:
        answers = {kind: await ask(channel, kind) for kind in KINDS}

    key_id = key.key.key_id.encode()
    assert answers == {
        "Unary": [key_id],
        "UnaryStream": [key_id, key_id],
        "StreamUnary": [key_id + b":3"],
        "StreamStream": [key_id],
    }
    with pytest.raises(LookupError, match="did not pass through AuthInterceptor"):
        current_principal()  # and nothing leaked out of the handlers


@pytest.mark.parametrize("kind", KINDS)
async def test_every_kind_of_call_is_refused_before_its_handler(
    keys: Keys, echo: str, kind: str
) -> None:
    cases = [
        (None, ECHO, UNAUTHENTICATED, "no API key: send Authorization: Bearer <key>"),
        ("account A", ECHO, PERMISSION_DENIED, f"account keys may not call {ECHO}"),
        # a service without a policy entry is open to no key
        ("admin", "meterline.test.Unlisted", PERMISSION_DENIED, "admin keys may not call"),
    ]
    for name, service, code, details in cases:
        secret = keys.issued[name].secret if name else None
        async with key_channel(echo, secret) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await ask(channel, kind, service)
        assert refused.value.code() == code, (name, service)
        assert (refused.value.details() or "").startswith(details), (name, service)


async def test_a_refused_stream_that_does_not_end_is_answered_after_a_short_read(
    echo: str,
) -> None:
    async with key_channel(echo, None) as channel:
        call = channel.stream_unary(
            f"/{ECHO}/StreamUnary", request_serializer=None, response_deserializer=None
        )(None)  # None: the reader/writer style, the client writes when it likes
        await call.write(b"")  # and the client neither writes again nor half-closes
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(call, timeout=20 * DRAIN_S)
    assert refused.value.code() == UNAUTHENTICATED


# --- unknown accounts, with METERLINE_ACCOUNTS_UNKNOWN=reject ----------------------------


class CountingStore:
    """The real account store, noting the ids of each ``known`` lookup."""

    def __init__(self, store: AccountLookup) -> None:
        self.store = store
        self.asked: list[set[str]] = []

    def known(self, account_ids: Collection[str]) -> set[str]:
        self.asked.append(set(account_ids))
        return self.store.known(account_ids)


class Seconds:
    """A monotonic clock a test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_directory_looks_up_once_and_remembers(key_ring: KeyRing) -> None:
    store, clock = CountingStore(key_ring.store), Seconds()
    directory = AccountDirectory(store, unknown_ttl_s=2.0, clock=clock)
    known, later = unique("known"), unique("later")
    key_ring.store.create_account(known)

    assert await directory.known([known, later, known]) == {known}
    assert await directory.known([known, later]) == {known}  # both remembered
    assert store.asked == [{known, later}]

    key_ring.store.create_account(later)
    assert await directory.known([later]) == set()  # still remembered as unknown
    clock.now += 2.0
    assert await directory.known([known, later]) == {known, later}
    assert store.asked == [{known, later}, {later}]  # only the id no longer remembered

    clock.now += 3600
    assert await directory.known([known, later]) == {known, later}  # known for good
    assert len(store.asked) == 2


async def test_the_directory_remembers_a_bounded_number_of_unknown_ids(
    key_ring: KeyRing,
) -> None:
    store = CountingStore(key_ring.store)
    directory = AccountDirectory(store, max_unknown=2, clock=Seconds())
    first, second, third = (unique("nobody") for _ in range(3))
    for account_id in (first, second, third):
        await directory.known([account_id])

    await directory.known([second, third])  # the two newest: remembered
    assert len(store.asked) == 3
    await directory.known([first])  # the oldest was forgotten: asked again
    assert store.asked[3:] == [{first}]


async def test_reject_mode_rejects_unknown_accounts_event_by_event(
    keys: Keys, settings: Settings
) -> None:
    store = CountingStore(keys.ring.store)
    directory = AccountDirectory(store, clock=Seconds())
    nobody = unique("nobody")
    registry = CollectorRegistry()
    own = OwnIngest(keys.ring, keys.issued["service"].secret)
    async with own(settings, directory=directory, registry=registry) as (channel, _):
        answers = {
            rpc: await call(
                channel, (), [event(keys.account_a), event(nobody), event(keys.account_a)]
            )
            for rpc, call in CALLS.items()
        }

    reason = (
        f"unknown account {nobody}: create it first (or set METERLINE_ACCOUNTS_UNKNOWN=register)"
    )
    for rpc, results in answers.items():
        assert [r.accepted for r in results] == [True, False, True], rpc
        assert results[1].reason == reason, rpc
    records = await produced(settings, 2 * len(CALLS))
    assert {r.key.decode() for r in records} == {keys.account_a}
    assert len(records) == 2 * len(CALLS)
    # one lookup in all: a report asks once; then both ids are remembered
    assert store.asked == [{keys.account_a, nobody}]
    rejected = {"outcome": "rejected", "reason": "unknown_account"}
    assert registry.get_sample_value("meterline_ingest_events_total", rejected) == len(CALLS)


async def test_reject_mode_answers_unavailable_when_accounts_cannot_be_looked_up(
    keys: Keys, settings: Settings, postgres_url: str
) -> None:
    database = open_database(postgres_url, PostgresSettings())
    database.close()  # as a PostgreSQL that went away: every statement fails
    directory = AccountDirectory(PostgresAccountStore(database))
    own = OwnIngest(keys.ring, keys.issued["service"].secret)
    async with own(settings, directory=directory) as (channel, _):
        for rpc, call in CALLS.items():
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await call(channel, (), [event(keys.account_a)])
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, rpc
            assert "cannot tell which accounts exist" in (failed.value.details() or ""), rpc
