"""Alerts: thresholds fire once per crossing, against the ledger and the warehouse
(this machine's PostgreSQL, the session's chDB); deliveries go to a real HTTP receiver
on this machine, signed, retried with back-off and recorded, and to the Kafka topic
(the session's Tansu)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiokafka import AIOKafkaConsumer

from conftest import Stack, event, unique
from meterline.accounts.manage import Accounts
from meterline.alerts.deliver import AlertDispatcher
from meterline.alerts.model import Alert, AlertKind, Channel, webhook_secret
from meterline.alerts.postgres import AlertStore
from meterline.alerts.watch import AlertWatcher
from meterline.credits.model import GrantKind
from meterline.credits.poster import LedgerPoster
from meterline.credits.postgres import PostgresLedger, UsageCharge
from meterline.lib.kafka import ensure_topics
from meterline.lib.postgres import Database
from meterline.lib.settings import AlertSettings, Settings
from meterline.lib.warehouse import Warehouse
from meterline.money import usd_to_picos
from meterline.quotas.charges import ChargeBook
from meterline.quotas.plans import PlanLimits, PlanTerms
from meterline.quotas.postgres import PostgresPlanStore
from meterline.quotas.rebuild import WarehouseCounts
from meterline.usage.clickhouse import ClickHouseUsageStore
from support.quotas import SERVER_SECRET, clear_of_midnight, priced


@pytest.fixture(autouse=True)
async def one_day() -> None:
    await clear_of_midnight("UTC")


@dataclass
class Desk:
    store: AlertStore
    ledger: PostgresLedger
    plans: PostgresPlanStore
    watcher: AlertWatcher
    accounts: Accounts
    made: list[str] = field(default_factory=list)

    def account(self, **plan: object) -> str:
        """A new account on a plan of ``plan``'s terms, in force since yesterday."""
        account = unique("alerted")
        self.accounts.store.create_account(account)
        self.made.append(account)
        version = self.plans.add_version(PlanTerms(plan_id=unique("alert-plan"), **plan))
        since = datetime.now(UTC) - timedelta(days=1)
        self.plans.assign(account, version.plan_id, version.version, since, "test")
        return account

    def grant(self, account: str, usd: str, **terms: object) -> str:
        grant, _ = self.ledger.grant(
            account,
            amount_picos=usd_to_picos(Decimal(usd)),
            kind=GrantKind.PURCHASED,
            idempotency_key=unique("grant"),
            **terms,  # type: ignore[arg-type]
        )
        return grant.grant_id

    def spend(self, account: str, usd: str) -> None:
        charge = UsageCharge(unique("event"), datetime.now(UTC), usd_to_picos(Decimal(usd)))
        self.ledger.post_usage(account, [charge])


@pytest.fixture
def desk(database: Database, accounts: Accounts, warehouse: Warehouse) -> Iterator[Desk]:
    store, ledger, plans = (
        AlertStore(database),
        PostgresLedger(database),
        PostgresPlanStore(database),
    )
    watcher = AlertWatcher(
        store,
        ledger=ledger,
        plans=plans,
        accounts=accounts.store,
        counts=WarehouseCounts(warehouse),
    )
    made = Desk(store, ledger, plans, watcher, accounts)
    yield made
    # what no dispatcher here sent is nobody's to send: the session's database is shared
    database.rows(
        "UPDATE alert_deliveries SET state = 'failed' WHERE state = 'pending' AND alert_id IN "
        "(SELECT alert_id FROM alerts WHERE account_id = ANY(%(accounts)s)) RETURNING 1",
        {"accounts": made.made},
    )


def kinds(alerts: list[Alert]) -> list[str]:
    return [a.kind.value for a in alerts]


def test_a_balance_rule_fires_once_per_crossing(desk: Desk) -> None:
    account = desk.account(billing="prepaid")
    desk.grant(account, "2.00")
    rule = desk.store.add_rule(
        account, AlertKind.BALANCE_BELOW, threshold_picos=usd_to_picos(Decimal(1))
    )
    assert desk.watcher.evaluate([account]) == []  # $2 is not below $1

    desk.spend(account, "1.50")
    (first,) = desk.watcher.evaluate([account])
    assert first.payload["message"] == "credits below $1: $0.5 available"
    assert first.payload["available_usd"] == "0.5" and first.rule_id == rule.rule_id
    desk.spend(account, "0.10")
    assert desk.watcher.evaluate([account]) == []  # still below: the same crossing
    assert desk.watcher.evaluate([account]) == []

    desk.grant(account, "5.00")  # back above: armed again, nothing fired
    assert desk.watcher.evaluate([account]) == []
    desk.spend(account, "5.00")  # below again: a second crossing
    (second,) = desk.watcher.evaluate([account])
    assert second.payload["available_usd"] == "0.4"
    assert [a.alert_id for a in desk.store.alerts(account)] == [second.alert_id, first.alert_id]


