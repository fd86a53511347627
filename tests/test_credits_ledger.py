"""The credits ledger on the run's PostgreSQL: burn order over time, idempotent postings
(concurrent ones too), debits of usage exactly once, what is owed, voids, expiries; and
the ledger always explains the balance."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from conftest import unique
from meterline.accounts.manage import Accounts
from meterline.credits.model import EntryKind, GrantKind
from meterline.credits.postgres import IdempotencyConflict, PostgresLedger, UsageCharge
from meterline.lib.postgres import Database
from meterline.money import PICOS_PER_USD

USD = PICOS_PER_USD
T0 = datetime(2031, 3, 1, tzinfo=UTC)


@pytest.fixture
def ledger(database: Database) -> PostgresLedger:
    return PostgresLedger(database)


@pytest.fixture
def account(accounts: Accounts) -> str:
    made = unique("credits")
    accounts.store.create_account(made)
    return made


def charges(*cents: int, at: datetime = T0) -> list[UsageCharge]:
    return [UsageCharge(str(uuid.uuid4()), at, c * USD // 100) for c in cents]


def explained(ledger: PostgresLedger, account: str, at: datetime) -> int:
    """The balance, checked against what explains it: the sum of the entries, and the
    open grants' remainders less what is owed."""
    balance = ledger.balance(account, now=at)
    entries = ledger.entries(account, limit=10_000)
    assert balance.balance_picos == sum(e.amount_picos for e in entries)
    remaining = sum(g.remaining_picos for g in balance.grants)
    assert balance.balance_picos == remaining - balance.owed_picos
    return balance.balance_picos


def test_debits_burn_by_priority_kind_expiry_and_age_over_time(
    ledger: PostgresLedger, account: str
) -> None:
    def give(key: str, dollars: int, kind: GrantKind, priority: int, days: int | None) -> str:
        expires = None if days is None else T0 + timedelta(days=days)
        grant, made = ledger.grant(
            account,
            amount_picos=dollars * USD,
            kind=kind,
            priority=priority,
            effective_at=T0,
            expires_at=expires,
            idempotency_key=key,
            now=T0,
        )
        assert made
        return grant.grant_id

    purchased = give("a", 10, GrantKind.PURCHASED, 10, None)
    promo_late = give("b", 5, GrantKind.PROMOTIONAL, 10, 10)
    urgent = give("c", 3, GrantKind.PURCHASED, 5, 30)
    promo_soon = give("d", 2, GrantKind.PROMOTIONAL, 10, 5)

    # $4: the lowest priority number first (c: $3), then promotional before purchased at
    # equal priority, the earliest expiry first (d: $1 of its $2)
    first = ledger.post_usage(account, charges(150, 250), now=T0)
    assert first is not None and first.amount_picos == -4 * USD
    assert {(d.grant_id, d.picos) for d in ledger.draws(first.entry_id)} == {
        (urgent, 3 * USD),
        (promo_soon, 1 * USD),
    }
    assert explained(ledger, account, T0) == 16 * USD

    # day 6: d expired with $1 left, released as its own entry at its expiry; $2 comes
    # from b, the promotional grant still open
    day6 = T0 + timedelta(days=6)
    second = ledger.post_usage(account, charges(200, at=day6), now=day6)
    assert second is not None
    assert {(d.grant_id, d.picos) for d in ledger.draws(second.entry_id)} == {(promo_late, 2 * USD)}
    (expiry,) = ledger.entries(account, kinds=[EntryKind.EXPIRY])
    assert (expiry.grant_id, expiry.amount_picos) == (promo_soon, -1 * USD)
    assert expiry.effective_at == T0 + timedelta(days=5)
    assert explained(ledger, account, day6) == 13 * USD

    # day 11: b expired with $3 left; purchased credits pay the rest
    day11 = T0 + timedelta(days=11)
    third = ledger.post_usage(account, charges(700, at=day11), now=day11)
    assert third is not None
    assert {(d.grant_id, d.picos) for d in ledger.draws(third.entry_id)} == {(purchased, 7 * USD)}
    balance = ledger.balance(account, now=day11)
    assert [g.grant_id for g in balance.grants] == [purchased]
    assert explained(ledger, account, day11) == 3 * USD
    assert ledger.drawn_from(purchased) == 7 * USD


def test_a_grant_posts_once_per_idempotency_key_even_concurrently(
    ledger: PostgresLedger, account: str
) -> None:
    made: list[bool] = []
    errors: list[BaseException] = []

    def top_up() -> None:
        try:
            _, created = ledger.grant(
                account, amount_picos=25 * USD, kind=GrantKind.PURCHASED, idempotency_key="order-1"
            )
            made.append(created)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=top_up) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sorted(made) == [False] * 7 + [True]
    assert ledger.balance(account).balance_picos == 25 * USD
    assert len(ledger.entries(account)) == 1
    with pytest.raises(IdempotencyConflict):  # the same key for another amount
        ledger.grant(
            account, amount_picos=30 * USD, kind=GrantKind.PURCHASED, idempotency_key="order-1"
        )


