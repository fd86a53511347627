"""Crashes, retries and rebalances lose nothing and count nothing twice."""

from __future__ import annotations

import asyncio

import pytest

from conftest import Stack, event, unique
from meterline.lib.warehouse import WarehouseError
from pipelines.pricing.pipeline import PricingPipeline


class Crash(Exception):
    """Stands for the process dying at this point."""


def crash_at(pipeline: PricingPipeline, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``method`` kill the pipeline the first time it runs (after ``_write``: post-insert)."""
    original = getattr(pipeline, method)

    async def dying(*args: object) -> object:
        if method == "_commit":
            raise Crash(method)
        return await original(*args)

    def dying_sync(*args: object) -> object:
        if method == "_write":
            original(*args)  # the rows are in the warehouse; the process dies before commit
        raise Crash(method)

    monkeypatch.setattr(pipeline, method, dying if method == "_commit" else dying_sync)


@pytest.mark.parametrize("where", ["_prepare", "_write", "_commit"])
async def test_a_pipeline_killed_mid_batch_and_restarted_gives_the_same_totals(
    stack: Stack, account_id: str, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = stack.start_pipeline()
    crash_at(first, where, monkeypatch)
    events = [event(account_id, input_tokens=1_000, output_tokens=100) for _ in range(40)]
    await stack.report(*events)

    _, _, task = stack.pipelines[0]
    with pytest.raises(Crash):
        await asyncio.wait_for(task, timeout=30)
    stack.pipelines.clear()

    second = stack.start_pipeline()
    async with asyncio.timeout(30):
        while second.metrics.consumed < 40:  # every record is replayed to the new instance
            await asyncio.sleep(0.1)
    usage = await stack.wait_for_requests(account_id, 41, timeout_s=0.5)

    assert usage["totals"]["requests"] == 40
    assert usage["totals"]["input_tokens"] == 40_000
    # 40 × (1,000 × $0.40 + 100 × $1.60) per million
    assert usage["totals"]["cost_usd"] == "0.0224"
    replayed_after_insert = 40 if where in ("_write", "_commit") else 0
    assert second.metrics.duplicates == replayed_after_insert


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
    rows = stack.warehouse.query(
        "SELECT count() AS n, uniqExact(account_id, event_id) AS distinct_events "
        "FROM usage_events WHERE account_id IN {accounts:Array(String)}",
        {"accounts": accounts},
    )
    assert rows == [{"n": sent, "distinct_events": sent}]


async def test_a_warehouse_outage_pauses_the_pipeline_and_loses_nothing(
    stack: Stack, account_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    warehouse = stack.warehouse
    pipeline = stack.start_pipeline()
    attempts = 0  # at writing the batch; the warehouse is down for the first two
    real_write = pipeline._write

    def write(*args: object) -> object:
        nonlocal attempts
        attempts += 1
        return real_write(*args)

    def down_during_two_attempts(method: str) -> None:
        real = getattr(warehouse, method)

        def call(*args: object) -> object:
            if attempts in (1, 2):
                raise WarehouseError("Code: 210. DB::NetException: Connection refused")
            return real(*args)

        monkeypatch.setattr(warehouse, method, call)

    monkeypatch.setattr(pipeline, "_write", write)
    for method in ("insert_protobuf", "insert", "command"):
        down_during_two_attempts(method)
    await stack.report(*(event(account_id, input_tokens=1_000_000) for _ in range(3)))

    usage = await stack.wait_for_requests(account_id, 3)

    assert usage["totals"]["cost_usd"] == "1.2"
    assert pipeline.metrics.write_retries == 2
