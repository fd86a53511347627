"""The quota gRPC service as a gateway calls it: a real QuotaServer over this machine's
Redis (a key prefix per test), the run's PostgreSQL and the session's chDB."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import grpc
import pytest
import redis.asyncio

from conftest import Stack, event, unique
from meterline.accounts import KeyRing
from meterline.accounts.manage import Accounts, IssuedKey
from meterline.accounts.model import AccountStatus, KeyKind
from meterline.accounts.store import AccountUpdate
from meterline.credits.postgres import PostgresLedger
from meterline.lib.postgres import Database
from meterline.lib.settings import QuotaSettings
from meterline.lib.warehouse import Warehouse
from meterline.quotas.charges import ChargeBook
from meterline.quotas.desk import QuotaDesk
from meterline.quotas.plans import PlanLimits, PlanTerms
from meterline.quotas.postgres import PostgresPlanStore
from meterline.quotas.settler import QuotaSettler
from meterline.quotas.windows import Window, window_bounds
from meterline.v1 import quota_pb2
from support.quotas import LOCAL_REDIS, Quotas, ask, clear_of_midnight, quota_server

R = quota_pb2.DenyReason


@pytest.fixture(autouse=True)
async def one_day() -> None:
    await clear_of_midnight("UTC")


@pytest.fixture
async def quotas(
    warehouse: Warehouse,
    database: Database,
    accounts: Accounts,
    key_ring: KeyRing,
    service_key: IssuedKey,
) -> AsyncIterator[Quotas]:
    prefix = f"test:{uuid.uuid4().hex}:"
    async with quota_server(
        prefix,
        warehouse=warehouse,
        database=database,
        accounts=accounts,
        key_ring=key_ring,
        service_key=service_key,
    ) as running:
        yield running


def limit(answer: quota_pb2.CheckQuotaResponse, name: str, scope: str = "account") -> Any:
    (found,) = [s for s in answer.limits if s.limit == name and s.scope == scope]
    return found


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float = 10) -> None:
    async with asyncio.timeout(timeout_s):
        while not await check():
            await asyncio.sleep(0.05)


# -- what is reserved, and why a request is denied ---------------------------------------


async def test_an_allowed_check_reserves_the_charge_the_pipeline_would_make(
    quotas: Quotas,
) -> None:
    account = quotas.account_on(
        limits=PlanLimits(spend_per_day_usd=Decimal(1), tokens_per_month=1_000_000),
        price_multiplier="1.5",
        request_fee_usd="0.001",
    )
    answer = await quotas.stub().CheckQuota(ask(account, input_tokens=1_000, max_output_tokens=500))

    assert answer.allowed and answer.reason == R.DENY_REASON_UNSPECIFIED
    # gpt-4.1-mini: 1,000 × $0.40 + 500 × $1.60 per million = $0.0012; × 1.5 + $0.001
    spend = limit(answer, "spend_per_day")
    assert (spend.used, spend.limit_value, spend.remaining) == ("0.0028", "1", "0.9972")
    tokens = limit(answer, "tokens_per_month")
    assert (tokens.used, tokens.remaining) == ("1500", "998500")
    day_end = window_bounds(Window.DAY, datetime.now(UTC), "UTC")[1]
    assert spend.resets_at.ToDatetime(UTC) == day_end


async def test_a_huge_max_tokens_reserves_only_the_configured_output(quotas: Quotas) -> None:
    account = quotas.account_on(limits=PlanLimits(tokens_per_day=100_000))
    answer = await quotas.stub().CheckQuota(ask(account, input_tokens=10, max_output_tokens=10**7))
    assert answer.allowed
    assert limit(answer, "tokens_per_day").used == str(10 + 16_384)


async def test_denials_name_the_limit_that_tripped(quotas: Quotas) -> None:
    stub = quotas.stub()
    account = quotas.account_on(
        limits=PlanLimits(requests_per_minute=2, models_refused=["claude*"])
    )
    assert (await stub.CheckQuota(ask(account))).allowed
    assert (await stub.CheckQuota(ask(account))).allowed
    third = await stub.CheckQuota(ask(account))
    assert not third.allowed and third.reason == R.DENY_REASON_REQUESTS_PER_MINUTE
    assert "requests per minute of the account: 2 of 2 used" in third.message
    assert timedelta(seconds=55) < third.retry_after.ToTimedelta() <= timedelta(seconds=60)
    assert limit(third, "requests_per_minute").remaining == "0"

    refused = await stub.CheckQuota(ask(account, model="anthropic/claude-sonnet-4"))
    assert not refused.allowed and refused.reason == R.DENY_REASON_MODEL_NOT_ALLOWED


async def test_a_suspended_account_is_denied_within_the_refresh(quotas: Quotas) -> None:
    stub = quotas.stub()
    account = quotas.account_on(limits=PlanLimits(requests_per_day=1_000))
    assert (await stub.CheckQuota(ask(account))).allowed
    quotas.accounts.store.update_account(account, AccountUpdate(status=AccountStatus.SUSPENDED))

    async def denied() -> bool:
        answer = await stub.CheckQuota(ask(account))
        return answer.reason == R.DENY_REASON_ACCOUNT_SUSPENDED and not answer.allowed

    await until(denied)


async def test_an_account_without_a_plan_is_allowed_without_limits(quotas: Quotas) -> None:
    account = unique("planless")
    quotas.accounts.store.create_account(account)
    answer = await quotas.stub().CheckQuota(ask(account))
    assert answer.allowed and not answer.limits and "no plan" in answer.message


async def test_release_frees_the_in_flight_slot_once(quotas: Quotas) -> None:
    stub = quotas.stub()
    account = quotas.account_on(limits=PlanLimits(max_in_flight=1))
    first = ask(account)
    assert (await stub.CheckQuota(first)).allowed
    second = await stub.CheckQuota(ask(account))
    assert not second.allowed and second.reason == R.DENY_REASON_IN_FLIGHT

    release = quota_pb2.ReleaseQuotaRequest(account_id=account, event_id=first.event_id)
    assert (await stub.ReleaseQuota(release)).released
    assert not (await stub.ReleaseQuota(release)).released  # nothing left to free
    assert (await stub.CheckQuota(ask(account))).allowed


async def test_a_retried_check_reserves_once(quotas: Quotas) -> None:
    stub = quotas.stub()
    account = quotas.account_on(limits=PlanLimits(requests_per_minute=5))
    request = ask(account)
    for _ in range(3):
        assert (await stub.CheckQuota(request)).allowed
    assert limit(await stub.CheckQuota(ask(account)), "requests_per_minute").used == "2"


# -- the edge: bad requests and keys -----------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"event_id": ""}, "event_id is missing"),
        ({"model": " "}, "model is missing"),
        ({"input_tokens": -1}, "input_tokens is -1"),
        ({"max_output_tokens": 10**16}, "max_output_tokens is"),
        ({"event_id": "e" * 129}, "event_id is longer than 128"),
    ],
)
async def test_a_malformed_check_is_refused_naming_its_field(
    quotas: Quotas, fields: dict[str, Any], named: str
) -> None:
    account = quotas.account_on()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await quotas.stub().CheckQuota(ask(account, **fields))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in (refused.value.details() or "")


async def test_only_keys_that_may_act_for_the_account_may_ask(quotas: Quotas) -> None:
    account = quotas.account_on()
    other = quotas.account_on()
    own = quotas.accounts.issue_key(KeyKind.ACCOUNT, account_id=account)
    scoped = quotas.accounts.issue_key(KeyKind.SERVICE, account_ids=[other])

    async def code(key: str | None) -> grpc.StatusCode:
        try:
            await quotas.stub(key).CheckQuota(ask(account))
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    assert await code(quotas.service_key.secret) == grpc.StatusCode.OK
    assert await code(own.secret) == grpc.StatusCode.PERMISSION_DENIED  # an account's key
    assert await code(scoped.secret) == grpc.StatusCode.PERMISSION_DENIED  # another's gateway
    assert await code("mlk_nope_nope") == grpc.StatusCode.UNAUTHENTICATED


async def test_redis_down_answers_as_the_setting_says(
    warehouse: Warehouse, database: Database, accounts: Accounts
) -> None:
    account = unique("down")
    accounts.store.create_account(account)
    plans = PostgresPlanStore(database)
    plan = plans.add_version(
        PlanTerms(plan_id=unique("plan"), limits=PlanLimits(requests_per_minute=5))
    )
    plans.assign(account, plan.plan_id, plan.version, datetime.now(UTC) - timedelta(days=1), "t")
    for when, allowed in (("allow", True), ("deny", False)):
        client = redis.asyncio.Redis.from_url(  # nothing listens on port 1
            "redis://127.0.0.1:1/0", socket_connect_timeout=0.5
        )
        desk = QuotaDesk(
            client,
            key_prefix="down:",
            settings=QuotaSettings(when_redis_down=when),
            accounts=accounts.store,
            plans=plans,
            ledger=PostgresLedger(database),
            warehouse=warehouse,
        )
        await desk.start()
        try:
            decision = await desk.check(ask_engine(account))
        finally:
            await desk.close()
            await client.aclose()
        assert (decision.allowed, decision.reason) == (allowed, "redis_unavailable")


def ask_engine(account: str) -> Any:
    from meterline.quotas.engine import QuotaRequest

    return QuotaRequest(account, None, "gpt-4.1-mini", "openai", 10, 10, str(uuid.uuid4()))


# -- settled by the pipeline -------------------------------------------------------------


async def test_the_pipeline_settles_the_reservation_with_what_was_used(
    quotas: Quotas, stack: Stack, database: Database
) -> None:
    account = quotas.account_on(
        limits=PlanLimits(spend_per_day_usd=Decimal(1), max_in_flight=1),
        request_fee_usd="0.001",
    )
    book = ChargeBook(PostgresPlanStore(database))
    settler = QuotaSettler(
        LOCAL_REDIS,
        key_prefix=quotas.prefix,
        settings=QuotaSettings(),
        plans=book,
        accounts=quotas.accounts.store,
    )
    try:
        stack.start_pipeline(handlers=[settler], plans=book)
        stub = quotas.stub()
        request = ask(account, input_tokens=1_000, max_output_tokens=500)
        assert (await stub.CheckQuota(request)).allowed  # reserves $0.0012 + $0.001
        # it used 1,000 in and 100 out: $0.00056 + $0.001
        await stack.report(
            event(account, event_id=request.event_id, input_tokens=1_000, output_tokens=100)
        )

        async def settled() -> bool:
            answer = await stub.CheckQuota(ask(account, input_tokens=0, max_output_tokens=1))
            return answer.allowed  # the in-flight slot is free once settled

        await until(settled, timeout_s=20)
        _, _, states = await quotas.desk.usage(account)
        spend = {s.limit: s.used for s in states}["spend_per_day"]
        # the settled event, plus the last check's reservation ($0 + 1 × $1.60/M + fee)
        assert spend == 560_000_000 + 1_000_000_000 + 1_600_000 + 1_000_000_000
    finally:
        await stack.stop_pipelines()
        settler.close()