def test_a_replayed_batch_debits_only_what_it_has_new(ledger: PostgresLedger, account: str) -> None:
    ledger.grant(account, amount_picos=10 * USD, kind=GrantKind.PURCHASED, idempotency_key="g")
    batch = charges(1, 2, 3)
    first = ledger.post_usage(account, batch)
    assert first is not None and (first.amount_picos, first.events) == (-6 * USD // 100, 3)
    assert ledger.post_usage(account, batch) is None  # the same batch again
    later = ledger.post_usage(account, [*batch[1:], *charges(10)])  # replayed, cut otherwise
    assert later is not None and (later.amount_picos, later.events) == (-10 * USD // 100, 1)
    assert explained(ledger, account, datetime.now(UTC)) == 10 * USD - 16 * USD // 100
    debited = ledger.debited(account, T0, T0 + timedelta(seconds=1))
    assert sorted(debited.values()) == [1 * USD // 100, 2 * USD // 100, 3 * USD // 100, USD // 10]


def test_usage_beyond_the_grants_is_owed_and_paid_by_the_next_grant(
    ledger: PostgresLedger, account: str
) -> None:
    ledger.grant(account, amount_picos=1 * USD, kind=GrantKind.PURCHASED, idempotency_key="g1")
    debit = ledger.post_usage(account, charges(150))
    assert debit is not None
    balance = ledger.balance(account)
    assert (balance.balance_picos, balance.available_picos, balance.owed_picos) == (
        -USD // 2,
        -USD // 2,
        USD // 2,
    )
    second, _ = ledger.grant(
        account, amount_picos=2 * USD, kind=GrantKind.PURCHASED, idempotency_key="g2"
    )
    balance = ledger.balance(account)
    assert (balance.available_picos, balance.owed_picos) == (3 * USD // 2, 0)
    # the debit's unpaid half was drawn from the new grant: every cent of usage is covered
    assert sum(d.picos for d in ledger.draws(debit.entry_id)) == 3 * USD // 2
    assert ledger.drawn_from(second.grant_id) == USD // 2
    explained(ledger, account, datetime.now(UTC))


def test_voids_and_adjustments_post_once_with_their_reason(
    ledger: PostgresLedger, account: str
) -> None:
    grant, _ = ledger.grant(
        account, amount_picos=5 * USD, kind=GrantKind.PROMOTIONAL, idempotency_key="promo"
    )
    ledger.post_usage(account, charges(100))
    void, made = ledger.void(account, grant.grant_id, idempotency_key="v", reason="fraud")
    assert made and void.amount_picos == -4 * USD
    assert ledger.void(account, grant.grant_id, idempotency_key="v")[1] is False
    with pytest.raises(ValueError, match="closed"):
        ledger.void(account, grant.grant_id, idempotency_key="v2")
    credit, _ = ledger.adjust(
        account, amount_picos=2 * USD, reason="goodwill", idempotency_key="adj-1"
    )
    debit, _ = ledger.adjust(account, amount_picos=-USD // 2, reason="fee", idempotency_key="adj-2")
    assert (
        ledger.adjust(account, amount_picos=-USD // 2, reason="fee", idempotency_key="adj-2")[1]
        is False
    )
    assert (credit.reason, debit.reason) == ("goodwill", "fee")
    assert explained(ledger, account, datetime.now(UTC)) == 3 * USD // 2


def test_postings_for_an_unknown_account_are_refused(ledger: PostgresLedger) -> None:
    from meterline.accounts.model import AccountNotFound

    with pytest.raises(AccountNotFound):
        ledger.grant(
            unique("nobody"), amount_picos=USD, kind=GrantKind.PURCHASED, idempotency_key="x"
        )


def test_an_idle_accounts_expired_grant_is_released_at_its_expiry(
    ledger: PostgresLedger, account: str
) -> None:
    expires = T0 + timedelta(days=1)
    ledger.grant(
        account,
        amount_picos=3 * USD,
        kind=GrantKind.PROMOTIONAL,
        effective_at=T0,
        expires_at=expires,
        idempotency_key="trial",
        now=T0,
    )
    later = T0 + timedelta(days=2)
    assert ledger.balance(account, now=later).available_picos == 0  # read before release
    assert ledger.expire_due(now=later) >= 1
    (expiry,) = ledger.entries(account, kinds=[EntryKind.EXPIRY])
    assert (expiry.amount_picos, expiry.effective_at) == (-3 * USD, expires)
    ledger.expire_due(now=later + timedelta(days=1))  # released once
    assert len(ledger.entries(account, kinds=[EntryKind.EXPIRY])) == 1
    assert explained(ledger, account, later) == 0