def test_evaluators_at_once_fire_one_alert(desk: Desk) -> None:
    """The pipeline's handler and the API's sweep may evaluate an account together."""
    account = desk.account(billing="prepaid")
    desk.store.add_rule(account, AlertKind.BALANCE_BELOW, threshold_picos=usd_to_picos(Decimal(1)))
    fired: list[Alert] = []
    runners = [
        threading.Thread(target=lambda: fired.extend(desk.watcher.evaluate([account])))
        for _ in range(4)
    ]
    for runner in runners:
        runner.start()
    for runner in runners:
        runner.join()
    assert len(fired) == 1 and len(desk.store.alerts(account)) == 1


def test_credits_expiring_fire_once_per_grant(desk: Desk) -> None:
    account = desk.account(billing="prepaid")
    now = datetime.now(UTC)
    soon = desk.grant(account, "3.00", expires_at=now + timedelta(hours=2))
    later = desk.grant(account, "4.00", expires_at=now + timedelta(days=30))
    desk.store.add_rule(account, AlertKind.CREDITS_EXPIRING, within=timedelta(hours=24))
    (first,) = desk.watcher.evaluate([account], now=now)
    assert (first.payload["grant_id"], first.payload["remaining_usd"]) == (soon, "3")
    assert desk.watcher.evaluate([account], now=now + timedelta(minutes=1)) == []
    (second,) = desk.watcher.evaluate([account], now=now + timedelta(days=29, hours=1))
    assert second.payload["grant_id"] == later


def test_spend_and_tokens_fire_once_per_share_of_the_caps(desk: Desk, warehouse: Warehouse) -> None:
    account = desk.account(
        limits=PlanLimits(spend_per_month_usd=Decimal("1.00"), tokens_per_day=1_000)
    )
    for share in (50, 80, 100):
        desk.store.add_rule(account, AlertKind.SPEND_SHARE, share_percent=share, calendar="month")
    desk.store.add_rule(account, AlertKind.TOKENS_SHARE, share_percent=90, calendar="day")
    desk.store.add_rule(account, AlertKind.SPEND_SHARE, share_percent=10, calendar="day")
    usage = ClickHouseUsageStore(warehouse)

    usage.insert_priced([priced(account, tokens=200, cents=55)])  # $0.55, 400 tokens
    (half,) = desk.watcher.evaluate([account])  # no daily spend cap: that rule is idle
    assert (half.kind, half.payload["share_percent"], half.payload["used"]) == (
        AlertKind.SPEND_SHARE,
        50,
        "0.55",
    )
    usage.insert_priced([priced(account, tokens=250, cents=30)])  # $0.85, 900 tokens
    fired = desk.watcher.evaluate([account])
    assert sorted((a.kind.value, a.payload["share_percent"]) for a in fired) == [
        ("spend_share", 80),
        ("tokens_share", 90),
    ]
    (tokens,) = [a for a in fired if a.kind is AlertKind.TOKENS_SHARE]
    assert tokens.payload["message"].endswith("reached 90% of the plan's cap: 900 of 1,000")
    usage.insert_priced([priced(account, tokens=1, cents=1)])  # $0.86: nothing new
    assert desk.watcher.evaluate([account]) == []
    assert len(desk.store.alerts(account)) == 3


