"""The gate of prepaid accounts' requests: a check must fit its estimated charge in
the account's credits less what the requests in flight hold. Real Redis and
PostgreSQL; the model is priced at $1 input and $2 output per million tokens, so a
check of 1,000 tokens in and at most 500 out holds $0.002."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import pytest
import redis.asyncio

from conftest import unique
from meterline.accounts import KeyRing
from meterline.accounts.manage import Accounts, IssuedKey
from meterline.credits.model import GrantKind
from meterline.credits.postgres import UsageCharge
from meterline.lib.postgres import Database
from meterline.lib.warehouse import Warehouse
from meterline.money import usd_to_picos
from meterline.quotas.desk import QuotaDesk
from meterline.quotas.engine import Decision, QuotaRequest, Settlement
from meterline.quotas.plans import PlanLimits
from support.quotas import (
    LOCAL_REDIS,
    account_on,
    clear_of_midnight,
    priced_model,
    quota_desk,
    serving,
)

HOLD = usd_to_picos(Decimal("0.002"))


@pytest.fixture(autouse=True)
async def one_day() -> None:
    await clear_of_midnight("UTC")


@pytest.fixture
async def model(warehouse: Warehouse) -> str:
    return priced_model(warehouse)


@pytest.fixture
async def desk(
    warehouse: Warehouse, database: Database, accounts: Accounts, model: str
) -> AsyncIterator[QuotaDesk]:
    async with quota_desk(warehouse, database, accounts) as made:
        yield made


def usd(text: str) -> int:
    return usd_to_picos(Decimal(text))


def prepaid(desk: QuotaDesk, accounts: Accounts, credits: str | None, **limits: object) -> str:
    """A new account on a prepaid plan, given ``credits`` (None: none)."""
    account = account_on(desk, accounts, billing="prepaid", limits=PlanLimits(**limits))
    if credits is not None:
        desk.ledger.grant(
            account,
            amount_picos=usd(credits),
            kind=GrantKind.PURCHASED,
            idempotency_key=unique("top-up"),
        )
    return account


def request(account: str, model: str, event_id: str | None = None) -> QuotaRequest:
    return QuotaRequest(
        account_id=account,
        api_key_id=None,
        model=model,
        provider="acme",
        input_tokens=1_000,
        max_output_tokens=500,
        event_id=event_id or str(uuid.uuid4()),
    )


def credits_of(decision: Decision) -> tuple[int, int, int]:
    """(credits, held, left) as the decision reports them."""
    state = decision.credits
    assert state is not None, decision
    return state.cap, state.used, state.remaining


async def test_checks_hold_credits_and_the_one_that_does_not_fit_is_denied(
    desk: QuotaDesk, accounts: Accounts, model: str
) -> None:
    account = prepaid(desk, accounts, "0.005")
    first, second = request(account, model), request(account, model)
    allowed = [await desk.check(first), await desk.check(second)]
    assert all(d.allowed for d in allowed)
    assert credits_of(allowed[0]) == (usd("0.005"), HOLD, usd("0.003"))
    assert credits_of(allowed[1]) == (usd("0.005"), 2 * HOLD, usd("0.001"))

    third = await desk.check(request(account, model))
    assert not third.allowed and third.reason == "insufficient_credits"
    assert third.message == (
        "insufficient credits: $0.001 available ($0.005 less $0.004 held by requests in "
        "flight), this request needs up to $0.002; top up to go on"
    )
    assert credits_of(third) == (usd("0.005"), 2 * HOLD, usd("0.001"))
    assert await desk.engine.credit_holds(account) == 2 * HOLD

    # a request that never ran gives its hold back, once
    assert await desk.release(account, first.event_id)
    assert not await desk.release(account, first.event_id)
    assert await desk.engine.credit_holds(account) == HOLD
    assert (await desk.check(request(account, model))).allowed
    assert not (await desk.check(request(account, model))).allowed


async def test_a_postpaid_account_is_not_gated_on_credits(
    desk: QuotaDesk, accounts: Accounts, model: str
) -> None:
    account = account_on(desk, accounts, limits=PlanLimits(requests_per_minute=100))
    decision = await desk.check(request(account, model))
    assert decision.allowed and decision.credits is None


async def test_an_account_never_given_credits_is_denied(
    desk: QuotaDesk, accounts: Accounts, model: str
) -> None:
    account = prepaid(desk, accounts, None)
    decision = await desk.check(request(account, model))
    assert decision.reason == "insufficient_credits"
    assert credits_of(decision) == (0, 0, 0)


async def test_the_settle_takes_the_hold_off_as_the_debit_comes_on(
    desk: QuotaDesk, accounts: Accounts, model: str
) -> None:
    """The settle writes the credits the pipeline read after the debit, in the script
    call that frees the hold: the charge is in one of them at every instant."""
    account = prepaid(desk, accounts, "0.005")
    asked = request(account, model)
    assert (await desk.check(asked)).allowed
    plan = (await desk.terms(account)).plan_at(datetime.now(UTC))
    assert plan is not None
    used = usd("0.0015")  # 500 tokens out of the 500 it might have used: $0.0005 less
    now = datetime.now(UTC)
    desk.ledger.post_usage(account, [UsageCharge(asked.event_id, now, used)])
    after_debit = desk.ledger.credit(account)
    assert after_debit.spendable_picos == usd("0.0035")
    settlement = Settlement(account, asked.event_id, None, model, 1_000, 250, used, now)
    assert await desk.engine.settle([(settlement, plan, "UTC")], credits={account: after_debit})
    _, _, states = await desk.usage(account)
    (gate,) = [s for s in states if s.limit == "credits"]
    assert (gate.cap, gate.used, gate.remaining) == (usd("0.0035"), 0, usd("0.0035"))


async def test_an_older_copy_of_the_credits_never_replaces_a_newer(
    desk: QuotaDesk, accounts: Accounts, model: str
) -> None:
    account = prepaid(desk, accounts, "0.005")
    before = desk.ledger.credit(account)
    desk.ledger.grant(
        account, amount_picos=usd("1"), kind=GrantKind.PURCHASED, idempotency_key="more"
    )
    after = desk.ledger.credit(account)
    assert after.version > before.version
    assert await desk.engine.publish_credits([after]) == 1
    assert await desk.engine.publish_credits([before]) == 0  # late: a read begun earlier
    decision = await desk.check(request(account, model))
    assert credits_of(decision)[0] == usd("1.005")


async def test_a_top_up_lets_the_next_request_through_at_once(
    desk: QuotaDesk, accounts: Accounts, model: str
) -> None:
    account = prepaid(desk, accounts, "0.001")
    assert (await desk.check(request(account, model))).reason == "insufficient_credits"
    desk.ledger.grant(
        account, amount_picos=usd("0.01"), kind=GrantKind.PURCHASED, idempotency_key="top-up"
    )
    await desk.refresh_credits(account)  # what the API does after posting a grant
    decision = await desk.check(request(account, model))
    assert decision.allowed and credits_of(decision) == (usd("0.011"), HOLD, usd("0.009"))


async def test_credits_lost_from_redis_are_read_from_the_ledger_and_holds_stay(
    desk: QuotaDesk, accounts: Accounts, model: str
) -> None:
    account = prepaid(desk, accounts, "0.005")
    assert (await desk.check(request(account, model))).allowed
    client = redis.asyncio.Redis.from_url(LOCAL_REDIS)
    try:
        prefix = desk.engine._prefix
        assert await client.delete(f"{prefix}{{a:{account}}}:credit") == 1
    finally:
        await client.aclose()
    decision = await desk.check(request(account, model))
    assert decision.allowed and credits_of(decision) == (usd("0.005"), 2 * HOLD, usd("0.001"))


async def test_a_grant_past_its_expiry_is_not_spendable(
    desk: QuotaDesk, accounts: Accounts, model: str
) -> None:
    """The copy in Redis holds until a grant expires or takes effect (well within its
    refresh), then is read again."""
    account = prepaid(desk, accounts, None)
    now = datetime.now(UTC)
    desk.ledger.grant(
        account,
        amount_picos=usd("0.005"),
        kind=GrantKind.PROMOTIONAL,
        idempotency_key="trial",
        expires_at=now + timedelta(seconds=20),
    )
    desk.ledger.grant(
        account,
        amount_picos=usd("0.003"),
        kind=GrantKind.PURCHASED,
        idempotency_key="later",
        effective_at=now + timedelta(seconds=10),
    )
    soon = await desk.check(request(account, model), now=now + timedelta(seconds=1))
    assert credits_of(soon)[0] == usd("0.005")
    both = await desk.check(request(account, model), now=now + timedelta(seconds=11))
    assert credits_of(both)[0] == usd("0.008")
    after = await desk.check(request(account, model), now=now + timedelta(seconds=21))
    assert credits_of(after)[0] == usd("0.003")


async def test_the_balance_route_shows_what_requests_in_flight_hold(
    warehouse: Warehouse,
    key_ring: KeyRing,
    accounts: Accounts,
    desk: QuotaDesk,
    admin_key: IssuedKey,
    model: str,
) -> None:
    account = prepaid(desk, accounts, "0.005")
    assert (await desk.check(request(account, model))).allowed
    async with (
        serving(warehouse, key_ring, accounts, desk) as url,
        httpx.AsyncClient(
            base_url=url, headers={"authorization": f"Bearer {admin_key.secret}"}
        ) as http,
    ):
        balance = (await http.get(f"/v1/accounts/{account}/balance")).json()
        assert (balance["available_usd"], balance["reserved_usd"]) == ("0.005", "0.002")
        # a grant through the API is seen by the next check at once
        grant = {"amount_usd": "1", "idempotency_key": "api-top-up"}
        made = await http.post(f"/v1/accounts/{account}/grants", json=grant)
        assert made.status_code == 201, made.text
    decision = await desk.check(request(account, model))
    assert credits_of(decision) == (usd("1.005"), 2 * HOLD, usd("1.001"))
