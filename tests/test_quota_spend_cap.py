"""A hard monthly spend cap under concurrent gateways, while the pricing pipeline (a real
`meterline pipeline` process) is SIGKILLed and restarted, and, in the second test, while
Redis loses every counter: what the account is charged passes the cap by at most one
request's reservation (by the reservations in flight when Redis lost them), and the
counter, the warehouse and what was sent agree to the pico-dollar. The third drives a
prepaid account's credits to zero the same way: the requests' holds keep what is
charged within the credits, and the ledger debits each charge once.

Gateways here check, then report what the request used (never more than its estimate:
the input is known, the output at most max_output_tokens)."""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import pytest
import redis.asyncio

from conftest import Stack, event
from meterline.accounts import KeyRing
from meterline.accounts.manage import Accounts, IssuedKey
from meterline.credits.model import GrantKind
from meterline.lib.postgres import Database
from meterline.lib.settings import Settings
from meterline.lib.warehouse import Warehouse
from meterline.money import PICOS_PER_USD, usd_to_picos
from meterline.quotas.plans import PlanLimits
from meterline.v1 import quota_pb2
from support.chaos import PipelineFleet, drained, env_for
from support.quotas import LOCAL_REDIS, Quotas, ask, clear_of_midnight, quota_server

GATEWAYS = int(os.environ.get("METERLINE_SOAK_GATEWAYS", "12"))
CAP_USD = Decimal(os.environ.get("METERLINE_SOAK_SPEND_CAP_USD", "0.40"))
#: gpt-4.1-mini, 2,000 tokens in and at most 1,000 out: $0.0008 + $0.0016
RESERVATION_PICOS = usd_to_picos(Decimal("0.0024"))
R = quota_pb2.DenyReason


@pytest.fixture(autouse=True)
async def one_month() -> None:
    await clear_of_midnight("UTC")


@dataclass
class Run:
    sent: dict[str, int] = field(default_factory=dict)  # event id -> charge, picos
    answers: Counter[str] = field(default_factory=Counter)
    kills: int = 0
    redis_losses: int = 0
    #: reservations Redis held when it lost them: requests checked and not yet settled
    #: (reported and in Kafka, or still running)
    reserved_at_loss: int = 0


async def gateway(
    quotas: Quotas, stack: Stack, account: str, run: Run, stop: asyncio.Event
) -> None:
    """Check, run (a few ms), report what was used; again, until told to stop."""
    stub = quotas.stub()
    rng = random.Random(uuid.uuid4().int)
    while not stop.is_set():
        request = ask(account, input_tokens=2_000, max_output_tokens=1_000)
        answer = await stub.CheckQuota(request)
        run.answers[
            quota_pb2.DenyReason.Name(answer.reason) if not answer.allowed else "allowed"
        ] += 1
        if not answer.allowed:
            await asyncio.sleep(0.02)
            continue
        output = rng.randint(0, 1_000)
        await asyncio.sleep(rng.uniform(0, 0.01))
        reported = await stack.report(
            event(account, event_id=request.event_id, input_tokens=2_000, output_tokens=output)
        )
        assert reported.accepted == 1, reported
        run.sent[request.event_id] = (2_000 * 400_000) + output * 1_600_000  # $0.40, $1.60 /M


