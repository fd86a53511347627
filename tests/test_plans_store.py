"""Plan versions and assignments in the real PostgreSQL."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from conftest import unique
from meterline.accounts import AccountNotFound
from meterline.accounts.manage import Accounts
from meterline.lib.postgres import Database
from meterline.lib.settings import PostgresSettings
from meterline.quotas.plans import PlanLimits, PlanTerms, PlanVersion
from meterline.quotas.postgres import PostgresPlanStore
from meterline.quotas.store import PlanNotFound

T0 = datetime(2026, 11, 1, tzinfo=UTC)
T1 = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.fixture
def plans(database: Database) -> PostgresPlanStore:
    return PostgresPlanStore(database)


@pytest.fixture
def account_id(accounts: Accounts) -> str:
    made = unique("planned")
    accounts.store.create_account(made)
    return made


def test_a_version_comes_back_as_it_was_written(plans: PostgresPlanStore) -> None:
    plan_id = unique("pro")
    written = PlanTerms.model_validate(
        {
            "plan_id": plan_id,
            "name": "Pro",
            "limits": {
                "requests_per_minute": 600,
                "spend_per_month_usd": "500.25",
                "models_refused": ["o1-pro*"],
                "per_api_key": {"requests_per_minute": 60},
                "per_model": {"gpt-4.1*": {"tokens_per_day": 1_000_000}},
            },
            "price_multiplier": "1.25",
            "request_fee_usd": "0.000000000001",
            "billing": "prepaid",
        }
    )
    made = plans.add_version(written)
    assert (made.version, made.created_at is not None) == (1, True)
    assert made.model_dump(exclude={"version", "created_at"}) == written.model_dump()
    assert made.limits.spend_per_month_usd == Decimal("500.25")
    assert isinstance(made.price_multiplier, Decimal)
    assert made.request_fee_usd == Decimal("0.000000000001")
    assert plans.version(plan_id, 1) == made


def test_versions_are_numbered_one_two_three(plans: PostgresPlanStore) -> None:
    plan_id = unique("basic")
    # a version and creation time passed in are the store's to give, not the caller's
    given = PlanVersion(plan_id=plan_id, version=7, created_at=T0)
    numbers = [plans.add_version(given).version for _ in range(3)]
    assert numbers == [1, 2, 3]
    assert [v.version for v in plans.versions(plan_id)] == [1, 2, 3]
    assert plans.versions(plan_id)[0].created_at != T0


def test_versions_added_at_once_get_distinct_numbers(postgres_url: str) -> None:
    plan_id = unique("rush")
    writers = 8
    start = threading.Barrier(writers)
    numbers: list[int] = []
    failures: list[BaseException] = []
    with Database(postgres_url, PostgresSettings(pool_size=writers)).open() as database:
        plans = PostgresPlanStore(database)

        def add() -> None:
            start.wait()
            try:
                for _ in range(5):
                    numbers.append(plans.add_version(PlanTerms(plan_id=plan_id)).version)
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=add) for _ in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, failures
        assert sorted(numbers) == list(range(1, writers * 5 + 1))
        assert [v.version for v in plans.versions(plan_id)] == sorted(numbers)


def test_plans_lists_the_latest_version_of_each(plans: PostgresPlanStore) -> None:
    first, second = unique("list-a"), unique("list-b")
    plans.add_version(PlanTerms(plan_id=first, name="old"))
    plans.add_version(PlanTerms(plan_id=first, name="new"))
    plans.add_version(PlanTerms(plan_id=second))
    latest = {p.plan_id: p for p in plans.plans()}
    assert (latest[first].version, latest[first].name) == (2, "new")
    assert latest[second].version == 1
    ids = [p.plan_id for p in plans.plans()]
    assert ids == sorted(ids)


def test_the_plan_in_force_follows_the_assignments(
    plans: PostgresPlanStore, account_id: str
) -> None:
    plan_id = unique("dated")
    starter = plans.add_version(PlanTerms(plan_id=plan_id, limits=PlanLimits(requests_per_day=10)))
    plans.add_version(PlanTerms(plan_id=plan_id, limits=PlanLimits(requests_per_day=1000)))
    assert plans.plan_of(account_id, T0) is None  # never assigned
    plans.assign(account_id, plan_id, 1, T0, "test")
    latest = plans.assign(account_id, plan_id, None, T1, "test")  # None: the latest
    assert latest.version == 2

    assert plans.plan_of(account_id, T0 - timedelta(microseconds=1)) is None
    found = plans.plan_of(account_id, T0)
    assert found is not None
    assignment, version = found
    assert (assignment.effective_from, assignment.assigned_by) == (T0, "test")
    assert version == starter and version.limits.requests_per_day == 10
    before_change = plans.plan_of(account_id, T1 - timedelta(microseconds=1))
    assert before_change is not None and before_change[1].version == 1
    after_change = plans.plan_of(account_id, T1)
    assert after_change is not None and after_change[1].limits.requests_per_day == 1000
    assert [(a.version, a.effective_from) for a in plans.assignments(account_id)] == [
        (1, T0),
        (2, T1),
    ]


def test_assigning_again_at_the_same_instant_replaces(
    plans: PostgresPlanStore, account_id: str
) -> None:
    small, large = unique("small"), unique("large")
    plans.add_version(PlanTerms(plan_id=small))
    plans.add_version(PlanTerms(plan_id=large))
    plans.assign(account_id, small, 1, T1, "first")
    plans.assign(account_id, large, 1, T1, "second")
    [only] = plans.assignments(account_id)
    assert (only.plan_id, only.assigned_by) == (large, "second")


def test_unknown_accounts_plans_and_versions(plans: PostgresPlanStore, account_id: str) -> None:
    plan_id = unique("known")
    plans.add_version(PlanTerms(plan_id=plan_id))
    with pytest.raises(AccountNotFound, match="no account"):
        plans.assign(unique("nobody"), plan_id, 1, T0, "test")
    with pytest.raises(PlanNotFound, match="no plan"):
        plans.assign(account_id, unique("nothing"), None, T0, "test")
    with pytest.raises(PlanNotFound, match="version 2"):
        plans.assign(account_id, plan_id, 2, T0, "test")
    with pytest.raises(PlanNotFound):
        plans.version(plan_id, 2)
    with pytest.raises(PlanNotFound):
        plans.versions(unique("nothing"))
    assert plans.assignments(account_id) == []
    assert plans.plan_of(unique("nobody"), T1) is None


def test_money_is_numeric_in_the_store(plans: PostgresPlanStore, database: Database) -> None:
    plan_id = unique("numeric")
    plans.add_version(PlanTerms(plan_id=plan_id, price_multiplier="2.5"))
    with database.transaction() as connection:
        row = connection.execute(
            """SELECT pg_typeof(price_multiplier)::text, pg_typeof(request_fee_usd)::text,
                      price_multiplier FROM plan_versions WHERE plan_id = %s""",
            (plan_id,),
        ).fetchone()
    assert row == ("numeric", "numeric", Decimal("2.500000"))
