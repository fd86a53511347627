"""`meterline simulate --check-quota` against real servers: a QuotaServer over this
machine's Redis (a key prefix per test), the run's PostgreSQL and the session's chDB;
ingest on the test broker, and a pricing pipeline writing what it receives to chDB."""

from __future__ import annotations

import io
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime, timedelta

import pytest
from rich.console import Console

from conftest import Stack
from meterline.accounts import KeyRing
from meterline.accounts.grpc import key_channel
from meterline.accounts.manage import Accounts, IssuedKey
from meterline.lib.kafka import ensure_topics, free_port, start_producer
from meterline.lib.postgres import Database
from meterline.lib.settings import QuotaSettings, Settings
from meterline.lib.warehouse import Warehouse
from meterline.quotas.plans import PlanLimits, PlanTerms
from meterline.quotas.postgres import PostgresPlanStore
from services.ingest.server import IngestServer
from services.quota.server import QuotaServer
from services.simulate import SentTotals, max_output_tokens, simulate
from support.quotas import quota_desk


@pytest.fixture
async def quota_target(
    warehouse: Warehouse, database: Database, accounts: Accounts, key_ring: KeyRing
) -> AsyncIterator[str]:
    """A QuotaServer of the test's own; yields its address."""
    async with quota_desk(warehouse, database, accounts) as desk:
        server = QuotaServer(desk, settings=QuotaSettings(port=0), auth=key_ring)
        await server.start()
        try:
            yield server.address
        finally:
            await server.stop()


@pytest.fixture
def ingest(
    settings: Settings, warehouse: Warehouse, key_ring: KeyRing, service_key: IssuedKey
) -> Callable[[], AbstractAsyncContextManager[tuple[str, Stack]]]:
    """Ingest on the test's topic, and a Stack to run a pipeline and read what it stored."""

    @asynccontextmanager
    async def running() -> AsyncIterator[tuple[str, Stack]]:
        await ensure_topics(settings.bootstrap_servers, settings.kafka)
        producer = await start_producer(settings.bootstrap_servers, settings.kafka)
        server = IngestServer(
            producer,
            topic=settings.kafka.topic,
            rules=settings.events,
            settings=settings.grpc,
            auth=key_ring,
        )
        await server.start()
        stack = Stack(settings, warehouse, key_channel(server.address, service_key.secret), [])
        try:
            yield server.address, stack
        finally:
            await stack.stop_pipelines()
            await stack.channel.close(grace=None)
            await server.stop()
            await producer.stop()

    return running


def on_plan(accounts: Accounts, database: Database, run_tag: str, limits: PlanLimits) -> str:
    """The simulator's one account of ``run_tag``, made, on a new plan since a day ago."""
    account = f"sim-{run_tag}-000"
    accounts.store.create_account(account)
    plans = PostgresPlanStore(database)
    plan = plans.add_version(PlanTerms(plan_id=f"plan-{run_tag}", limits=limits))
    plans.assign(account, plan.plan_id, plan.version, datetime.now(UTC) - timedelta(days=1), "t")
    return account


async def burst(
    target: str, quota: str, key: IssuedKey, run_tag: str, output: io.StringIO
) -> SentTotals:
    """200 requests of one account in 2 s, in batches of 20, each checked first."""
    return await simulate(
        target,
        rate=100,
        duration_s=2,
        accounts=1,
        batch_size=20,
        seed=7,
        console=Console(file=output, width=120),
        key=key.secret,
        quota_target=quota,
        run_tag=run_tag,
    )


async def test_a_burst_past_the_minute_limit_sends_only_what_was_allowed(
    ingest: Callable[[], AbstractAsyncContextManager[tuple[str, Stack]]],
    quota_target: str,
    service_key: IssuedKey,
    accounts: Accounts,
    database: Database,
) -> None:
    run_tag = uuid.uuid4().hex[:8]
    account = on_plan(accounts, database, run_tag, PlanLimits(requests_per_minute=50))
    output = io.StringIO()
    async with ingest() as (target, stack):
        stack.start_pipeline()
        totals = await burst(target, quota_target, service_key, run_tag, output)

        assert not totals.error, totals.error
        assert (totals.requests, totals.checked, totals.allowed, totals.denied) == (
            200,
            200,
            50,
            150,
        )
        assert totals.denied_reasons == {"requests_per_minute": 150}
        # the denied requests were never reported: ingest had the 50 allowed, no more
        assert (totals.sent, totals.events, totals.accepted) == (50, 50, 50)
        stored = await stack.wait_for_requests(account, 50)
        assert stored["totals"]["requests"] == 50

    text = output.getvalue()
    assert "requests checked (CheckQuota)" in text
    assert "requests_per_minute 150" in text


async def test_without_a_plan_every_check_is_allowed_and_sent(
    ingest: Callable[[], AbstractAsyncContextManager[tuple[str, Stack]]],
    quota_target: str,
    service_key: IssuedKey,
) -> None:
    output = io.StringIO()
    async with ingest() as (target, _):
        totals = await burst(target, quota_target, service_key, uuid.uuid4().hex[:8], output)
    assert not totals.error, totals.error
    assert (totals.checked, totals.allowed, totals.denied, totals.sent) == (200, 200, 0, 200)
    assert totals.accepted == 200 and not totals.denied_reasons


async def test_a_quota_service_that_does_not_answer_stops_the_run_with_a_reason(
    ingest: Callable[[], AbstractAsyncContextManager[tuple[str, Stack]]],
    service_key: IssuedKey,
) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    output = io.StringIO()
    async with ingest() as (target, _):
        totals = await burst(target, nowhere, service_key, uuid.uuid4().hex[:8], output)
    assert totals.error.startswith(f"quota at {nowhere} failed a check: UNAVAILABLE")
    assert "\n" not in totals.error
    assert (totals.checked, totals.sent) == (0, 0)


def test_max_output_tokens_is_a_cap_a_client_would_set() -> None:
    assert [max_output_tokens(n) for n in (1, 256, 257, 1000, 5000)] == [
        256,
        256,
        512,
        1024,
        8192,
    ]