async def chaos(
    settings: Settings,
    fleet: PipelineFleet,
    run: Run,
    stop: asyncio.Event,
    *,
    lose_redis: str | None,
    reservations: str,
) -> None:
    """Kill the pipeline at random instants and restart it; once, Redis loses every key
    under ``lose_redis``. The gateways go on a while after the last restart, so that the
    cap is reached once the backlog is settled."""
    rng = random.Random(int(os.environ.get("METERLINE_SOAK_SEED", "7")))
    rounds = int(os.environ.get("METERLINE_SOAK_ROUNDS", "3"))
    for round_ in range(rounds):
        await asyncio.sleep(rng.uniform(1.0, 3.0))
        await asyncio.to_thread(fleet.kill, 0)
        run.kills += 1
        if lose_redis is not None and round_ == rounds // 2:
            client = redis.asyncio.Redis.from_url(LOCAL_REDIS)
            run.reserved_at_loss = await client.zcard(reservations)
            keys = [k async for k in client.scan_iter(match=f"{lose_redis}*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()
            run.redis_losses += 1
        await asyncio.sleep(rng.uniform(0.2, 1.5))
        fleet.start(0)
    await drained(settings, fleet, 60)  # the restarted pipeline has caught up
    await asyncio.sleep(2.0)
    stop.set()


def warehouse_charge(warehouse: Warehouse, account: str) -> tuple[int, int]:
    (row,) = warehouse.query(
        "SELECT toUInt64(count()) AS n, toString(sum(toDecimal256(charge_usd, 12))) AS charge "
        "FROM usage_events FINAL WHERE account_id = {a:String}",
        {"a": account},
    )
    return int(row["n"]), usd_to_picos(Decimal(row["charge"]))


@pytest.mark.parametrize(
    ("lose_redis", "credits"),
    [(False, False), (True, False), (False, True)],
    ids=["pipeline-killed", "redis-lost-too", "prepaid-credits"],
)
async def test_a_spend_cap_holds_while_the_pipeline_is_killed(
    lose_redis: bool,
    credits: bool,
    settings: Settings,
    stack: Stack,
    warehouse: Warehouse,
    clickhouse_url: str,
    database: Database,
    accounts: Accounts,
    key_ring: KeyRing,
    service_key: IssuedKey,
    tmp_path: Path,
) -> None:
    prefix = f"{settings.kafka.consumer_group}:"  # the pipeline's (env_for)
    async with quota_server(
        prefix,
        warehouse=warehouse,
        database=database,
        accounts=accounts,
        key_ring=key_ring,
        service_key=service_key,
    ) as quotas:
        if credits:  # the credits are the cap
            account = quotas.account_on(billing="prepaid")
            quotas.desk.ledger.grant(
                account,
                amount_picos=usd_to_picos(CAP_USD),
                kind=GrantKind.PURCHASED,
                idempotency_key="top-up",
            )
        else:
            account = quotas.account_on(limits=PlanLimits(spend_per_month_usd=CAP_USD))
        env = env_for(settings, METERLINE_CLICKHOUSE_URL=clickhouse_url)
        fleet = PipelineFleet(env, 1, tmp_path)
        fleet.start_all()
        run, stop = Run(), asyncio.Event()
        try:
            workers = [
                asyncio.create_task(gateway(quotas, stack, account, run, stop))
                for _ in range(GATEWAYS)
            ]
            await chaos(
                settings,
                fleet,
                run,
                stop,
                lose_redis=prefix if lose_redis else None,
                reservations=f"{prefix}{{a:{account}}}:res",
            )
            await asyncio.gather(*workers)
            await drained(settings, fleet, 120)
        finally:
            codes = fleet.stop_all()
        assert codes == [0], fleet.logs()
        stored, charged = await asyncio.to_thread(warehouse_charge, warehouse, account)
        _, _, states = await quotas.desk.usage(account)
        limits = {s.limit: s for s in states}
    print(
        f"{GATEWAYS} gateways, cap ${CAP_USD}: {dict(run.answers)}; {run.kills} kills, "
        f"{run.redis_losses} Redis losses ({run.reserved_at_loss} reservations lost); "
        f"charged ${Decimal(charged) / PICOS_PER_USD} "
        f"(over the cap by ${max(Decimal(charged) / PICOS_PER_USD - CAP_USD, Decimal(0))})"
    )
    cap = usd_to_picos(CAP_USD)
    denial = "DENY_REASON_INSUFFICIENT_CREDITS" if credits else "DENY_REASON_SPEND_PER_MONTH"
    assert run.kills >= 1 and run.answers[denial] > 0
    # every allowed request was stored once, at the charge the gateway expected
    assert stored == len(run.sent) and charged == sum(run.sent.values())
    if credits:
        # each charge debited once, none beyond the credits; Redis holds what is left
        balance = quotas.desk.ledger.balance(account)
        assert (balance.available_picos, balance.owed_picos) == (cap - charged, 0)
        gate = limits["credits"]
        assert (gate.cap, gate.used) == (cap - charged, 0)
    else:
        # Redis agrees with the warehouse once everything is settled
        assert limits["spend_per_month"].used == charged
    # Redis lost: the unsettled reservations it held were not in the warehouse either
    # Credits: a check holds its whole estimate until the debit is in the copy, and no
    # request used more than its estimate, so nothing is spent beyond them.
    allowance = RESERVATION_PICOS * (run.reserved_at_loss if lose_redis else 0 if credits else 1)
    assert charged <= cap + allowance
    # the cap was reached: less remains than one more request would need
    assert charged > cap - RESERVATION_PICOS * GATEWAYS