@dataclass
class Receiver:
    """A webhook receiver on this machine that fails the first ``failures`` requests."""

    failures: int
    requests: list[tuple[dict[str, str], bytes, int]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    got = Receiver(failures=3)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            status = 500 if len(got.requests) < got.failures else 204
            got.requests.append(({k.lower(): v for k, v in self.headers.items()}, body, status))
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    got.url = f"http://127.0.0.1:{server.server_address[1]}/meterline"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield got
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def delivered(store: AlertStore, account: str, within_s: float = 30.0) -> Alert:
    """The account's one alert, once every delivery of it is no longer pending."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        (alert,) = await asyncio.to_thread(store.alerts, account)
        if alert.deliveries and all(d.state != "pending" for d in alert.deliveries):
            return alert
        assert loop.time() < deadline, alert
        await asyncio.sleep(0.05)


async def topic_records(settings: Settings, topic: str) -> list[dict[str, object]]:
    """Every record of ``topic``, from its beginning to its end now."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    try:
        partitions = consumer.assignment()
        while not partitions:
            await asyncio.sleep(0.05)
            partitions = consumer.assignment()
        ends = await consumer.end_offsets(list(partitions))
        found: list[dict[str, object]] = []
        for partition, end in ends.items():
            while await consumer.position(partition) < end:
                batch = await consumer.getmany(partition, timeout_ms=1000)
                for records in batch.values():
                    found += [json.loads(r.value) for r in records if r.value is not None]
        return found
    finally:
        await consumer.stop()


async def test_a_receiver_failing_three_times_gets_each_alert_once_signed(
    desk: Desk, receiver: Receiver, settings: Settings
) -> None:
    account = desk.account(billing="prepaid")
    generation = desk.store.set_webhook(account, receiver.url)
    desk.store.add_rule(account, AlertKind.BALANCE_BELOW, threshold_picos=usd_to_picos(Decimal(5)))
    (fired,) = desk.watcher.evaluate([account])
    kafka = settings.kafka.model_copy(update={"alerts_topic": unique("alerts")})
    await ensure_topics(settings.bootstrap_servers, kafka)
    dispatcher = AlertDispatcher(
        desk.store,
        server_secret=SERVER_SECRET,
        settings=AlertSettings(retry_base_s=0.05, retry_max_s=1.0, poll_s=0.05),
        kafka=kafka,
        bootstrap_servers=settings.bootstrap_servers,
    )
    await dispatcher.start()
    try:
        alert = await delivered(desk.store, account)
    finally:
        await dispatcher.close()

    # four requests of the one alert: three answered 500, the fourth 204, none after
    assert [status for _, _, status in receiver.requests] == [500, 500, 500, 204]
    secret = webhook_secret(SERVER_SECRET, account, generation)
    for headers, body, _ in receiver.requests:
        assert json.loads(body) == fired.payload
        assert headers["meterline-alert-id"] == fired.alert_id
        signed = f"{headers['meterline-timestamp']}.".encode() + body
        mac = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
        assert headers["meterline-signature"] == f"v1={mac}"
    # each attempt recorded, waiting longer each time
    (hook,) = [d for d in alert.deliveries if d.channel is Channel.WEBHOOK]
    assert hook.state == "delivered"
    assert [(a.attempt, a.status) for a in hook.attempts] == [
        (1, 500),
        (2, 500),
        (3, 500),
        (4, 204),
    ]
    gaps = [
        (b.at - a.at).total_seconds()
        for a, b in zip(hook.attempts[:-1], hook.attempts[1:], strict=True)
    ]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.2
    # and the topic has it once
    records = await topic_records(settings, kafka.alerts_topic)
    assert [r["alert_id"] for r in records].count(fired.alert_id) == 1
    (kafka_delivery,) = [d for d in alert.deliveries if d.channel is Channel.KAFKA]
    assert kafka_delivery.state == "delivered"


async def test_a_receiver_that_never_answers_is_given_up_on(desk: Desk, settings: Settings) -> None:
    account = desk.account(billing="prepaid")
    desk.store.set_webhook(account, "http://127.0.0.1:1/nobody")  # nothing listens
    desk.store.add_rule(account, AlertKind.BALANCE_BELOW, threshold_picos=usd_to_picos(Decimal(5)))
    desk.watcher.evaluate([account])
    dispatcher = AlertDispatcher(
        desk.store,
        server_secret=SERVER_SECRET,
        settings=AlertSettings(retry_base_s=0.02, retry_max_s=0.05, poll_s=0.02, max_attempts=3),
        kafka=settings.kafka,
        bootstrap_servers=settings.bootstrap_servers,
    )
    await dispatcher.start()
    try:
        alert = await delivered(desk.store, account)
    finally:
        await dispatcher.close()
    (hook,) = [d for d in alert.deliveries if d.channel is Channel.WEBHOOK]
    assert hook.state == "failed" and len(hook.attempts) == 3
    assert all(a.status is None and "ConnectError" in a.error for a in hook.attempts)


async def test_the_pipeline_fires_a_crossing_once_across_batches(
    desk: Desk, stack: Stack, database: Database
) -> None:
    """The watcher as the pipeline's flush handler, after the ledger's debit."""
    account = desk.account(billing="prepaid")
    desk.grant(account, "0.01")
    desk.store.add_rule(
        account, AlertKind.BALANCE_BELOW, threshold_picos=usd_to_picos(Decimal("0.008"))
    )
    book = ChargeBook(desk.plans)
    stack.start_pipeline(handlers=[LedgerPoster(desk.ledger, book), desk.watcher], plans=book)
    for n in range(1, 4):  # three batches: $0.00112 each (see test_credits_poster)
        await stack.report(event(account, input_tokens=2_000, output_tokens=200))
        await stack.wait_for_requests(account, n)
    await stack.stop_pipelines()
    assert desk.ledger.balance(account).available_picos == usd_to_picos(Decimal("0.00664"))
    async with asyncio.timeout(10):  # the watcher's thread evaluates after the commit
        while not desk.store.alerts(account):
            await asyncio.sleep(0.05)
    desk.watcher.close()
    (alert,) = desk.store.alerts(account)  # below after the second batch; once
    assert alert.payload["available_usd"] in ("0.00776", "0.00664")
