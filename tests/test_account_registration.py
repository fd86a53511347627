"""Usage for an account meterline does not know is never lost: its first event registers it."""

from __future__ import annotations

import pytest

from conftest import Stack, event, unique
from meterline.accounts import AccountStatus
from meterline.accounts.manage import Accounts
from meterline.accounts.registrar import AccountRegistrar

pytestmark = pytest.mark.slow


async def test_first_event_registers_the_account_and_is_billed(
    stack: Stack, accounts: Accounts
) -> None:
    new, known = unique("new"), unique("known")
    accounts.store.create_account(known, name="Known Ltd", timezone="Asia/Tokyo")
    pipeline = stack.start_pipeline(handlers=[AccountRegistrar(accounts.store)])
    answer = await stack.report(
        event(new, input_tokens=1_000, output_tokens=100),
        event(known, input_tokens=2_000, output_tokens=200),
    )
    assert answer.accepted == 2
    await stack.eventually(lambda: pipeline.metrics.as_dict()["consumed"] >= 2)
    usage = await stack.wait_for_requests(new, 1)
    assert usage["totals"]["requests"] == 1 and usage["totals"]["cost_usd"] != "0"
    registered = accounts.store.account(new)
    assert (registered.status, registered.registered_by) == (AccountStatus.ACTIVE, "first_event")
    kept = accounts.store.account(known)
    assert (kept.name, kept.timezone, kept.registered_by) == ("Known Ltd", "Asia/Tokyo", "api")


def test_a_replayed_batch_registers_nothing_twice(accounts: Accounts) -> None:
    """The handler is idempotent: a second registrar (a restarted pipeline) finds them all."""
    from datetime import UTC, datetime

    from meterline.tokens import TokenUsage
    from meterline.usage.model import PricedEvent

    ids = [unique("replay") for _ in range(3)]
    now = datetime.now(UTC)
    events = [
        PricedEvent(
            a,
            unique("e"),
            "",
            "m",
            "p",
            now,
            now,
            "ok",
            TokenUsage(1, 0, 0, 0, 1, 0),
            0,
            0,
            "",
            "",
            0,
            "",
            0,
            i,
        )
        for i, a in enumerate(ids)
    ]
    AccountRegistrar(accounts.store).on_flush(events)
    before = [accounts.store.account(a) for a in ids]
    AccountRegistrar(accounts.store).on_flush(events)
    assert [accounts.store.account(a) for a in ids] == before
