"""Crashes, retries, rebalances and refused writes lose nothing and count nothing twice.

In-process crashes at each point of a flush are quick to run; the same
property with real processes killed and frozen is in test_kill_and_freeze.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from conftest import Stack, event, unique
from meterline.lib.warehouse import WarehouseError
from meterline.usage.model import PricedEvent
from pipelines.pricing.pipeline import PricingPipeline
from support.consistency import consistent_totals


class Crash(BaseException):
    """Stands for the process dying here: no handler catches it, nothing runs after."""


class Recorder:
    """A flush handler that keeps what it was handed."""

    name = "recorder"

    def __init__(self) -> None:
        self.events: list[PricedEvent] = []

    def on_flush(self, events: Sequence[PricedEvent]) -> None:
        self.events.extend(events)


def die(pipeline: PricingPipeline, where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the pipeline die at ``where`` in its first flush, and stay dead."""
    store = pipeline.sink.store
    real_insert, real_recount = store.insert_priced, store.recount
    dead = False

    def crash() -> None:
        nonlocal dead
        dead = True
        raise Crash(where)

    def insert_priced(events: Sequence[PricedEvent]) -> None:
        if dead or where == "before_write":
            crash()
        real_insert(events)
        if where == "after_write":
            crash()

    def recount(events: Sequence[PricedEvent]) -> None:
        if where == "inside_write":
            # killed between the parts of a write: the rows are stored, their
            # dedupe keys (a materialized view's separate insert) and the
            # rollup are not
            pipeline.warehouse.command(
                "DELETE FROM dedupe_keys WHERE event_id IN {ids:Array(String)}",
                {"ids": [e.event_id for e in events]},
            )
            crash()
        real_recount(events)

    async def commit(*args: Any) -> None:
        crash()

    monkeypatch.setattr(store, "insert_priced", insert_priced)
    monkeypatch.setattr(store, "recount", recount)
    if where == "at_commit":
        monkeypatch.setattr(pipeline, "_commit", commit)


async def bury(stack: Stack) -> None:
    """Wait for the dead pipeline's task and close its Kafka clients, as the OS would."""
    pipeline, _, task = stack.pipelines.pop(0)
    with pytest.raises(Crash):
        await asyncio.wait_for(task, timeout=30)
    assert pipeline._consumer is not None and pipeline._producer is not None
    await pipeline._consumer.stop()
    await pipeline._producer.stop()


@pytest.mark.parametrize("where", ["before_write", "inside_write", "after_write", "at_commit"])
async def test_a_pipeline_killed_mid_batch_and_restarted_gives_the_same_totals(
    stack: Stack, account_id: str, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    die(stack.start_pipeline(), where, monkeypatch)
    events = [event(account_id, input_tokens=1_000, output_tokens=100) for _ in range(40)]
    await stack.report(*events)
    await bury(stack)

    handler = Recorder()
    second = stack.start_pipeline(handlers=[handler])
    await stack.eventually(lambda: second.metrics.consumed >= 40, timeout_s=30)

    # 40 × (1,000 × $0.40 + 100 × $1.60) per million, once each, in every answer
    assert consistent_totals(stack.warehouse, [account_id]) == {
        account_id: (40, "0.0224", "0.0224")
    }
    # the replay hands the handlers every event once, with its stored price
    assert sorted(e.event_id for e in handler.events) == sorted(e.event_id for e in events)
    assert sum(e.cost_picos for e in handler.events) == 22_400_000_000
    found_stored = where in ("after_write", "at_commit")  # keys and rows both written
    assert second.metrics.duplicates == (40 if found_stored else 0)


async def test_rebalancing_instances_count_every_event_once(stack: Stack) -> None:
    accounts = [unique("acct") for _ in range(12)]
    stack.start_pipeline()
    sent = 0
    for round_ in range(6):
        if round_ == 2:
            stack.start_pipeline()  # a second instance joins: partitions move
        if round_ == 4:
            _, stop, task = stack.pipelines.pop(0)  # the first one leaves
            stop.set()
            await task
        await stack.report(*(event(a, input_tokens=10, output_tokens=1) for a in accounts * 5))
        sent += len(accounts) * 5
        await asyncio.sleep(0.3)

    for account in accounts:
        await stack.wait_for_requests(account, sent // len(accounts))
    totals = consistent_totals(stack.warehouse, accounts)
    assert sum(n for n, _, _ in totals.values()) == sent


async def test_a_second_write_of_the_same_events_changes_no_answer(
    stack: Stack, account_id: str
) -> None:
    """What a frozen instance does when it wakes: write a batch someone else wrote."""
    handler = Recorder()
    pipeline = stack.start_pipeline(handlers=[handler])
    await stack.report(*(event(account_id, input_tokens=1_000_000) for _ in range(5)))
    await stack.eventually(lambda: len(handler.events) == 5)

    store = pipeline.sink.store
    store.insert_priced(handler.events)  # the same events, stored again behind the dedupe check
    store.insert_priced(handler.events[:2])

    assert consistent_totals(stack.warehouse, [account_id]) == {account_id: (5, "2", "2")}


async def test_a_warehouse_outage_pauses_the_pipeline_and_loses_nothing(
    stack: Stack, account_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = stack.start_pipeline()
    attempts = 0  # at storing the batch; the warehouse is down for the first two
    real_store = pipeline.sink.store_batch

    def store_batch(*args: Any) -> Any:
        nonlocal attempts
        attempts += 1
        return real_store(*args)

    class Down:
        """The pipeline's warehouse connection, refused during the first two attempts."""

        def __getattr__(self, name: str) -> Any:
            real = getattr(stack.warehouse, name)

            def call(*args: object) -> object:
                if attempts in (1, 2):
                    raise WarehouseError("Code: 210. DB::NetException: Connection refused")
                return real(*args)

            return call

    monkeypatch.setattr(pipeline.sink, "store_batch", store_batch)
    monkeypatch.setattr(pipeline.sink.store, "warehouse", Down())
    await stack.report(*(event(account_id, input_tokens=1_000_000) for _ in range(3)))

    usage = await stack.wait_for_requests(account_id, 3)

    assert usage["totals"]["cost_usd"] == "1.2"
    assert pipeline.metrics.write_retries == 2
    assert pipeline.metrics.set_aside == 0  # an outage is waited out, never split


async def test_an_event_the_warehouse_refuses_is_set_aside_and_the_rest_billed(
    stack: Stack, account_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = stack.start_pipeline()
    store = pipeline.sink.store
    real_insert = store.insert_priced
    poison = "poison-" + unique("e")

    def insert_priced(events: Sequence[PricedEvent]) -> None:
        if any(e.event_id == poison and e.priced for e in events):
            raise WarehouseError("Code: 407. DB::Exception: Decimal math overflow")
        real_insert(events)

    monkeypatch.setattr(store, "insert_priced", insert_priced)
    others = [event(account_id, input_tokens=1_000_000) for _ in range(9)]
    await stack.report(*others[:4], event(account_id, event_id=poison, input_tokens=5), *others[4:])

    usage = await stack.wait_for_requests(account_id, 10)

    assert usage["totals"]["requests"] == 10
    assert usage["totals"]["unpriced_requests"] == 1  # kept, tokens and all, re-priceable
    assert usage["totals"]["cost_usd"] == "3.6"  # the nine others, billed
    assert pipeline.metrics.set_aside == 1
