"""The pipeline debits prepaid accounts' credits: one debit per account and batch, the
charge of every priced event exactly once, and the ledger agrees with the warehouse."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from conftest import Stack, event, unique
from meterline.accounts.manage import Accounts
from meterline.credits.check import check_ledger
from meterline.credits.model import CreditState, EntryKind, GrantKind
from meterline.credits.poster import LedgerPoster
from meterline.credits.postgres import PostgresLedger
from meterline.lib.postgres import Database
from meterline.lib.warehouse import Warehouse
from meterline.money import PICOS_PER_USD
from meterline.quotas.charges import ChargeBook
from meterline.quotas.plans import PlanTerms
from meterline.quotas.postgres import PostgresPlanStore
from meterline.usage.clickhouse import ClickHouseUsageStore

USD = PICOS_PER_USD


def account_on(accounts: Accounts, database: Database, billing: str) -> str:
    account = unique(billing)
    accounts.store.create_account(account)
    plans = PostgresPlanStore(database)
    plan = plans.add_version(
        PlanTerms(plan_id=unique("plan"), billing=billing, price_multiplier="2")
    )
    plans.assign(account, plan.plan_id, plan.version, datetime.now(UTC) - timedelta(days=1), "t")
    return account


async def test_priced_usage_is_debited_once_and_agrees_with_the_warehouse(
    stack: Stack, accounts: Accounts, database: Database, warehouse: Warehouse
) -> None:
    ledger = PostgresLedger(database)
    book = ChargeBook(PostgresPlanStore(database))
    prepaid = account_on(accounts, database, "prepaid")
    postpaid = account_on(accounts, database, "postpaid")
    ledger.grant(prepaid, amount_picos=USD, kind=GrantKind.PURCHASED, idempotency_key="top-up")
    published: list[CreditState] = []  # what the quota settler would write to Redis
    poster = LedgerPoster(ledger, book, credits_to=published.extend)
    stack.start_pipeline(handlers=[poster], plans=book)

    events = [
        # 1,000 × $0.40 + 100 × $1.60 per million = $0.00056, × 2: $0.00112
        event(prepaid, input_tokens=1_000, output_tokens=100),
        event(prepaid, input_tokens=2_000, output_tokens=300),  # $0.0008 + $0.00048, × 2
        event(prepaid, model="acme/unknown", provider="acme", input_tokens=5),  # unpriced
        event(postpaid, input_tokens=1_000, output_tokens=100),
    ]
    await stack.report(*events)
    charged = 1_120_000_000 + 2_560_000_000

    async def debited() -> bool:
        balance = await asyncio.to_thread(ledger.balance, prepaid)
        return balance.balance_picos < USD

    async with asyncio.timeout(20):
        while not await debited():
            await asyncio.sleep(0.05)
    await stack.wait_for_requests(postpaid, 1)
    await stack.stop_pipelines()

    (debit,) = ledger.entries(prepaid, kinds=[EntryKind.DEBIT])
    assert (debit.amount_picos, debit.events) == (-charged, 2)  # the unpriced one: nothing
    assert ledger.balance(prepaid).available_picos == USD - charged
    assert published[-1] == ledger.credit(prepaid)  # read after the debit
    assert published[-1].spendable_picos == USD - charged
    assert {s.account_id for s in published} == {prepaid}
    assert ledger.entries(postpaid) == []  # postpaid: billed by statements, not credits

    # the batch handed over again (the pipeline killed before its commit): nothing more
    keys = {(e.account_id, e.event_id) for e in events}
    replayed = ClickHouseUsageStore(warehouse).stored(keys)
    assert len(replayed) == 4
    before = len(published)
    poster.on_flush(list(replayed.values()))
    assert len(ledger.entries(prepaid, kinds=[EntryKind.DEBIT])) == 1
    # the replay sends the credits again: its first run may have stopped before Redis had them
    assert len(published) == before + 1 and published[-1].spendable_picos == USD - charged
    stored = ledger.debited(prepaid, datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC))
    assert sorted(stored.values()) == [1_120_000_000, 2_560_000_000]
    window = (datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1))
    check = check_ledger(ledger, warehouse, PostgresPlanStore(database), prepaid, *window)
    assert check.agrees, check
    assert (check.ledger_events, check.ledger_picos) == (2, charged)
